"""The scheduler in one process: parity with torch, arguments, state, logging, imports."""

from __future__ import annotations

import inspect
import io
import logging
import math
import random
import subprocess
import sys
import warnings

import pytest
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from distplateau import DistributedReduceLROnPlateau
from tests.reliability.cases import last_lr


def optimizer(lr: float = 1.0, groups: int = 1) -> torch.optim.Optimizer:
    params = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr * (g + 1)} for g in range(groups)]
    return torch.optim.SGD(params, lr=lr)


def state(s: ReduceLROnPlateau) -> tuple:
    return (last_lr(s), s.best, s.num_bad_epochs, s.cooldown_counter, s.last_epoch)


@pytest.mark.parametrize("backend", ["none", "auto"])
@pytest.mark.parametrize("seed", range(6))
def test_single_process_follows_torch_step_for_step(backend, seed):
    rng = random.Random(seed)
    kw = dict(mode=rng.choice(["min", "max"]), factor=rng.choice([0.1, 0.5]), patience=rng.randint(0, 3),
              threshold=rng.choice([0.0, 1e-4, 0.05]), threshold_mode=rng.choice(["rel", "abs"]),
              cooldown=rng.randint(0, 2), min_lr=rng.choice([0.0, [0.01, 0.02]]), eps=1e-8)
    ours = DistributedReduceLROnPlateau(optimizer(groups=2), **kw, backend=backend)
    ref = ReduceLROnPlateau(optimizer(groups=2), **kw)
    for _ in range(60):
        value = rng.choice([rng.random(), rng.random() * 0.1, 1.0])
        ours.step(torch.tensor(value, dtype=torch.float64) if rng.random() < 0.5 else value)
        ref.step(value)
        assert state(ours) == state(ref)
        assert ours.last_global_metric == value


def test_nan_single_process_is_a_bad_epoch_like_torch_and_logged(caplog):
    ours, ref = DistributedReduceLROnPlateau(optimizer(), patience=0), ReduceLROnPlateau(optimizer(), patience=0)
    with caplog.at_level(logging.WARNING, logger="distplateau"):
        for v in (1.0, math.nan, 0.5):
            ours.step(v)
            ref.step(v)
            assert state(ours) == state(ref)
    assert [r.getMessage() for r in caplog.records] == [
        "distplateau: metric is NaN or Inf on rank 0 at step 2; nan_policy='drop' steps on nan"
    ]
    assert ours.last_finite_metric == 0.5


def test_skip_policy_leaves_every_counter_alone_in_one_process():
    s = DistributedReduceLROnPlateau(optimizer(), patience=0, nan_policy="skip")
    s.step(1.0)
    before = (*state(s), s.last_global_metric)
    s.step(float("inf"))
    assert (*state(s), s.last_global_metric) == before


@pytest.mark.parametrize(
    "kwargs,message",
    [(dict(reduction="median"), "reduction must be one of 'mean', 'sum', 'min', 'max'; got 'median'"),
     (dict(nan_policy="ignore"), "nan_policy must be one of 'drop', 'raise', 'skip', 'bad', 'last', 'zero'"),
     (dict(backend="nccl"), "backend must be one of 'auto', 'horovod', 'torch', 'none'"),
     (dict(backend="torch", process_set=object()), "process_set is a Horovod argument"),
     (dict(backend="horovod", group=object()), "group is a torch.distributed argument"),
     (dict(process_set=object(), group=object()), "not both"),
     (dict(factor=1.5), "Factor should be < 1.0"),
     (dict(mode="up"), "mode up is unknown")],
)
def test_bad_constructor_arguments_say_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        DistributedReduceLROnPlateau(optimizer(), **kwargs)


def test_positional_arguments_are_the_parents():
    s = DistributedReduceLROnPlateau(optimizer(), "max", 0.5, 3, 0.01, "abs", 2, 0.001, 1e-6)
    assert (s.mode, s.factor, s.patience, s.threshold, s.threshold_mode, s.cooldown, s.min_lrs, s.eps) == (
        "max", 0.5, 3, 0.01, "abs", 2, [0.001], 1e-6)


def test_init_takes_every_argument_of_this_torchs_parent_in_its_order_with_its_default():
    # Run on every release of `bash dev.sh compat-torch`: an argument a new torch adds to
    # ReduceLROnPlateau fails here until ours takes it too.
    parent = list(inspect.signature(ReduceLROnPlateau.__init__).parameters.values())
    ours = list(inspect.signature(DistributedReduceLROnPlateau.__init__).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours[:len(parent)]] == [(p.name, p.kind, p.default) for p in parent]
    added = ours[len(parent):]
    # verbose stays in its torch 2.1 place on releases that dropped it (passing it raises there, as torch does).
    if "verbose" not in {p.name for p in parent}:
        assert added[0].name == "verbose" and added[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        added = added[1:]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in added), [p.name for p in added]
    assert {p.name: p.default for p in added}["last_epoch"] == -1


def test_step_takes_the_parents_arguments_by_keyword():
    parent = inspect.signature(ReduceLROnPlateau.step).parameters
    ours = inspect.signature(DistributedReduceLROnPlateau.step).parameters
    assert set(parent) <= set(ours)
    s = DistributedReduceLROnPlateau(optimizer(), patience=0)
    with pytest.warns(UserWarning, match="epoch"):  # torch's deprecation of epoch=, as for its own class
        s.step(metrics=1.0, epoch=7)
    assert s.last_epoch == 7


def test_verbose_goes_to_the_parent_where_it_has_one_and_is_torchs_type_error_where_not():
    if "verbose" in inspect.signature(ReduceLROnPlateau.__init__).parameters:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch 2.2 and later deprecate it
            s = DistributedReduceLROnPlateau(optimizer(), "min", 0.1, 10, 1e-4, "rel", 0, 0, 1e-8, True)
            t = ReduceLROnPlateau(optimizer(), "min", 0.1, 10, 1e-4, "rel", 0, 0, 1e-8, True)
        assert s.verbose == t.verbose
    else:
        with pytest.raises(TypeError, match="verbose"):
            ReduceLROnPlateau(optimizer(), verbose=True)  # type: ignore[call-arg]
        with pytest.raises(TypeError, match=r"torch .*'s ReduceLROnPlateau has no verbose argument"):
            DistributedReduceLROnPlateau(optimizer(), verbose=True)


def test_last_epoch_is_the_count_of_steps_already_taken_as_in_torchs_schedulers():
    generic = torch.optim.lr_scheduler.StepLR(optimizer(), step_size=100, last_epoch=-1)
    assert DistributedReduceLROnPlateau(optimizer(), last_epoch=-1).last_epoch == generic.last_epoch == 0
    s = DistributedReduceLROnPlateau(optimizer(), patience=0, last_epoch=4)  # what skorch passes after 5 epochs
    assert s.last_epoch == 5
    s.step(1.0)
    assert s.last_epoch == 6 and s.best == 1.0
    with pytest.raises(ValueError, match="last_epoch must be a whole number >= -1"):
        DistributedReduceLROnPlateau(optimizer(), last_epoch=-2)


def test_warmup_counts_on_from_last_epoch():
    opt = optimizer(lr=1.0)
    s = DistributedReduceLROnPlateau(opt, warmup=4, warmup_start_factor=0.2, last_epoch=1)  # 2 steps taken
    assert s.last_epoch == 2 and last_lr(s) == pytest.approx([0.6])
    s.step(1.0)
    s.step(1.0)
    assert s.last_epoch == 4 and last_lr(s) == [1.0]
    done = DistributedReduceLROnPlateau(optimizer(lr=1.0), warmup=4, last_epoch=9)
    assert last_lr(done) == [1.0]


@pytest.mark.parametrize("backend,hint", [("torch", "init_process_group"), ("horovod", "horovod.torch.init")])
def test_uninitialized_backend_is_a_clear_error_at_first_step(backend, hint):
    s = DistributedReduceLROnPlateau(optimizer(), backend=backend)
    with pytest.raises(RuntimeError, match=hint):
        s.step(1.0)
    assert s.last_epoch == 0


def test_bad_metric_in_one_process_names_rank_0_and_changes_nothing():
    s = DistributedReduceLROnPlateau(optimizer())
    with pytest.raises(ValueError, match=r"metric has 2 elements, not 1 on rank 0: pass a real scalar"):
        s.step(torch.ones(2))
    assert s.last_epoch == 0 and s.last_global_metric is None


@pytest.mark.parametrize("kwargs", [{}, {"weight": 3}, {"epoch": 1}])
def test_step_without_a_metric_is_a_runtime_error_naming_the_deepspeed_fix_and_changes_nothing(kwargs):
    """Not a TypeError: DeepSpeed's engine catches that and steps again on its batch size
    (tests/test_deepspeed.py shows it on real processes)."""
    s = DistributedReduceLROnPlateau(optimizer(lr=0.1), patience=0)
    s.step(1.0)
    before = s.state_dict()
    with pytest.raises(RuntimeError, match=r"called without a metric on rank 0\. .*deepspeed\.initialize") as err:
        s.step(**kwargs)
    assert not isinstance(err.value, TypeError)
    assert 'scheduler.step(val_loss, weight=n_local_samples)' in str(err.value)
    assert 'engine.step(lr_kwargs={"metrics": loss})' in str(err.value)
    assert s.state_dict() == before and s.get_last_lr() == [0.1]


def test_step_with_none_is_still_the_gathered_type_error():
    s = DistributedReduceLROnPlateau(optimizer())
    with pytest.raises(TypeError, match="metric is None on rank 0"):
        s.step(None)
    assert s.last_epoch == 0


def test_metrics_is_still_the_first_positional_parameter_of_step():
    s = DistributedReduceLROnPlateau(optimizer(), patience=0)
    s.step(1.0, 2.0)
    s.step(metrics=0.5, weight=1)
    assert s.last_epoch == 2 and s.best == 0.5
    assert list(inspect.signature(s.step).parameters) == ["metrics", "weight", "epoch"]


def test_state_dict_is_plain_and_loads_with_weights_only():
    s = DistributedReduceLROnPlateau(optimizer(), patience=1, reduction="max", nan_policy="bad")
    for v in (1.0, 2.0, 3.0, 0.5):
        s.step(v)
    s.step(1.0)  # selects the backend: the adapter must not leak into the state
    sd = s.state_dict()
    assert not {"optimizer", "backend", "_gather", "_group", "_process_set"} & set(sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    t = DistributedReduceLROnPlateau(optimizer(), backend="none")
    t.load_state_dict(loaded)
    assert (t.reduction, t.nan_policy, t.backend) == ("max", "bad", "none")
    assert (t.best, t.num_bad_epochs, t.last_epoch, t.last_global_metric, t.last_finite_metric) == (
        s.best, s.num_bad_epochs, s.last_epoch, s.last_global_metric, s.last_finite_metric)


def test_a_method_set_on_the_instance_is_behaviour_not_state():
    # pytorch-ignite's ReduceLROnPlateauScheduler does `scheduler._reduce_lr = self._reduce_lr`.
    class Wrapper:
        def __init__(self, scheduler: ReduceLROnPlateau) -> None:
            self.scheduler, self.cuts = scheduler, 0
            scheduler._reduce_lr = self._reduce_lr  # type: ignore[method-assign]

        def _reduce_lr(self, epoch: int) -> None:
            self.cuts += 1

    ours, theirs = (Wrapper(cls(optimizer(), patience=0)) for cls in (DistributedReduceLROnPlateau, ReduceLROnPlateau))
    assert "_reduce_lr" in theirs.scheduler.state_dict()  # torch's own copies the bound method
    state = ours.scheduler.state_dict()
    assert "_reduce_lr" not in state
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    resumed = Wrapper(DistributedReduceLROnPlateau(optimizer(), patience=0))
    resumed.scheduler.load_state_dict(torch.load(buffer, weights_only=True))
    resumed.scheduler.load_state_dict(theirs.scheduler.state_dict())  # torch's, with ignite's method in it
    for value in (1.0, 2.0):
        resumed.scheduler.step(value)
    assert resumed.cuts == 1  # the live wrapper's method, not a stale copy's


def test_plain_torch_state_dict_loads_and_keeps_our_settings():
    plain = ReduceLROnPlateau(optimizer(), patience=2)
    for v in (1.0, 2.0, 2.0):
        plain.step(v)
    ours = DistributedReduceLROnPlateau(optimizer(), patience=5, nan_policy="raise")
    ours.load_state_dict(plain.state_dict())
    assert (ours.patience, ours.num_bad_epochs, ours.best, ours.nan_policy) == (2, 2, 1.0, "raise")


def test_loading_an_unknown_policy_is_rejected():
    s = DistributedReduceLROnPlateau(optimizer())
    with pytest.raises(ValueError, match="nan_policy must be one of"):
        s.load_state_dict({**s.state_dict(), "nan_policy": "pray"})
    assert s.nan_policy == "drop"


def test_fingerprint_changes_with_state_and_learning_rate():
    s = DistributedReduceLROnPlateau(optimizer())
    f = s.fingerprint()
    assert f == s.fingerprint() and f == float(int(f)) and 0 <= f < 2**53
    s.num_bad_epochs += 1
    g = s.fingerprint()
    assert g != f
    s.optimizer.param_groups[0]["lr"] = 0.5
    assert s.fingerprint() != g


def test_import_loads_neither_horovod_nor_lightning():
    code = ("import sys, distplateau; bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('horovod', 'lightning', 'pytorch_lightning', 'lightning_fabric')); print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
