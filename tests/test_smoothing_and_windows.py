"""``smoothing_factor`` (schnetpack's moving average) and ``accumulation_size`` (optax's windows)
in one process, against the two references (tests/plateau_references.py); the same on real
ranks, with the exact global values, is in tests/distributed_checks.py."""

from __future__ import annotations

import copy
import io
import math
import pickle
import random

import pytest
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from distplateau import DistributedReduceLROnPlateau
from tests.plateau_references import SchnetpackReduceLROnPlateau, optax_window_means
from tests.reliability.cases import last_lr
from tests.test_stopping_and_warmup import first_stop


def optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def ours(**kwargs) -> DistributedReduceLROnPlateau:
    return DistributedReduceLROnPlateau(optimizer(), **kwargs)


def state(s: ReduceLROnPlateau) -> tuple:
    return (last_lr(s), s.best, s.num_bad_epochs, s.cooldown_counter, s.last_epoch)


def noisy(seed: int, n: int = 60) -> list[float]:
    """A decreasing loss with noise, as a small validation set gives."""
    rng = random.Random(seed)
    return [2.0 / (1 + 0.1 * t) + rng.gauss(0, 0.15) for t in range(n)]


# ------------------------------------------------------------------ smoothing_factor


@pytest.mark.parametrize("seed", range(6))
def test_smoothing_is_schnetpacks_moving_average_bit_for_bit(seed: int) -> None:
    rng = random.Random(seed)
    kwargs = dict(mode=rng.choice(["min", "max"]), factor=0.5, patience=rng.randint(0, 3),
                  threshold=rng.choice([0.0, 1e-3, 0.05]), threshold_mode=rng.choice(["rel", "abs"]),
                  cooldown=rng.randint(0, 2), smoothing_factor=rng.choice([0.5, 0.8, 0.9, 0.37]))
    s, ref = ours(**kwargs), SchnetpackReduceLROnPlateau(optimizer(), **kwargs)
    for value in noisy(seed):
        s.step(value)
        ref.step(value)
        assert state(s) == state(ref)
        assert s.last_smoothed_metric == ref.ema_loss and s.last_global_metric == value
    assert last_lr(s)[0] < 1.0  # the schedule did reduce: the comparison covered reductions


def test_smoothing_factor_0_steps_on_the_values_as_torch_does() -> None:
    values = [1.0, 0.9, math.nan, 0.95, 0.9, 0.91, math.nan, 0.5, 0.6, 0.6, 0.6]
    s, ref = ours(patience=1, smoothing_factor=0.0), ReduceLROnPlateau(optimizer(), patience=1)
    for value in values:
        s.step(value)
        ref.step(value)
        assert state(s) == state(ref)
    assert s.last_smoothed_metric == 0.6


@pytest.mark.parametrize("policy", ["drop", "bad"])
def test_a_nonfinite_global_value_is_a_bad_epoch_and_leaves_the_average_as_it_was(policy: str) -> None:
    s = ours(patience=5, smoothing_factor=0.5, nan_policy=policy)
    for value in (1.0, 0.5):
        s.step(value)
    assert s.last_smoothed_metric == 0.75 and s.num_bad_epochs == 0
    s.step(math.nan)  # "drop" with nothing finite left, or "bad": a bad epoch, as without smoothing
    assert math.isnan(s.last_global_metric) and s.last_smoothed_metric == 0.75
    assert s.num_bad_epochs == 1 and s.best == 0.75
    s.step(0.25)  # schnetpack would step on NaN from here on: its average took the NaN
    assert s.last_smoothed_metric == 0.5 and s.best == 0.5 and s.num_bad_epochs == 0


def test_nan_policies_skip_last_zero_and_raise_compose_with_the_average() -> None:
    skip = ours(smoothing_factor=0.5, nan_policy="skip")
    skip.step(1.0)
    before = skip.state_dict()
    skip.step(math.nan)  # changes nothing, the average included
    assert skip.state_dict() == before

    last = ours(smoothing_factor=0.5, nan_policy="last")
    last.step(1.0)
    last.step(0.5)
    last.step(math.inf)  # steps on the last finite global value, which the average takes in again
    assert (last.last_global_metric, last.last_smoothed_metric) == (0.5, 0.625)

    zero = ours(smoothing_factor=0.5, nan_policy="zero")
    zero.step(1.0)
    zero.step(math.nan)  # counts as 0, a value like any other
    assert (zero.last_global_metric, zero.last_smoothed_metric) == (0.0, 0.5)

    strict = ours(smoothing_factor=0.5, nan_policy="raise")
    strict.step(1.0)
    with pytest.raises(FloatingPointError):
        strict.step(math.nan)
    assert strict.last_smoothed_metric == 1.0 and strict.last_epoch == 1


def test_warmup_steps_stay_out_of_the_average() -> None:
    values = noisy(3, 30)
    s = ours(factor=0.5, patience=1, warmup=4, warmup_start_factor=0.5, smoothing_factor=0.8)
    ref = SchnetpackReduceLROnPlateau(optimizer(), factor=0.5, patience=1, smoothing_factor=0.8)
    for step, value in enumerate(values, 1):
        s.step(value)
        if step <= 4:
            assert s.last_smoothed_metric is None and s.last_global_metric == value
            continue
        ref.step(value)  # schnetpack from the end of warmup: the first step after it starts the average
        assert (last_lr(s), s.best, s.num_bad_epochs, s.last_smoothed_metric) == (
            last_lr(ref), ref.best, ref.num_bad_epochs, ref.ema_loss)


def test_stop_patience_counts_steps_without_a_better_average() -> None:
    values = [1.0, 0.8, 1.2, 0.7, 1.1, 0.75, 1.05, 0.8, 1.0, 0.9, 0.95, 0.92]
    s = ours(patience=100, threshold=0.0, smoothing_factor=0.5, stop_patience=3)
    ref = SchnetpackReduceLROnPlateau(optimizer(), patience=100, threshold=0.0, smoothing_factor=0.5)
    averages, stopped_at = [], None
    for step, value in enumerate(values, 1):
        s.step(value)
        ref.step(value)
        averages.append(ref.ema_loss)
        if s.should_stop and stopped_at is None:
            stopped_at = step
    # on the average: best 0.9 at step 2, 0.875 at step 4 (0.5 * 1.05 + 0.5 * 0.7), 0.8375 at
    # step 6, then 0.94375, 0.871875, 0.9359375: 3 steps without a better one
    best, wait, expected = math.inf, 0, None
    for step, average in enumerate(averages, 1):
        best, wait = (average, 0) if average < best else (best, wait + 1)
        if wait >= 3 and expected is None:
            expected = step
    assert stopped_at == expected == 9
    raw = ours(patience=100, threshold=0.0, stop_patience=3)
    assert first_stop(raw, values) == 7  # on the values themselves: 0.7 at step 4, then three worse ones


def test_resume_mid_run_is_exact_with_weights_only() -> None:
    values = noisy(5, 40)
    kwargs = dict(factor=0.5, patience=2, cooldown=1, smoothing_factor=0.9, stop_patience=8)
    uninterrupted = ours(**kwargs)
    first = ours(**kwargs)
    for value in values[:17]:
        uninterrupted.step(value)
        first.step(value)
    buffer = io.BytesIO()
    torch.save({"scheduler": first.state_dict(), "optimizer": first.optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = ours(factor=0.5, patience=2)  # the settings come from the state dict
    resumed.optimizer.load_state_dict(saved["optimizer"])
    resumed.load_state_dict(saved["scheduler"])
    assert resumed.smoothing_factor == 0.9 and resumed.last_smoothed_metric == first.last_smoothed_metric
    for value in values[17:]:
        uninterrupted.step(value)
        resumed.step(value)
        assert resumed.state_dict() == uninterrupted.state_dict()


def test_schnetpack_state_dict_loads_with_its_average() -> None:
    values = noisy(7, 30)
    theirs = SchnetpackReduceLROnPlateau(optimizer(), factor=0.5, patience=1, smoothing_factor=0.8)
    for value in values[:10]:
        theirs.step(value)
    s = ours(factor=0.5, patience=1)
    s.load_state_dict(theirs.state_dict())
    s.optimizer.load_state_dict(theirs.optimizer.state_dict())
    assert (s.smoothing_factor, s.last_smoothed_metric) == (0.8, theirs.ema_loss) and "ema_loss" not in vars(s)
    for value in values[10:]:
        s.step(value)
        theirs.step(value)
        assert state(s) == state(theirs) and s.last_smoothed_metric == theirs.ema_loss
    theirs.ema_loss = math.nan  # schnetpack's average after a NaN metric: our average starts again
    s.load_state_dict(theirs.state_dict())
    assert s.last_smoothed_metric is None


def test_fingerprint_tells_apart_the_smoothing_and_the_window() -> None:
    a, b = ours(smoothing_factor=0.5), ours(smoothing_factor=0.5)
    assert a.fingerprint() == b.fingerprint() != ours().fingerprint()
    a.step(1.0)
    b.step(1.0)
    b.load_state_dict({**b.state_dict(), "last_smoothed_metric": 2.0})
    assert a.fingerprint() != b.fingerprint()
    c, d = ours(accumulation_size=3), ours(accumulation_size=3)
    c.step(1.0)
    d.step(5.0, weight=2)  # this rank's sums differ, its window count does not: the same state
    assert c.fingerprint() == d.fingerprint() != ours(accumulation_size=3).fingerprint()


@pytest.mark.parametrize("kwargs, text", [
    (dict(smoothing_factor=1.0), "smoothing_factor must be a number in [0, 1)"),
    (dict(smoothing_factor=-0.1), "smoothing_factor must be"),
    (dict(smoothing_factor=math.nan), "smoothing_factor must be"),
    (dict(smoothing_factor=True), "smoothing_factor must be"),
    (dict(smoothing_factor="0.5"), "smoothing_factor must be"),
    (dict(accumulation_size=0), "accumulation_size must be a whole number of calls >= 1"),
    (dict(accumulation_size=2.0), "accumulation_size must be"),
    (dict(accumulation_size=True), "accumulation_size must be"),
])
def test_settings_out_of_range_are_refused(kwargs: dict, text: str) -> None:
    with pytest.raises(ValueError, match=text.replace("[", r"\[").replace(")", r"\)")):
        ours(**kwargs)
    s = ours()
    with pytest.raises(ValueError, match=text.replace("[", r"\[").replace(")", r"\)")):
        s.load_state_dict({**s.state_dict(), **kwargs})
    with pytest.raises(ValueError, match="window_calls must be in"):
        s.load_state_dict({**s.state_dict(), "accumulation_size": 4, "window_calls": 4})


# ------------------------------------------------------------------ accumulation_size


@pytest.mark.parametrize("size", [2, 5, 7])
def test_window_means_are_optax_accumulation_and_the_plateau_test_is_torchs(size: int) -> None:
    values = noisy(size, 140)
    s = ours(factor=0.5, patience=1, accumulation_size=size)
    ref = ReduceLROnPlateau(optimizer(), factor=0.5, patience=1)  # torch's test on the window means
    expected = optax_window_means(values, size)
    means = []
    for call, value in enumerate(values, 1):
        s.step(value)
        assert s.window_calls == call % size
        if call % size == 0:
            means.append(s.last_global_metric)
            ref.step(s.last_global_metric)
            assert state(s) == state(ref)
        elif call > size:
            assert s.last_global_metric == means[-1]
    assert means == pytest.approx(expected, rel=1e-13, abs=0)  # a sum / n here, a running mean there
    assert s.last_epoch == len(expected) and last_lr(s)[0] < 1.0
    quarters = [0.25 * (i % 7) for i in range(4 * size)]  # values whose sums are exact: the same means exactly
    t = ours(accumulation_size=size)
    got = []
    for value in quarters:
        t.step(value)
        if t.window_calls == 0:
            got.append(t.last_global_metric)
    assert got == optax_window_means(quarters, size)


def test_a_window_is_the_weighted_mean_over_its_calls() -> None:
    s = ours(accumulation_size=3)
    for value, weight in ((1.0, 2), (4.0, 1), (10.0, 0)):  # weight 0: contributes nothing
        s.step(value, weight=weight)
    assert s.last_global_metric == 2.0
    s.step(math.nan, weight=0)  # not even its NaN
    s.step(3.0, weight=3)
    s.step(7.0, weight=1)
    assert s.last_global_metric == 4.0 and s.last_epoch == 2


def test_a_call_inside_a_window_changes_nothing_but_the_count() -> None:
    s = ours(patience=0, accumulation_size=4)
    for value in (1.0,) * 4 + (5.0,) * 4:  # a window that sets best, then a worse one: a reduction
        s.step(value)
    assert last_lr(s) == [0.1]
    before = {k: v for k, v in s.state_dict().items() if k != "window_calls"}
    lr = last_lr(s)
    for call in range(3):
        s.step(100.0)
        assert s.window_calls == call + 1
        assert {k: v for k, v in s.state_dict().items() if k != "window_calls"} == before and last_lr(s) == lr
    s.step(100.0)
    assert s.window_calls == 0 and s.last_global_metric == 100.0 and s.last_epoch == before["last_epoch"] + 1


@pytest.mark.parametrize("policy, expected", [
    ("drop", "bad"),  # one process: the rank's window left out, nothing finite remains
    ("bad", "bad"),
    ("skip", "nothing"),
    ("last", 2.0),
    ("zero", 0.0),
    ("raise", FloatingPointError),
])
def test_a_window_with_a_nonfinite_call_goes_through_the_nan_policy(policy: str, expected: object) -> None:
    s = ours(patience=5, accumulation_size=3, nan_policy=policy)
    for value in (1.0, 2.0, 3.0):
        s.step(value)
    before = s.state_dict()
    s.step(1.0)
    s.step(math.nan)  # one non-finite call makes the whole window of this rank non-finite
    if expected is FloatingPointError:
        with pytest.raises(FloatingPointError):
            s.step(1.0)
        assert s.state_dict() == before  # the window dropped, the state as it was
        return
    s.step(1.0)
    assert s.window_calls == 0
    if expected == "nothing":
        assert s.state_dict() == before
    elif expected == "bad":
        assert math.isnan(s.last_global_metric) and s.num_bad_epochs == 1 and s.last_epoch == 2
    else:
        assert s.last_global_metric == expected and s.last_epoch == 2


@pytest.mark.parametrize("metric, weight, error, text", [
    (None, None, TypeError, "metric is None on rank 0"),
    (torch.ones(2), None, ValueError, "metric has 2 elements"),
    (1.0, -1.0, ValueError, "weight is negative"),
])
def test_bad_input_in_a_window_raises_at_its_last_call_and_drops_it(metric, weight, error, text) -> None:
    s = ours(accumulation_size=4)
    for value in (1.0, 1.0, 1.0, 1.0):
        s.step(value)
    before = s.state_dict()
    s.step(2.0)
    s.step(metric, weight=weight)  # inside the window: sent, not raised, at the window's last call
    s.step(2.0)
    with pytest.raises(error, match=text):
        s.step(2.0)
    assert s.state_dict() == before
    for _ in range(4):
        s.step(3.0)
    assert s.last_global_metric == 3.0  # the next window is whole


def test_state_dict_in_mid_window_resumes_at_the_same_call_without_the_calls_before() -> None:
    s = ours(patience=3, accumulation_size=5)
    for value in (9.0, 9.0, 9.0, 9.0, 9.0, 1.0, 1.0, 1.0):
        s.step(value)
    buffer = io.BytesIO()
    torch.save(s.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["window_calls"] == 3 and not any("window" in k and k != "window_calls" for k in saved)
    resumed = ours()
    resumed.load_state_dict(saved)
    assert (resumed.accumulation_size, resumed.window_calls) == (5, 3)
    for value in (4.0, 6.0):
        resumed.step(value)
        s.step(value)
    # the uninterrupted run's window ends at the same call, on the mean of all five calls; the
    # resumed one on the mean of the two calls since the load
    assert (s.last_global_metric, resumed.last_global_metric) == (2.6, 5.0)
    assert resumed.last_epoch == s.last_epoch == 2
    # a state without windows (torch's own) starts a window: it ends accumulation_size calls later
    plain = ReduceLROnPlateau(optimizer())
    s.step(1.0)
    s.load_state_dict(plain.state_dict())
    assert s.window_calls == 0


def test_windows_and_smoothing_average_the_window_means() -> None:
    values = noisy(11, 120)
    s = ours(factor=0.5, patience=1, accumulation_size=6, smoothing_factor=0.5)
    windows = ours(accumulation_size=6)
    ref = SchnetpackReduceLROnPlateau(optimizer(), factor=0.5, patience=1, smoothing_factor=0.5)
    for value in values:
        s.step(value)
        windows.step(value)
        if windows.window_calls == 0:
            ref.step(windows.last_global_metric)
            assert state(s) == state(ref) and s.last_smoothed_metric == ref.ema_loss
    assert s.last_epoch == 20


def test_warmup_and_stop_patience_count_windows() -> None:
    s = ours(accumulation_size=3, warmup=2, warmup_start_factor=0.5, stop_patience=2, patience=100)
    lrs = []
    for _ in range(6):
        s.step(1.0)
        lrs.append(last_lr(s)[0])
    assert lrs == [0.5, 0.5, 0.75, 0.75, 0.75, 1.0]  # the ramp moves once a window
    # the first window after warmup sets best, then 2 windows without a better one: call 6 + 9
    assert first_stop(s, [1.0] * 20) == 9


def test_copies_keep_this_ranks_unfinished_window_and_do_not_share_it() -> None:
    s = ours(accumulation_size=3)
    s.step(1.0)
    s.step(2.0)
    for clone in (copy.copy(s), copy.deepcopy(s), pickle.loads(pickle.dumps(s))):
        clone.step(6.0)
        assert clone.last_global_metric == 3.0
    s.step(9.0)
    assert s.last_global_metric == 4.0


def test_sync_state_drops_the_unfinished_window_on_every_rank() -> None:
    s = ours(accumulation_size=3)
    s.step(100.0)
    s.sync_state(src=0)  # one process: rank 0 is the source, and drops its sums as the others do
    assert s.window_calls == 1
    s.step(1.0)
    s.step(2.0)
    assert s.last_global_metric == 1.5
