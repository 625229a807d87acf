"""What one rank contributes to a step: a fixed-size record of plain floats.

Nothing here raises on bad user input. A rank whose metric or weight is unusable still
sends a record, with the problem encoded in it, so that every rank learns about the
problem from the same gathered table and raises the same error after the one collective.
A rank that raised *before* the collective would leave the others waiting in it.
"""

from __future__ import annotations

import math
import numbers
import sys
from enum import IntEnum
from typing import Any, NamedTuple

import torch

__all__ = ["Missing", "Problem", "Record", "Window", "make_record"]


class Problem(IntEnum):
    """Why a rank's metric or weight cannot be used; ``OK`` when it can."""

    OK = 0
    METRIC_NONE = 1
    METRIC_STR = 2
    METRIC_BOOL = 3
    METRIC_NOT_A_NUMBER = 4  # any other type: list, dict, complex, ...
    METRIC_NOT_SCALAR = 5  # tensor/array with != 1 element; detail: element count
    WEIGHT_NOT_A_NUMBER = 6
    WEIGHT_NOT_SCALAR = 7  # detail: element count
    WEIGHT_NEGATIVE = 8  # detail: the weight
    WEIGHT_NOT_FINITE = 9  # detail: the weight
    METRIC_MISSING = 10  # not logged on this rank: contributes nothing; detail: its samples (-1: unknown)
    METRIC_MISSING_STRICT = 11  # the same, and the ranks must raise if other ranks have it


class Record(NamedTuple):
    """One rank's row of the gathered table. Every field is a float so that the whole
    record travels as a single float64 tensor in a single collective.

    ``value`` is the metric (NaN/Inf kept as they are). When ``metric_problem`` is set,
    ``value`` carries that problem's detail instead; likewise ``weight`` for
    ``weight_problem``. ``fingerprint`` is a 53-bit digest of the scheduler state the
    rank had when it entered ``step`` (see ``DistributedReduceLROnPlateau``).
    """

    value: float
    weight: float
    metric_problem: float
    weight_problem: float
    fingerprint: float


class Missing(NamedTuple):
    """The weight of a rank that has no metric to contribute to this step (Lightning: the
    monitored metric was not logged on it). Travels in the same record as a present metric,
    so that the ranks learn who has it inside the step's one collective."""

    samples: float  # the rank's validation samples; a rank with none is not missing anything; -1: unknown
    strict: bool  # raise on every rank if some ranks have the metric and this one does not


def _scalar(x: Any, *, is_weight: bool) -> tuple[float, Problem]:
    """Turn a user-supplied number into a float, or name what is wrong with it."""
    if isinstance(x, float):  # also numpy.float64, a float subclass
        return float(x), Problem.OK  # a plain float, so state_dict() loads with weights_only=True
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            return float(x.numel()), Problem.WEIGHT_NOT_SCALAR if is_weight else Problem.METRIC_NOT_SCALAR
        item = x.item()  # float for floating dtypes, int for integer ones, bool, complex
        if type(item) is float:
            return item, Problem.OK
        if type(item) is int:
            return float(item), Problem.OK
        return 0.0, Problem.WEIGHT_NOT_A_NUMBER if is_weight else Problem.METRIC_NOT_A_NUMBER
    np = sys.modules.get("numpy")  # never imported here: if it is not loaded, x is no numpy object
    if isinstance(x, bool) or (np is not None and isinstance(x, np.bool_)):
        return 0.0, Problem.WEIGHT_NOT_A_NUMBER if is_weight else Problem.METRIC_BOOL
    if isinstance(x, numbers.Real):  # int, fractions, numpy integer/floating scalars
        return float(x), Problem.OK
    if np is not None and isinstance(x, np.ndarray):
        if x.size != 1:
            return float(x.size), Problem.WEIGHT_NOT_SCALAR if is_weight else Problem.METRIC_NOT_SCALAR
        if np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating):
            return float(x.reshape(()).item()), Problem.OK
    if is_weight:
        return 0.0, Problem.WEIGHT_NOT_A_NUMBER
    if x is None:
        return 0.0, Problem.METRIC_NONE
    if isinstance(x, str):
        return 0.0, Problem.METRIC_STR
    return 0.0, Problem.METRIC_NOT_A_NUMBER


def make_record(metrics: Any, weight: Any, fingerprint: float) -> Record:
    """Build this rank's record. Never raises for bad ``metrics`` or ``weight``."""
    if isinstance(weight, Missing):
        code = Problem.METRIC_MISSING_STRICT if weight.strict else Problem.METRIC_MISSING
        return Record(float(weight.samples), 0.0, float(code), float(Problem.OK), fingerprint)
    value, metric_problem = _scalar(metrics, is_weight=False)
    if weight is None:
        w, weight_problem = 1.0, Problem.OK
    else:
        w, weight_problem = _scalar(weight, is_weight=True)
        if weight_problem is Problem.OK:
            if not math.isfinite(w):
                weight_problem = Problem.WEIGHT_NOT_FINITE
            elif w < 0:
                weight_problem = Problem.WEIGHT_NEGATIVE
    return Record(value, w, float(metric_problem), float(weight_problem), fingerprint)


class Window(NamedTuple):
    """This rank's share of an unfinished window (``accumulation_size`` > 1): what its calls
    added, kept locally with no collective, until the window's last call sends it as one
    :class:`Record` (:meth:`record`). Immutable: :meth:`add` returns the next window, so that
    a copied scheduler never shares its sums with the original.

    A call with weight 0 contributes nothing, not even its NaN, as in a step.
    """

    total: float = 0.0  #: sum of value * weight over the finite calls
    weight: float = 0.0  #: sum of the weights of every call with a finite or non-finite value
    finite_weight: float = 0.0  #: sum of the weights of the finite calls
    nonfinite: bool = False  #: a call with a positive weight had a NaN or +/-Inf value
    problem: Record | None = None  #: the first call with an unusable metric or weight
    missing: Record | None = None  #: the last call without the metric (Lightning's ``Missing`` weight)

    def add(self, record: Record) -> Window:
        """The window after one more call, given that call's record (from :func:`make_record`)."""
        if record.metric_problem in (Problem.METRIC_MISSING, Problem.METRIC_MISSING_STRICT):
            return self._replace(missing=record)
        if record.metric_problem or record.weight_problem:
            return self if self.problem is not None else self._replace(problem=record)
        value, weight = record.value, record.weight
        if weight == 0:
            return self
        if not math.isfinite(value):
            return self._replace(weight=self.weight + weight, nonfinite=True)
        return self._replace(total=self.total + value * weight, weight=self.weight + weight,
                             finite_weight=self.finite_weight + weight)

    def record(self, fingerprint: float) -> Record:
        """The window as one record: this rank's weighted mean over its calls and their total
        weight, so that the ranks' weighted mean is the mean over every call of every rank. A
        NaN if one of its calls was not finite (the NaN policy then acts on the whole window of
        this rank); the first unusable input, if any, so that every rank raises its error; a
        ``Missing`` record if no call had the metric."""
        if self.problem is not None:
            return self.problem._replace(fingerprint=fingerprint)
        if self.weight == 0 and self.missing is not None:
            return self.missing._replace(fingerprint=fingerprint)
        if self.nonfinite:
            value = math.nan
        else:
            value = self.total / self.finite_weight if self.finite_weight else 0.0
        return Record(value, self.weight, float(Problem.OK), float(Problem.OK), fingerprint)
