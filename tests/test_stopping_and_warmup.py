"""Early stopping (``stop_patience``/``should_stop``) and warmup in one process; the same on
real ranks is in tests/distributed_checks.py."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from distplateau import DistributedReduceLROnPlateau
from tests.reliability.cases import last_lr


def optimizer(lr: float = 1.0, groups: int = 1) -> torch.optim.Optimizer:
    params = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr * (g + 1)} for g in range(groups)]
    return torch.optim.SGD(params, lr=lr)


def keras_stop_step(values: list[float], patience: int, mode: str = "min") -> int | None:
    """The 1-based evaluation at which Keras' and Lightning's ``EarlyStopping(patience,
    min_delta=0)`` stop: ``wait`` evaluations in a row without a strict improvement."""
    best, wait = (math.inf if mode == "min" else -math.inf), 0
    for i, value in enumerate(values, 1):
        if (value < best) if mode == "min" else (value > best):
            best, wait = value, 0
        else:
            wait += 1  # NaN compares false: no improvement
        if wait >= patience:
            return i
    return None


def first_stop(s: DistributedReduceLROnPlateau, values: list[float]) -> int | None:
    """The 1-based call after which ``s.should_stop`` turned ``True``."""
    for i, value in enumerate(values, 1):
        s.step(value)
        if s.should_stop:
            return i
    return None


@pytest.mark.parametrize("seed", range(8))
def test_should_stop_is_keras_and_lightning_early_stopping_on_the_global_metric(seed: int) -> None:
    rng = random.Random(seed)
    mode, patience, stop_patience = rng.choice(["min", "max"]), rng.randint(0, 2), rng.randint(1, 6)
    values = [rng.choice([rng.random(), 0.5, math.nan]) for _ in range(40)]
    s = DistributedReduceLROnPlateau(optimizer(), mode=mode, patience=patience, threshold=0.0,
                                     threshold_mode="abs", stop_patience=stop_patience, nan_policy="bad")
    assert first_stop(s, values) == keras_stop_step(values, stop_patience, mode)


def test_learning_rate_reductions_do_not_reset_the_stopping_count() -> None:
    s = DistributedReduceLROnPlateau(optimizer(), factor=0.5, patience=1, stop_patience=5)
    stops = []
    for value in [1.0, 2.0, 2.0, 2.0, 2.0, 2.0]:
        s.step(value)
        stops.append((s.get_last_lr()[0], s.num_bad_epochs, s.steps_since_best, s.should_stop))
    # two reductions (num_bad_epochs back to 0 each time); the stopping count goes on
    assert stops == [(1.0, 0, 0, False), (1.0, 1, 1, False), (0.5, 0, 2, False), (0.5, 1, 3, False),
                     (0.25, 0, 4, False), (0.25, 1, 5, True)]


def test_a_step_the_nan_policy_skips_does_not_count_towards_stopping() -> None:
    s = DistributedReduceLROnPlateau(optimizer(), stop_patience=2, nan_policy="skip")
    for value in [1.0, 2.0, math.nan, math.nan, 1.0]:
        s.step(value)
    assert (s.steps_since_best, s.should_stop) == (2, True)


def test_without_stop_patience_should_stop_is_never_true() -> None:
    s = DistributedReduceLROnPlateau(optimizer())
    for _ in range(50):
        s.step(1.0)
    assert not s.should_stop and s.steps_since_best == 49


def test_stopping_state_is_in_the_state_dict_and_resumes_exactly() -> None:
    values = [3.0, 2.0, 2.5, 2.5, 1.0, 1.5, 1.5, 1.5, 1.5]
    whole = DistributedReduceLROnPlateau(optimizer(), patience=1, stop_patience=3)
    first = DistributedReduceLROnPlateau(optimizer(), patience=1, stop_patience=3)
    for v in values[:4]:
        first.step(v)
    state = first.state_dict()
    assert (state["stop_patience"], state["steps_since_best"]) == (3, 2)
    resumed = DistributedReduceLROnPlateau(optimizer(first.get_last_lr()[0]), patience=1, stop_patience=3)
    resumed.load_state_dict(state)
    assert first_stop(whole, values) == 4 + first_stop(resumed, values[4:]) == 8


def test_fingerprint_covers_the_stopping_and_warmup_state() -> None:
    a = DistributedReduceLROnPlateau(optimizer(), stop_patience=3, warmup=2)
    b = DistributedReduceLROnPlateau(optimizer(), stop_patience=3, warmup=2)
    assert a.fingerprint() == b.fingerprint()
    b.steps_since_best = 1
    assert a.fingerprint() != b.fingerprint()
    for name, value in [("stop_patience", 4), ("warmup", 3), ("warmup_start_factor", 0.5), ("warmup_lrs", [2.0])]:
        c = DistributedReduceLROnPlateau(optimizer(), stop_patience=3, warmup=2)
        setattr(c, name, value)
        assert a.fingerprint() != c.fingerprint(), name


@pytest.mark.parametrize("kwargs, message", [
    ({"stop_patience": 0}, "stop_patience must be a whole number >= 1 or None; got 0"),
    ({"stop_patience": 2.5}, "stop_patience must be a whole number >= 1 or None; got 2.5"),
    ({"warmup": -1}, "warmup must be a whole number of steps >= 0; got -1"),
    ({"warmup": 2, "warmup_start_factor": 0.0}, "warmup_start_factor must be in (0, 1]; got 0.0"),
    ({"warmup": 2, "warmup_start_factor": 1.5}, "warmup_start_factor must be in (0, 1]; got 1.5"),
])
def test_bad_stopping_and_warmup_arguments_say_what_is_allowed(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        DistributedReduceLROnPlateau(optimizer(), **kwargs)
    assert str(err.value) == message


def test_warmup_ramps_linearly_then_torch_takes_over_from_a_fresh_start() -> None:
    """After ``warmup`` steps the learning rates are back at their start, ``best`` has
    not seen the warmup metrics, and from there every step is torch's own scheduler's."""
    rng = random.Random(7)
    values = [rng.choice([rng.random(), 0.5, 0.25]) for _ in range(30)]
    ours = DistributedReduceLROnPlateau(optimizer(0.8, groups=2), factor=0.5, patience=1, cooldown=1,
                                        warmup=4, warmup_start_factor=0.25)
    assert ours.get_last_lr() == [0.2, 0.4]  # the factor applies at construction, like torch's LinearLR
    lrs = []
    for value in values[:4]:
        ours.step(value)
        lrs.append(ours.get_last_lr())
    expected = [[0.35, 0.7], [0.5, 1.0], [0.65, 1.3], [0.8, 1.6]]
    assert [lr for step in lrs for lr in step] == pytest.approx([lr for step in expected for lr in step], rel=1e-12)
    assert lrs[-1] == [0.8, 1.6]  # exactly the start values again
    assert (ours.best, ours.num_bad_epochs, ours.cooldown_counter, ours.last_epoch) == (math.inf, 0, 0, 4)
    assert ours.last_global_metric == values[3]
    ref = ReduceLROnPlateau(optimizer(0.8, groups=2), factor=0.5, patience=1, cooldown=1)
    for value in values[4:]:
        ours.step(value)
        ref.step(value)
        assert (ours.get_last_lr(), ours.best, ours.num_bad_epochs, ours.cooldown_counter) == (
            last_lr(ref), ref.best, ref.num_bad_epochs, ref.cooldown_counter)
    assert ours.last_epoch == ref.last_epoch + 4


def test_without_warmup_no_learning_rate_is_kept_for_it() -> None:
    # A rank's starting learning rates may differ until a strategy broadcasts rank 0's optimizer.
    assert DistributedReduceLROnPlateau(optimizer()).warmup_lrs == []


def test_warmup_start_factor_one_holds_the_plateau_logic_off_without_a_ramp() -> None:
    s = DistributedReduceLROnPlateau(optimizer(), patience=0, warmup=3, warmup_start_factor=1.0, stop_patience=1)
    for value in [1.0, 2.0, 3.0]:
        s.step(value)
        assert (s.get_last_lr(), s.best, s.should_stop) == ([1.0], math.inf, False)
    s.step(4.0)
    assert (s.get_last_lr(), s.best) == ([1.0], 4.0)  # the first step after warmup sets best


def test_a_run_resumed_in_the_middle_of_warmup_continues_its_ramp() -> None:
    values = [1.0, 0.9, 0.8, 0.7, 0.7, 0.7]
    whole = DistributedReduceLROnPlateau(optimizer(), patience=0, warmup=4)
    trajectory = []
    for v in values:
        whole.step(v)
        trajectory.append(whole.get_last_lr())
    first = DistributedReduceLROnPlateau(optimizer(), patience=0, warmup=4)
    for v in values[:2]:
        first.step(v)
    opt = optimizer()
    opt.load_state_dict(first.optimizer.state_dict())
    resumed = DistributedReduceLROnPlateau(opt, patience=0, warmup=4)  # the constructor's ramp start...
    resumed.load_state_dict(first.state_dict())  # ... is undone by the saved state
    opt.load_state_dict(first.optimizer.state_dict())
    rest = []
    for v in values[2:]:
        resumed.step(v)
        rest.append(resumed.get_last_lr())
    assert trajectory[2:] == rest
