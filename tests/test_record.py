"""A rank's record: every kind of metric and weight, and bad input that must not raise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distplateau._record import Problem, make_record


@pytest.mark.parametrize(
    "metric,expected",
    [(0.5, 0.5), (3, 3.0), (np.float32(0.25), 0.25), (np.float64(1.5), 1.5), (np.int64(4), 4.0),
     (torch.tensor(2.5), 2.5), (torch.tensor([2.5]), 2.5), (torch.tensor([[7]], dtype=torch.int8), 7.0),
     (torch.tensor(1.0, dtype=torch.bfloat16), 1.0), (np.array(6.0), 6.0), (np.array([[6.5]]), 6.5),
     (float("nan"), math.nan), (float("-inf"), -math.inf)],
)
def test_scalars_of_every_kind_become_the_value(metric, expected):
    r = make_record(metric, None, 9.0)
    assert (r.metric_problem, r.weight_problem, r.weight, r.fingerprint) == (0, 0, 1.0, 9.0)
    assert r.value == expected or (math.isnan(expected) and math.isnan(r.value))


def test_a_tensor_that_requires_grad_is_read_without_error():
    x = torch.tensor(2.0, requires_grad=True)
    assert make_record(x * 3, None, 0.0).value == 6.0


@pytest.mark.parametrize(
    "metric,problem,detail",
    [(None, Problem.METRIC_NONE, 0.0), ("1.0", Problem.METRIC_STR, 0.0), (True, Problem.METRIC_BOOL, 0.0),
     (np.bool_(True), Problem.METRIC_BOOL, 0.0), ([1.0], Problem.METRIC_NOT_A_NUMBER, 0.0),
     (1 + 2j, Problem.METRIC_NOT_A_NUMBER, 0.0), (torch.ones(3), Problem.METRIC_NOT_SCALAR, 3.0),
     (torch.ones(0), Problem.METRIC_NOT_SCALAR, 0.0), (np.zeros((2, 3)), Problem.METRIC_NOT_SCALAR, 6.0),
     (torch.tensor(1j), Problem.METRIC_NOT_A_NUMBER, 0.0), (np.array("x"), Problem.METRIC_NOT_A_NUMBER, 0.0)],
)
def test_bad_metrics_are_encoded_not_raised(metric, problem, detail):
    r = make_record(metric, None, 0.0)
    assert (r.metric_problem, r.value) == (problem, detail)


@pytest.mark.parametrize(
    "weight,problem",
    [(-1, Problem.WEIGHT_NEGATIVE), (math.nan, Problem.WEIGHT_NOT_FINITE),
     (math.inf, Problem.WEIGHT_NOT_FINITE), ("2", Problem.WEIGHT_NOT_A_NUMBER),
     (False, Problem.WEIGHT_NOT_A_NUMBER), (torch.ones(2), Problem.WEIGHT_NOT_SCALAR)],
)
def test_bad_weights_are_encoded_not_raised(weight, problem):
    assert make_record(1.0, weight, 0.0).weight_problem == problem


@pytest.mark.parametrize("weight", [0, 0.0, 3, np.int32(5), torch.tensor(12)])
def test_good_weights(weight):
    r = make_record(1.0, weight, 0.0)
    assert r.weight_problem == 0 and r.weight == float(weight)
