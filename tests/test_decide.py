"""The pure decision: validation, diverged state, NaN policies and reductions on a table."""

from __future__ import annotations

import math

import pytest

from distplateau import NAN_POLICIES, decide
from distplateau._decide import MetricMissingError, reduce
from distplateau._record import Missing, Problem, make_record

NAN = math.nan


def table(*values: float, weights: tuple[float, ...] | None = None, fingerprints: tuple[float, ...] | None = None):
    weights = weights or (1.0,) * len(values)
    fingerprints = fingerprints or (7.0,) * len(values)
    return [(v, w, 0.0, 0.0, f) for v, w, f in zip(values, weights, fingerprints)]


def run(t, policy="drop", reduction="mean", last=None, ranks=None):
    return decide(t, reduction=reduction, nan_policy=policy, last_finite=last, ranks=ranks)


def test_weighted_mean_is_sum_of_weighted_values_over_sum_of_weights():
    assert run(table(1.0, 4.0, weights=(3.0, 1.0))).value == (3.0 + 4.0) / 4.0


def test_equal_values_come_back_exactly_from_mean():
    assert run(table(0.05, 0.05, 0.05)).value == 0.05
    assert reduce([0.1], [3.0], "mean") == 0.1


@pytest.mark.parametrize("reduction,expected", [("sum", 6.0), ("min", 1.0), ("max", 3.0), ("mean", 2.0)])
def test_reductions(reduction, expected):
    assert run(table(1.0, 2.0, 3.0), reduction=reduction).value == expected


@pytest.mark.parametrize("reduction", ["mean", "sum", "min", "max"])
def test_a_single_contributing_rank_gives_its_value_exactly_even_negative_zero(reduction):
    assert math.copysign(1.0, reduce([-0.0], [3.0], reduction)) == -1.0  # math.fsum([-0.0]) is 0.0
    table = [(-0.0, 2.0, 0, 0, 1.0), (float("nan"), 1.0, 0, 0, 1.0)]
    value = decide(table, reduction=reduction, nan_policy="drop", last_finite=None).value
    assert math.copysign(1.0, value) == -1.0


def test_weight_only_masks_ranks_for_sum_min_max():
    t = table(1.0, 2.0, 10.0, weights=(5.0, 1.0, 0.0))
    assert run(t, reduction="sum").value == 3.0
    assert run(t, reduction="max").value == 2.0


def test_zero_weight_rank_contributes_nothing_not_even_its_nan():
    d = run(table(2.0, NAN, weights=(4.0, 0.0)), policy="raise")
    assert d == (2.0, ())


def test_nan_on_one_rank_is_dropped_from_weighted_mean():
    d = run(table(1.0, NAN, 3.0, weights=(1.0, 5.0, 3.0)))
    assert d.value == (1.0 + 9.0) / 4.0 and d.nonfinite_ranks == (1,)


def test_drop_with_nothing_finite_is_a_bad_epoch():
    d = run(table(NAN, math.inf))
    assert math.isnan(d.value) and d.nonfinite_ranks == (0, 1)


def test_raise_names_every_nonfinite_rank():
    with pytest.raises(FloatingPointError, match="ranks 1, 2 and nan_policy='raise'"):
        run(table(1.0, NAN, -math.inf), policy="raise")


def test_skip_bad_last_zero():
    t = table(1.0, math.inf, 3.0)
    assert run(t, policy="skip") == (None, (1,))
    assert math.isnan(run(t, policy="bad").value)
    assert run(t, policy="last", last=0.25) == (0.25, (1,))
    assert run(t, policy="last", last=None).value is None
    assert run(t, policy="zero").value == 4.0 / 3.0


def test_zero_policy_makes_a_diverging_rank_look_like_a_record_low_in_min_mode():
    assert run(table(5.0, NAN), policy="zero", reduction="min").value == 0.0


@pytest.mark.parametrize("policy", NAN_POLICIES)
def test_every_policy_leaves_all_finite_tables_alone(policy):
    assert run(table(1.0, 2.0), policy=policy) == (1.5, ())


def test_all_weights_zero_is_a_value_error():
    with pytest.raises(ValueError, match="every rank passed weight 0"):
        run(table(1.0, 2.0, weights=(0.0, 0.0)))


def test_bad_inputs_are_named_by_rank_and_type_errors_win():
    t = table(1.0, 2.0, 3.0)
    t[1] = (3.0, 1.0, float(Problem.METRIC_NOT_SCALAR), 0.0, 7.0)
    t[2] = (0.0, 0.0, float(Problem.METRIC_NONE), float(Problem.WEIGHT_NEGATIVE), 7.0)
    with pytest.raises(TypeError) as err:
        run(t, ranks=(4, 5, 6))
    assert "metric has 3 elements, not 1 on rank 5" in str(err.value)
    assert "metric is None on rank 6" in str(err.value)
    assert "weight is negative (0.0) on rank 6" in str(err.value)


def test_value_problems_alone_raise_value_error():
    t = table(1.0, 2.0)
    t[0] = (1.0, math.inf, 0.0, float(Problem.WEIGHT_NOT_FINITE), 7.0)
    with pytest.raises(ValueError, match=r"weight is not finite \(inf\) on rank 0"):
        run(t)


def test_different_fingerprints_raise_runtime_error_grouping_ranks():
    with pytest.raises(RuntimeError, match="ranks 0, 2 vs rank 1"):
        run(table(1.0, 1.0, 1.0, fingerprints=(1.0, 2.0, 1.0)))


def test_input_errors_are_reported_before_diverged_state():
    t = table(1.0, 1.0, fingerprints=(1.0, 2.0))
    t[0] = (0.0, 1.0, float(Problem.METRIC_STR), 0.0, 1.0)
    with pytest.raises(TypeError):
        run(t)


def test_unknown_reduction_is_rejected():
    with pytest.raises(ValueError, match="reduction must be one of"):
        reduce([1.0, 2.0], [1.0, 1.0], "median")  # type: ignore[arg-type]


def test_sum_beyond_float64_range_is_infinite_not_an_exception():
    assert run(table(1e308, 1e308), reduction="sum").value == math.inf
    assert run(table(-1e308, -1e308, -1e308), reduction="sum").value == -math.inf


def test_mean_stays_finite_when_the_weighted_sum_would_overflow():
    assert run(table(1e308, 1.5e308)).value == 1.25e308
    assert run(table(-1e308, -1.5e308, weights=(3.0, 1.0))).value == pytest.approx(-1.125e308)
    assert run(table(1e308, -1e308, weights=(1e10, 1e10))).value == 0.0
    assert run(table(1.0, 3.0, weights=(1e308, 1e308))).value == 2.0


def missing(samples: float, strict: bool) -> tuple[float, ...]:
    return tuple(make_record(NAN, Missing(samples, strict), 7.0))


def test_a_rank_with_a_missing_metric_contributes_nothing_without_strict():
    t = table(1.0, 2.0, 4.0, weights=(2.0, 1.0, 1.0))
    t[1] = missing(5, strict=False)
    assert run(t) == (2.0, ())  # (2 * 1 + 4) / 3, rank 1 left out


def test_strict_names_the_ranks_missing_a_metric_the_others_have():
    t = table(1.0, 2.0, 4.0, 8.0)
    t[1], t[3] = missing(5, strict=True), missing(-1, strict=True)  # -1: sample count unknown
    with pytest.raises(MetricMissingError, match="missing on ranks 11, 13 but present on the others") as err:
        run(t, ranks=[10, 11, 12, 13])
    assert err.value.ranks == (11, 13) and not err.value.everywhere


def test_strict_does_not_count_a_rank_without_samples_as_missing():
    t = table(1.0, 3.0)
    t[1] = missing(0, strict=True)
    assert run(t) == (1.0, ())


def test_a_metric_missing_everywhere_raises_with_strict_and_changes_nothing_without():
    assert run([missing(3, strict=False), missing(0, strict=False)]) == (None, ())
    with pytest.raises(MetricMissingError, match="missing on every rank") as err:
        run([missing(3, strict=True), missing(0, strict=True)])
    assert err.value.everywhere
