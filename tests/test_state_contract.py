"""torch's state contract, exactly, in one process: state_dict() round trips, copies, pickling,
sync_state, and the Horovod elastic handler (in a subprocess, so that this process never
imports Horovod). The same contract on real ranks: tests/distributed_checks.py."""

from __future__ import annotations

import copy
import math
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

import distplateau.scheduler
from distplateau import DistributedReduceLROnPlateau


def optimizer(groups: int = 1) -> torch.optim.Optimizer:
    params = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.5 * (g + 1)} for g in range(groups)]
    return torch.optim.SGD(params, lr=1.0)


def attributes(s: ReduceLROnPlateau) -> dict[str, str]:
    """Every attribute but the optimizer (``__dict__`` and our deployment slots), as exact reprs."""
    names = [*vars(s), *getattr(s, "__slots__", ())]
    return {name: repr(getattr(s, name, None)) for name in names if name not in ("optimizer", "_gather",
                                                                                 "_gather_world")}


def stepped(steps: int, groups: int = 2, **kwargs) -> DistributedReduceLROnPlateau:
    s = DistributedReduceLROnPlateau(optimizer(groups), **kwargs)
    for t in range(steps):
        s.step([1.0, 0.8, math.nan, 0.9, 0.95, 0.7, 0.7, 0.7][t % 8])
    return s


SETTINGS = [dict(), dict(mode="max", factor=0.5, patience=1, threshold=0.05, threshold_mode="abs", cooldown=2,
                         min_lr=[0.01, 0.02], eps=1e-6, reduction="max", nan_policy="last", monitor="val")]


def test_torchs_own_state_dict_test_passes_with_our_class():
    # torch's test_reduce_lr_on_plateau_state_dict (test/optim/test_lrscheduler.py), class swapped
    opt = optimizer(2)
    scheduler = DistributedReduceLROnPlateau(opt, mode="min", factor=0.1, patience=2)
    for score in [1.0, 2.0, 3.0, 4.0, 3.0, 4.0, 5.0, 3.0, 2.0, 1.0]:
        scheduler.step(score)
    scheduler_copy = DistributedReduceLROnPlateau(opt, mode="max", factor=0.5, patience=10)
    scheduler_copy.load_state_dict(scheduler.state_dict())
    for key in scheduler.__dict__.keys():
        if key not in {"optimizer", "is_better"}:
            assert scheduler.__dict__[key] == scheduler_copy.__dict__[key], key


@pytest.mark.parametrize("settings", SETTINGS, ids=["defaults", "every-setting"])
@pytest.mark.parametrize("steps", [0, 1, 9])
def test_state_dict_round_trip_restores_every_attribute(steps, settings):
    s = stepped(steps, **settings)
    # torch documents state_dict() as every variable of __dict__ but the optimizer
    assert set(vars(s)) - {"optimizer"} == set(s.state_dict())
    rebuilt = DistributedReduceLROnPlateau(optimizer(2))  # other settings: all come from the state dict
    rebuilt.load_state_dict(s.state_dict())
    assert attributes(rebuilt) == attributes(s)
    assert (rebuilt.get_last_lr(), rebuilt._last_lr, rebuilt.last_epoch) == (s.get_last_lr(), s._last_lr, s.last_epoch)
    rebuilt.optimizer.load_state_dict(s.optimizer.state_dict())
    for value in (0.6, 0.6, 0.6, 0.5):
        s.step(value)
        rebuilt.step(value)
        assert attributes(rebuilt) == attributes(s)


def test_plain_torch_state_loads_into_every_attribute_it_has():
    plain = ReduceLROnPlateau(optimizer(2), mode="max", patience=1, cooldown=1, min_lr=[0.1, 0.2])
    for value in (1.0, 0.5, 0.5, 2.0, 1.0):
        plain.step(value)
    ours = DistributedReduceLROnPlateau(optimizer(2), nan_policy="skip")
    ours.load_state_dict(plain.state_dict())
    assert {k: v for k, v in attributes(ours).items() if k in vars(plain)} == attributes(plain)
    assert ours.nan_policy == "skip"


@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle"])
@pytest.mark.parametrize("steps", [0, 5])
def test_copies_carry_the_state_not_the_adapter_and_step_on_identically(how, steps):
    s = stepped(steps, nan_policy="last", backend="auto")
    s.step(0.9)  # the adapter exists now
    clone = {"copy": copy.copy, "deepcopy": copy.deepcopy, "pickle": lambda x: pickle.loads(pickle.dumps(x))}[how](s)
    assert clone._gather is None and clone.backend == "auto" and attributes(clone) == attributes(s)
    assert (clone.optimizer is s.optimizer) == (how == "copy")
    for value in (0.9, 0.95, 0.2):
        clone.step(value)
        if how != "copy":  # a copy drives the same optimizer: step the original only on its own
            s.step(value)
            assert attributes(clone) == attributes(s)
    assert clone._gather is not None


@pytest.mark.parametrize("key,backend", [("process_set", "horovod"), ("group", "torch")])
def test_copies_share_the_process_set_or_group_handle(key, backend):
    handle = object()  # stands for a Horovod process set / a torch.distributed group, which cannot be copied
    s = DistributedReduceLROnPlateau(optimizer(), backend=backend, **{key: handle})
    s.default_weight = 3.0
    for clone in (copy.copy(s), copy.deepcopy(s)):
        assert getattr(clone, "_" + key) is handle and clone.default_weight == 3.0 and clone.backend == backend


def test_a_pickled_scheduler_steps_in_a_new_process():
    s = stepped(5, nan_policy="last")
    code = textwrap.dedent("""
        import pickle, sys
        s = pickle.loads(sys.stdin.buffer.read())
        assert s._gather is None
        s.step(0.1)
        print(repr((s.best, s.last_epoch, s.get_last_lr(), type(s._gather).__name__)))
    """)
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(s), capture_output=True, timeout=120,
                         check=True).stdout.decode()
    s.step(0.1)
    assert out.strip() == repr((s.best, s.last_epoch, s.get_last_lr(), "LocalGather"))


def test_sync_state_in_one_process_keeps_the_state_and_refuses_other_ranks():
    s = stepped(4)
    before = attributes(s)
    s.sync_state(src=0)
    assert attributes(s) == before
    with pytest.raises(ValueError, match=r"sync_state\(src=1\): rank 1 is not in .* group, which has rank 0;"):
        s.sync_state(src=1)


def test_sync_state_refuses_a_state_that_is_not_plain_values_or_too_big(monkeypatch):
    s = stepped(2)
    s.best = torch.tensor(1.0)  # not JSON
    with pytest.raises(ValueError, match=r"rank 0's state is not plain values"):
        s.sync_state()
    s = stepped(2)
    monkeypatch.setattr(distplateau.scheduler, "BROADCAST_BYTES", 100)
    with pytest.raises(ValueError, match=r"rank 0's state is \d+ bytes as JSON, more than the 100 one broadcast"):
        s.sync_state()


def test_divergence_error_names_the_repair():
    from distplateau._decide import check_same_state

    with pytest.raises(RuntimeError, match=r"call scheduler\.sync_state\(src=2\) on every rank"):
        check_same_state([(0, 1, 0, 0, 1.0), (0, 1, 0, 0, 2.0)], ranks=[2, 5])


def test_horovod_elastic_handler_is_registered_by_construction_and_keeps_the_live_object():
    code = textwrap.dedent("""
        import sys
        import torch
        from torch.optim.lr_scheduler import ReduceLROnPlateau
        import distplateau
        from distplateau.elastic import SchedulerStateHandler, register_horovod_handler
        assert register_horovod_handler() is False and "horovod" not in sys.modules
        import horovod.torch as hvd
        from horovod.torch.elastic.state import get_handler_registry
        entry = (ReduceLROnPlateau, SchedulerStateHandler)
        assert entry not in get_handler_registry()
        model = torch.nn.Linear(1, 1)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        ours = distplateau.DistributedReduceLROnPlateau(opt, patience=0)
        assert get_handler_registry().count(entry) == 1
        distplateau.DistributedReduceLROnPlateau(opt)
        assert get_handler_registry().count(entry) == 1
        hvd.init()
        plain = ReduceLROnPlateau(opt, patience=0)
        state = hvd.elastic.TorchState(model=model, optimizer=opt, scheduler=ours, plain=plain)
        state.sync()
        assert state.scheduler is ours and state.plain is plain
        ours.step(1.0); plain.step(1.0)
        state.commit()
        saved = (ours.state_dict(), plain.state_dict())
        ours.step(2.0); plain.step(2.0)
        assert opt.param_groups[0]["lr"] < 0.1
        state.restore()
        assert (ours.state_dict(), plain.state_dict()) == saved and opt.param_groups[0]["lr"] == 1.0
        other = distplateau.DistributedReduceLROnPlateau(opt)
        state.scheduler = other
        assert state.scheduler is other and state._handlers["scheduler"].value is other
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("ok"), out.stdout + out.stderr
