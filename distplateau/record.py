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

__all__ = ["Problem", "Record", "make_record"]


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


_OK = Problem.OK  # a module global: reading an enum member off its class runs Python code


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


def _scalar(x: Any, *, is_weight: bool) -> tuple[float, Problem]:
    """Turn a user-supplied number into a float, or name what is wrong with it."""
    if isinstance(x, float):  # the common case first: also catches numpy.float64
        return float(x), _OK  # a plain float, so state_dict() loads with weights_only=True
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            return float(x.numel()), Problem.WEIGHT_NOT_SCALAR if is_weight else Problem.METRIC_NOT_SCALAR
        item = x.item()  # float for floating dtypes, int for integer ones, bool, complex
        if type(item) is float:
            return item, _OK
        if type(item) is int:
            return float(item), _OK
        return 0.0, Problem.WEIGHT_NOT_A_NUMBER if is_weight else Problem.METRIC_NOT_A_NUMBER
    np = sys.modules.get("numpy")  # never imported here: if it is not loaded, x is no numpy object
    if isinstance(x, bool) or (np is not None and isinstance(x, np.bool_)):
        return 0.0, Problem.WEIGHT_NOT_A_NUMBER if is_weight else Problem.METRIC_BOOL
    if isinstance(x, numbers.Real):  # int, fractions, numpy integer/floating scalars
        return float(x), _OK
    if np is not None and isinstance(x, np.ndarray):
        if x.size != 1:
            return float(x.size), Problem.WEIGHT_NOT_SCALAR if is_weight else Problem.METRIC_NOT_SCALAR
        if np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating):
            return float(x.reshape(()).item()), _OK
    if is_weight:
        return 0.0, Problem.WEIGHT_NOT_A_NUMBER
    if x is None:
        return 0.0, Problem.METRIC_NONE
    if isinstance(x, str):
        return 0.0, Problem.METRIC_STR
    return 0.0, Problem.METRIC_NOT_A_NUMBER


def make_record(metrics: Any, weight: Any, fingerprint: float) -> Record:
    """Build this rank's record. Never raises for bad ``metrics`` or ``weight``."""
    if weight is None and type(metrics) is float:  # the hot path: a plain float metric, no weight
        return _new_tuple(Record, (metrics, 1.0, 0.0, 0.0, fingerprint))
    value, metric_problem = _scalar(metrics, is_weight=False)
    if weight is None:
        w, weight_problem = 1.0, _OK
    else:
        w, weight_problem = _scalar(weight, is_weight=True)
        if weight_problem is _OK:
            if not math.isfinite(w):
                weight_problem = Problem.WEIGHT_NOT_FINITE
            elif w < 0:
                weight_problem = Problem.WEIGHT_NEGATIVE
    return _new_tuple(Record, (value, w, _CODE[metric_problem], _CODE[weight_problem], fingerprint))


# Each problem's code as a float, indexed by the problem (an int): float(IntEnum) and hashing
# an enum member both run Python code, indexing a tuple does not.
_CODE = tuple(float(code) for code in range(len(Problem)))
assert all(int(problem) == code for code, problem in enumerate(Problem))
# NamedTuple's generated __new__ is a Python function; tuple.__new__ builds the same Record
# in a fraction of the time (make_record runs on every step).
_new_tuple = tuple.__new__
