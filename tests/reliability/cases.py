"""Random schedules for the equivalence campaign, and the reference they are checked against.

A *case* is plain JSON: scheduler arguments, initial learning rates, and for every step one
``[value, weight, kind]`` entry per rank (``weight`` ``None`` means "not passed"; ``kind`` says
whether the rank passes a float, a float64 tensor or a numpy float64). Hypothesis draws the
cases in the launcher; every rank replays its column of every case on the real backend.

The reference is written here from the documented rule, without importing distplateau:
ranks with weight 0 are left out; ``"mean"`` is ``fsum(w * v) / fsum(w)`` with equal values
returned exactly, and every reduction returns a single contributor exactly; NaN/+-Inf on a
contributing rank is handled by the NaN policy; every rank with weight 0 is a ``ValueError``.
Its value is fed to torch's own ``ReduceLROnPlateau``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

__all__ = ["Expected", "expected_step", "draw_cases", "case_strategy", "snapshot", "last_lr", "checkpoint_rows",
           "CHECKPOINT_KWARGS", "CHECKPOINT_SAVE_STEPS", "CHECKPOINT_RESUME_STEPS", "CHECKPOINT_SEED"]

REDUCTIONS = ("mean", "sum", "min", "max")
NAN_POLICIES = ("drop", "raise", "skip", "bad", "last", "zero")


class Expected:
    """What one step must do: raise ``error``, change nothing (``value is None``), or step on ``value``."""

    __slots__ = ("error", "value")

    def __init__(self, error: str | None = None, value: float | None = None) -> None:
        self.error = error
        self.value = value

    def __repr__(self) -> str:
        return f"Expected(error={self.error!r}, value={self.value!r})"


def _reduce(values: Sequence[float], weights: Sequence[float], reduction: str) -> float:
    if len(values) == 1:  # a single contributor is returned exactly, -0.0 included, whatever the reduction
        return values[0]
    if reduction == "mean":
        if all(v == values[0] for v in values):
            return values[0]
        return math.fsum(w * v for w, v in zip(weights, values)) / math.fsum(weights)
    if reduction == "sum":
        return math.fsum(values)
    return min(values) if reduction == "min" else max(values)


def expected_step(entries: Sequence[Sequence[Any]], reduction: str, nan_policy: str,
                  last_finite: float | None) -> Expected:
    """The documented outcome of one step, from every rank's ``[value, weight, kind]``."""
    values: list[float] = []
    weights: list[float] = []
    nonfinite = 0
    for value, weight, _ in entries:
        w = 1.0 if weight is None else float(weight)
        if w == 0:
            continue
        if math.isfinite(value):
            values.append(value)
            weights.append(w)
        else:
            nonfinite += 1
            if nan_policy == "zero":
                values.append(0.0)
                weights.append(w)
    if not values and not nonfinite:
        return Expected(error="ValueError")
    if nonfinite and nan_policy != "zero":
        if nan_policy == "raise":
            return Expected(error="FloatingPointError")
        if nan_policy == "skip":
            return Expected()
        if nan_policy == "bad":
            return Expected(value=math.nan)
        if nan_policy == "last":
            return Expected(value=last_finite)
        if not values:  # "drop" with nothing finite left: a bad epoch
            return Expected(value=math.nan)
    return Expected(value=_reduce(values, weights, reduction))


def last_lr(s: Any) -> list[Any]:
    """``s.get_last_lr()``, also for torch 2.1's own ``ReduceLROnPlateau``, which has no
    ``get_last_lr`` (torch 2.2 added it): there, the learning rates its latest step left in
    ``_last_lr``, or before any step the optimizer's."""
    if hasattr(s, "get_last_lr"):
        return list(s.get_last_lr())
    return list(getattr(s, "_last_lr", [g["lr"] for g in s.optimizer.param_groups]))


def snapshot(s: Any) -> str:
    """Everything of a ``ReduceLROnPlateau`` that must be bit-identical, as exact reprs."""
    return repr((last_lr(s), [g["lr"] for g in s.optimizer.param_groups], s.best, s.num_bad_epochs,
                 s.cooldown_counter, s.last_epoch))


#: The checkpoint fault's scheduler settings and schedule lengths.
CHECKPOINT_KWARGS: dict[str, Any] = {"patience": 1, "cooldown": 1, "min_lr": 1e-3, "factor": 0.5,
                                     "reduction": "mean", "nan_policy": "last"}
CHECKPOINT_SAVE_STEPS, CHECKPOINT_RESUME_STEPS, CHECKPOINT_SEED = 6, 10, 2026


def checkpoint_rows(world: int, steps: int, seed: int) -> list[list[list[Any]]]:
    """A fixed schedule for the checkpoint fault: uneven weights, a weight-0 rank, a NaN
    on the first step (which ``nan_policy="last"`` answers with the value from before the
    checkpoint) and a plateau."""
    import random

    rng = random.Random(seed)
    rows = []
    for t in range(steps):
        row = []
        for r in range(world):
            value = 1.0 / (t + 1) if t < steps // 2 else 0.3 + rng.random() * 1e-3
            row.append([math.nan if t == 0 and r == world - 1 else value,
                        0 if (t == 2 and r == 0 and world > 1) else r + 1 + rng.randint(0, 3), "float"])
        rows.append(row)
    return rows


# --- strategies ------------------------------------------------------------------------------
_finite = st.one_of(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False),
    st.floats(min_value=0.0, max_value=2.0, allow_nan=False),  # plateaus, thresholds matter
    st.sampled_from([0.0, -0.0, 1.0, 0.5, 5e-324, 1e-300]),
)
_nonfinite = st.sampled_from([math.nan, math.inf, -math.inf])
_weight = st.one_of(
    st.none(),
    st.just(0),
    st.just(0.0),
    st.integers(min_value=1, max_value=10_000),
    st.floats(min_value=1e-6, max_value=1e4, allow_nan=False, allow_infinity=False),
)
_kind = st.sampled_from(["float", "tensor", "numpy"])


@st.composite
def case_strategy(draw: st.DrawFn, world: int, max_steps: int = 16) -> dict[str, Any]:
    """One random schedule for ``world`` ranks."""
    groups = draw(st.integers(1, 2))
    lrs = [draw(st.sampled_from([1.0, 0.1, 0.37, 1e-3])) for _ in range(groups)]
    min_lr: float | list[float] = draw(st.one_of(
        st.sampled_from([0.0, 1e-3, 0.05]),
        st.lists(st.sampled_from([0.0, 1e-4, 0.01, 0.2]), min_size=groups, max_size=groups),
    ))
    kwargs = {
        "mode": draw(st.sampled_from(["min", "max"])),
        "factor": draw(st.sampled_from([0.1, 0.5, 0.9])),
        "patience": draw(st.integers(0, 3)),
        "threshold": draw(st.sampled_from([0.0, 1e-4, 0.01, 0.3])),
        "threshold_mode": draw(st.sampled_from(["rel", "abs"])),
        "cooldown": draw(st.integers(0, 2)),
        "min_lr": min_lr,
        "eps": draw(st.sampled_from([1e-8, 0.0, 1e-3])),
        "reduction": draw(st.sampled_from(REDUCTIONS)),
        "nan_policy": draw(st.sampled_from(NAN_POLICIES)),
        "stop_patience": draw(st.one_of(st.none(), st.integers(1, 4))),
    }
    p_nonfinite = draw(st.sampled_from([0.0, 0.1, 0.3]))
    p_zero = draw(st.sampled_from([0.0, 0.2, 0.5]))
    steps = []
    for _ in range(draw(st.integers(1, max_steps))):
        synchronised = draw(st.integers(0, 9)) == 0  # every rank already holds the global metric
        common = draw(_finite)
        row = []
        for _ in range(world):
            if draw(st.floats(0, 1)) < p_nonfinite:
                value = draw(_nonfinite)
            else:
                value = common if synchronised else draw(_finite)
            weight = 0 if draw(st.floats(0, 1)) < p_zero else draw(_weight)
            row.append([value, weight, draw(_kind)])
        steps.append(row)
    return {"world": world, "lrs": lrs, "kwargs": kwargs, "steps": steps}


def draw_cases(world: int, count: int, seed: int, max_steps: int = 16) -> list[dict[str, Any]]:
    """``count`` cases for ``world`` ranks, reproducible from ``seed``."""
    cases: list[dict[str, Any]] = []

    @hypothesis_seed(seed)
    @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case_strategy(world, max_steps))
    def collect(case: dict[str, Any]) -> None:
        case["id"] = f"w{world}-s{seed}-{len(cases)}"
        cases.append(case)

    collect()
    return cases
