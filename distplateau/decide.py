"""The decision every rank takes from the gathered table: pure functions, no I/O.

Every rank calls :func:`decide` on the same table (one row per rank, see
:class:`distplateau.record.Record`), so every rank reaches the same result bit for bit:
the same exception, or the same value for ``ReduceLROnPlateau.step``, or "change nothing".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple, get_args

from .record import Problem

__all__ = ["NanPolicy", "Reduction", "Decision", "NAN_POLICIES", "REDUCTIONS", "decide", "reduce"]

Reduction = Literal["mean", "sum", "min", "max"]
NanPolicy = Literal["drop", "raise", "skip", "bad", "last", "zero"]
REDUCTIONS: tuple[str, ...] = get_args(Reduction)
NAN_POLICIES: tuple[str, ...] = get_args(NanPolicy)

Row = Sequence[float]

_TYPE_PROBLEMS = frozenset(
    {Problem.METRIC_NONE, Problem.METRIC_STR, Problem.METRIC_BOOL,
     Problem.METRIC_NOT_A_NUMBER, Problem.WEIGHT_NOT_A_NUMBER}
)
_HINT = (
    "pass a real scalar metric (float, int, numpy scalar or 1-element tensor) and a finite, "
    "non-negative weight, on every rank"
)


class Decision(NamedTuple):
    """What the ranks agreed on.

    ``value`` is what the parent ``ReduceLROnPlateau.step`` gets (NaN makes it a bad
    epoch), or ``None`` when the step must change nothing. ``nonfinite_ranks`` lists the
    contributing ranks whose metric was NaN or +/-Inf, for reporting.
    """

    value: float | None
    nonfinite_ranks: tuple[int, ...] = ()


# NamedTuple's generated __new__ is a Python function; tuple.__new__ builds the same object in
# a fraction of the time, which matters on the single-process hot path.
_new_tuple = tuple.__new__


def reduce(values: Sequence[float], weights: Sequence[float], reduction: Reduction) -> float:
    """Reduce the contributing ranks' values; ``weights`` matter to ``"mean"`` only.

    ``"mean"`` is ``fsum(w * v) / fsum(w)``, except that equal values (one contributing
    rank, or a metric already synchronised across ranks) are returned exactly as they are.

    Args:
        values: the contributing ranks' metrics, all finite.
        weights: their weights, all positive, in the same order.
        reduction: ``"mean"``, ``"sum"``, ``"min"`` or ``"max"``.

    Raises:
        ValueError: if ``values`` is empty or ``reduction`` is unknown.

    Example:
        >>> reduce([0.25, 0.75], [192, 64], "mean")  # per-rank mean losses, sample counts
        0.375
        >>> reduce([0.25, 0.75], [192, 64], "max")
        0.75
    """
    if len(values) == 1:
        return values[0]
    if not values:
        raise ValueError("nothing to reduce")
    if reduction == "mean":
        first = values[0]
        if isinstance(values, list):
            same = values.count(first) == len(values)  # compares with ==, faster than all()
        else:
            same = all(v == first for v in values)
        if same:
            return first
        return _weighted_mean(values, weights)
    if reduction == "sum":
        return _fsum(values)
    if reduction == "min":
        return min(values)
    if reduction == "max":
        return max(values)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    try:
        mean = math.fsum([w * v for w, v in zip(weights, values)]) / math.fsum(weights)
        if math.isfinite(mean):
            return mean
    except (OverflowError, ValueError):
        pass
    # Finite values whose weighted sum leaves float64's range (losses near 1e308, huge weights):
    # weights scaled to at most 1, then normalised, keep every term, and so the mean, in range.
    largest = max(weights)
    scaled = [w / largest for w in weights]
    total = math.fsum(scaled)
    return _fsum([(w / total) * v for w, v in zip(scaled, values)])


def _fsum(values: Sequence[float]) -> float:
    """``math.fsum``, except that a sum beyond float64's range is +/-inf, as plain ``sum`` gives,
    instead of an ``OverflowError``."""
    try:
        return math.fsum(values)
    except (OverflowError, ValueError):
        return sum(values)


def _describe(problem: Problem, detail: float) -> str:
    if problem is Problem.METRIC_NONE:
        return "metric is None"
    if problem is Problem.METRIC_STR:
        return "metric is a str"
    if problem is Problem.METRIC_BOOL:
        return "metric is a bool"
    if problem is Problem.METRIC_NOT_A_NUMBER:
        return "metric is not a real number"
    if problem is Problem.METRIC_NOT_SCALAR:
        return f"metric has {int(detail)} elements, not 1"
    if problem is Problem.WEIGHT_NOT_A_NUMBER:
        return "weight is not a real number"
    if problem is Problem.WEIGHT_NOT_SCALAR:
        return f"weight has {int(detail)} elements, not 1"
    if problem is Problem.WEIGHT_NEGATIVE:
        return f"weight is negative ({detail!r})"
    return f"weight is not finite ({detail!r})"


def _ranks_text(ranks: Sequence[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def check_inputs(table: Sequence[Row], ranks: Sequence[int]) -> None:
    """Raise the same error on every rank if any rank's metric or weight was unusable.

    Raises:
        TypeError: a metric or weight on some rank is not a real number.
        ValueError: a metric or weight has more than one element, or a weight is negative
            or not finite.
    """
    problems: list[tuple[str, Problem]] = []
    for rank, (value, weight, metric_problem, weight_problem, _) in zip(ranks, table):
        if metric_problem:
            p = Problem(int(metric_problem))
            problems.append((f"{_describe(p, value)} on rank {rank}", p))
        if weight_problem:
            p = Problem(int(weight_problem))
            problems.append((f"{_describe(p, weight)} on rank {rank}", p))
    if problems:
        error = TypeError if any(p in _TYPE_PROBLEMS for _, p in problems) else ValueError
        raise error("; ".join(text for text, _ in problems) + f": {_HINT}")


def check_same_state(table: Sequence[Row], ranks: Sequence[int]) -> None:
    """Raise on every rank if the ranks entered ``step`` with different scheduler states.

    Raises:
        RuntimeError: naming which ranks agree with which.
    """
    first = table[0][4]
    if all(row[4] == first for row in table):
        return
    groups: dict[float, list[int]] = {}
    for rank, row in zip(ranks, table):
        groups.setdefault(row[4], []).append(rank)
    parts = " vs ".join(_ranks_text(g) for g in groups.values())
    raise RuntimeError(
        f"scheduler state differs across ranks ({parts}): best, num_bad_epochs, "
        "cooldown_counter, last_epoch, settings or learning rates are not the same "
        "everywhere. Construct the scheduler with the same arguments on every rank and load "
        "the same state_dict on every rank (not only on rank 0); to give every rank rank "
        f"{ranks[0]}'s scheduler state and learning rates now, call "
        f"scheduler.sync_state(src={ranks[0]}) on every rank."
    )


def decide(
    table: Sequence[Row],
    *,
    reduction: Reduction,
    nan_policy: NanPolicy,
    last_finite: float | None,
    ranks: Sequence[int] | None = None,
) -> Decision:
    """Validate the gathered table, then apply the NaN policy and the reduction.

    Args:
        table: one row per rank, in rank order: ``(value, weight, metric_problem,
            weight_problem, fingerprint)``.
        reduction: ``"mean"`` (weighted), ``"sum"``, ``"min"`` or ``"max"`` over the ranks
            whose weight is positive.
        nan_policy: what NaN/Inf on a contributing rank does; see
            :class:`~distplateau.DistributedReduceLROnPlateau`.
        last_finite: the last finite global value, used by ``"last"``.
        ranks: how to name the rows in messages; default ``0..len(table)-1``.

    Raises:
        TypeError, ValueError: a rank passed an unusable metric or weight, or every rank
            passed weight 0.
        RuntimeError: the ranks' scheduler states differ.
        FloatingPointError: ``nan_policy="raise"`` and a contributing metric is not finite.

    Example:
        >>> nan = float("nan")
        >>> table = [(1.0, 2.0, 0, 0, 7.0), (nan, 1.0, 0, 0, 7.0), (4.0, 1.0, 0, 0, 7.0)]
        >>> decide(table, reduction="mean", nan_policy="drop", last_finite=None)
        Decision(value=2.0, nonfinite_ranks=(1,))
        >>> decide(table, reduction="mean", nan_policy="skip", last_finite=None)
        Decision(value=None, nonfinite_ranks=(1,))
    """
    if len(table) == 1:  # a single process: nothing to compare, often nothing to reduce
        value, weight, metric_problem, weight_problem, _ = table[0]
        if not (metric_problem or weight_problem) and weight > 0 and math.isfinite(value):
            return _new_tuple(Decision, (value, ()))
    if ranks is None:
        ranks = range(len(table))
    # One pass over the table in the common case; the checks below run (and raise) only
    # when some row has a problem code or a fingerprint unlike the first row's.
    fingerprint = table[0][4]
    values: list[float] = []
    weights: list[float] = []
    nonfinite: list[int] = []
    for rank, (value, weight, metric_problem, weight_problem, row_fingerprint) in zip(ranks, table):
        if metric_problem or weight_problem or row_fingerprint != fingerprint:
            check_inputs(table, ranks)
            check_same_state(table, ranks)
        if weight > 0:  # a rank with weight 0 contributes nothing, not even its NaN
            if math.isfinite(value):
                values.append(value)
                weights.append(weight)
            else:
                nonfinite.append(rank)
                if nan_policy == "zero":
                    values.append(0.0)
                    weights.append(weight)
    if not values and not nonfinite:
        raise ValueError(
            "every rank passed weight 0, so there is no metric to step on; pass a positive "
            "weight on at least one rank"
        )
    if nonfinite:
        bad = tuple(nonfinite)
        if nan_policy == "raise":
            raise FloatingPointError(
                f"metric is NaN or Inf on {_ranks_text(bad)} and nan_policy='raise'"
            )
        if nan_policy == "skip":
            return Decision(None, bad)
        if nan_policy == "bad":
            return Decision(math.nan, bad)
        if nan_policy == "last":
            return Decision(last_finite, bad)
        if not values:  # "drop" with nothing finite left: a bad epoch, as plain torch does
            return Decision(math.nan, bad)
        return Decision(reduce(values, weights, reduction), bad)
    return _new_tuple(Decision, (reduce(values, weights, reduction), ()))
