"""The decision every rank takes from the gathered table: pure functions, no I/O.

Every rank calls :func:`decide` on the same table (one row per rank, see
``Record`` in ``_record.py``), so every rank reaches the same result bit for bit:
the same exception, or the same value for ``ReduceLROnPlateau.step``, or "change nothing".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple, get_args

from ._messages import check_choice, ranks_text
from ._record import Problem

__all__ = ["NanPolicy", "Reduction", "Decision", "MetricMissingError", "NAN_POLICIES", "REDUCTIONS", "decide"]

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


_MISSING = frozenset({Problem.METRIC_MISSING, Problem.METRIC_MISSING_STRICT})


class MetricMissingError(ValueError):
    """Raised on every rank when ranks stepped with a :class:`~distplateau._record.Missing`
    weight and ``strict``: ``ranks`` lack the metric while others have it, or (``everywhere``)
    no rank has it."""

    def __init__(self, ranks: Sequence[int], everywhere: bool) -> None:
        self.ranks, self.everywhere = tuple(ranks), everywhere
        where = "every rank" if everywhere else f"{ranks_text(ranks)} but present on the others"
        super().__init__(f"the metric is missing on {where}")


class Decision(NamedTuple):
    """What the ranks agreed on.

    ``value`` is what the parent ``ReduceLROnPlateau.step`` gets (NaN makes it a bad
    epoch), or ``None`` when the step must change nothing. ``nonfinite_ranks`` lists the
    contributing ranks whose metric was NaN or +/-Inf, for reporting.
    """

    value: float | None
    nonfinite_ranks: tuple[int, ...] = ()


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
    check_choice("reduction", reduction, REDUCTIONS)
    if not values:
        raise ValueError("nothing to reduce")
    if len(values) == 1:
        return values[0]  # exactly, whatever the reduction: math.fsum([-0.0]) would give 0.0
    if reduction == "sum":
        return _fsum(values)
    if reduction == "min":
        return min(values)
    if reduction == "max":
        return max(values)
    if all(value == values[0] for value in values):
        return values[0]  # fsum(w * v) / fsum(w) could round it
    return _weighted_mean(values, weights)


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


# What each problem code of a record says; ``detail`` is the value or weight field, which
# carries the element count or the offending weight (see ``Record``).
_PROBLEM_TEXT = {
    Problem.METRIC_NONE: "metric is None",
    Problem.METRIC_STR: "metric is a str",
    Problem.METRIC_BOOL: "metric is a bool",
    Problem.METRIC_NOT_A_NUMBER: "metric is not a real number",
    Problem.METRIC_NOT_SCALAR: "metric has {detail:.0f} elements, not 1",
    Problem.WEIGHT_NOT_A_NUMBER: "weight is not a real number",
    Problem.WEIGHT_NOT_SCALAR: "weight has {detail:.0f} elements, not 1",
    Problem.WEIGHT_NEGATIVE: "weight is negative ({detail!r})",
    Problem.WEIGHT_NOT_FINITE: "weight is not finite ({detail!r})",
}


def check_inputs(table: Sequence[Row], ranks: Sequence[int]) -> None:
    """Raise the same error on every rank if any rank's metric or weight was unusable.

    Raises:
        TypeError: a metric or weight on some rank is not a real number.
        ValueError: a metric or weight has more than one element, or a weight is negative
            or not finite.
    """
    problems: list[tuple[str, Problem]] = []
    for rank, (value, weight, metric_problem, weight_problem, _) in zip(ranks, table):
        for code, detail in ((metric_problem, value), (weight_problem, weight)):
            if code and code not in _MISSING:
                problem = Problem(int(code))
                problems.append((_PROBLEM_TEXT[problem].format(detail=detail) + f" on rank {rank}", problem))
    if problems:
        error = TypeError if any(p in _TYPE_PROBLEMS for _, p in problems) else ValueError
        raise error("; ".join(text for text, _ in problems) + f": {_HINT}")


def check_same_state(table: Sequence[Row], ranks: Sequence[int]) -> None:
    """Raise on every rank if the ranks entered ``step`` with different scheduler states.

    Raises:
        RuntimeError: naming which ranks agree with which.
    """
    groups: dict[float, list[int]] = {}
    for rank, row in zip(ranks, table):
        groups.setdefault(row[4], []).append(rank)
    if len(groups) == 1:
        return
    parts = " vs ".join(ranks_text(group) for group in groups.values())
    raise RuntimeError(
        f"scheduler state differs across ranks ({parts}): best, num_bad_epochs, "
        "cooldown_counter, last_epoch, settings or learning rates are not the same "
        "everywhere. Construct the scheduler with the same arguments on every rank and load "
        "the same state_dict on every rank (not only on rank 0); to give every rank rank "
        f"{ranks[0]}'s scheduler state and learning rates now, call "
        f"scheduler.sync_state(src={ranks[0]}) on every rank."
    )


def check_missing(table: Sequence[Row], ranks: Sequence[int]) -> bool:
    """Whether any rank has a metric, given the ranks that stepped with a ``Missing`` weight.

    Raises:
        MetricMissingError: on every rank, if they stepped with ``strict`` and the metric is
            missing on every rank, or on ranks that had validation samples while others have it.
    """
    missing = [(rank, row) for rank, row in zip(ranks, table) if row[2] in _MISSING]
    strict = any(row[2] == Problem.METRIC_MISSING_STRICT for _, row in missing)
    if len(missing) == len(table):
        if strict:
            raise MetricMissingError([rank for rank, _ in missing], everywhere=True)
        return False
    lacking = [rank for rank, row in missing if row[0] != 0]  # a rank without samples has nothing to log
    if strict and lacking:
        raise MetricMissingError(lacking, everywhere=False)
    return True


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
        MetricMissingError: ranks stepped with a strict ``Missing`` weight (see
            :func:`check_missing`).

    Example:
        >>> nan = float("nan")
        >>> table = [(1.0, 2.0, 0, 0, 7.0), (nan, 1.0, 0, 0, 7.0), (4.0, 1.0, 0, 0, 7.0)]
        >>> decide(table, reduction="mean", nan_policy="drop", last_finite=None)
        Decision(value=2.0, nonfinite_ranks=(1,))
        >>> decide(table, reduction="mean", nan_policy="skip", last_finite=None)
        Decision(value=None, nonfinite_ranks=(1,))
    """
    if ranks is None:
        ranks = range(len(table))
    check_inputs(table, ranks)
    check_same_state(table, ranks)
    if not check_missing(table, ranks):
        return Decision(None)  # the metric is missing on every rank: change nothing
    values: list[float] = []
    weights: list[float] = []
    nonfinite: list[int] = []
    for rank, (value, weight, *_) in zip(ranks, table):
        if weight == 0:
            continue  # a rank with weight 0 contributes nothing, not even its NaN
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
    bad = tuple(nonfinite)
    if bad:
        if nan_policy == "raise":
            raise FloatingPointError(f"metric is NaN or Inf on {ranks_text(bad)} and nan_policy='raise'")
        if nan_policy == "skip":
            return Decision(None, bad)
        if nan_policy == "bad":
            return Decision(math.nan, bad)
        if nan_policy == "last":
            return Decision(last_finite, bad)
    if not values:  # "drop" with nothing finite left: a bad epoch, as plain torch does
        return Decision(math.nan, bad)
    return Decision(reduce(values, weights, reduction), bad)
