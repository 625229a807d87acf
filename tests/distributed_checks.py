"""Contract checks that run on real ranks, many per process launch.

Launched by ``tests/test_distributed.py`` either as
``horovodrun -np N --gloo python tests/distributed_checks.py horovod OUT.json`` or as N
plain processes with ``RANK``/``WORLD_SIZE``/``MASTER_PORT`` set and backend ``torch``.
Each check runs on every rank; after each one the ranks exchange their outcome, and rank 0
rewrites ``OUT.json`` (check name -> list of per-rank errors, ``""`` for a pass), so a
hang shows which check it was in. Nothing here mocks a collective: the counters wrap the
real functions and call through, from ``main()`` on: importing this file only defines the
checks (``CHECKS``, by name).
"""

from __future__ import annotations

import copy
import datetime
import io
import json
import logging
import math
import os
import pickle
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import ReduceLROnPlateau

from distplateau import DistributedReduceLROnPlateau
from tests.reliability.cases import last_lr, snapshot

# Set on each rank by init_backend(), read by the checks.
BACKEND = ""
RANK, SIZE = 0, 1
SUBSET: list[int] | None = None  # ranks [0, 2] form a process set / group when there are 3 or more
_subset_handle: Any = None
hvd: Any = None  # horovod.torch, under horovodrun
_module: Any = None  # the module whose collectives are counted
_collectives: list[str] = []


def gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, through the backend (rebound to Horovod's by ``init_backend``)."""
    out: list[Any] = [None] * SIZE
    dist.all_gather_object(out, obj)
    return out


def init_backend(backend: str) -> None:
    global BACKEND, RANK, SIZE, SUBSET, _subset_handle, hvd, gather_object, _module, _collectives
    BACKEND = backend
    if backend == "horovod":
        import horovod.torch

        hvd = horovod.torch
        SUBSET = [0, 2] if int(os.environ["HOROVOD_SIZE"]) >= 3 else None
        _subset_handle = hvd.ProcessSet(SUBSET) if SUBSET else None
        hvd.init(process_sets=[_subset_handle] if SUBSET else None)
        RANK, SIZE = hvd.rank(), hvd.size()
        gather_object = hvd.allgather_object
        _module = hvd
        _collectives = ["allgather", "allreduce", "allreduce_", "broadcast", "broadcast_", "alltoall",
                        "grouped_allreduce", "reducescatter", "barrier", "join", "allgather_async", "broadcast_async_",
                        "allgather_object", "broadcast_object"]
    else:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        RANK, SIZE = dist.get_rank(), dist.get_world_size()
        SUBSET = [0, 2] if SIZE >= 3 else None
        _subset_handle = dist.new_group(SUBSET) if SUBSET else None
        _module = dist
        _collectives = ["all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce",
                        "broadcast", "barrier", "reduce", "gather", "scatter", "reduce_scatter_tensor",
                        "all_to_all_single", "all_gather_object", "broadcast_object_list"]


# Count every collective the scheduler could call, by wrapping the real functions.
CALLS = {"n": 0}


def _counting(fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        CALLS["n"] += 1
        return fn(*args, **kwargs)

    return wrapper


def count_collectives() -> None:
    for name in _collectives:
        if hasattr(_module, name):
            setattr(_module, name, _counting(getattr(_module, name)))


@contextmanager
def exactly_one_collective():
    before = CALLS["n"]
    yield
    assert CALLS["n"] - before == 1, f"step issued {CALLS['n'] - before} collectives, expected 1"


def make(lr: float = 1.0, **kwargs: Any) -> DistributedReduceLROnPlateau:
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    kwargs.setdefault("backend", BACKEND)
    return DistributedReduceLROnPlateau(opt, **kwargs)


def reference(lr: float = 1.0, **kwargs: Any) -> ReduceLROnPlateau:
    model = torch.nn.Linear(1, 1)
    return ReduceLROnPlateau(torch.optim.SGD(model.parameters(), lr=lr), **kwargs)


def snapshot_with_metric(s: ReduceLROnPlateau) -> str:
    """Everything that must be bit-identical, as exact reprs: the scheduler's state and the
    global metric of its last step (``None`` for torch's own)."""
    return repr((snapshot(s), getattr(s, "last_global_metric", None)))


def same_everywhere(s: ReduceLROnPlateau) -> None:
    snaps = gather_object(snapshot_with_metric(s))
    assert len(set(snaps)) == 1, f"ranks disagree: {snaps}"


def matches(ours: ReduceLROnPlateau, ref: ReduceLROnPlateau) -> None:
    a = (ours.get_last_lr(), ours.best, ours.num_bad_epochs, ours.cooldown_counter, ours.last_epoch)
    b = (last_lr(ref), ref.best, ref.num_bad_epochs, ref.cooldown_counter, ref.last_epoch)
    assert repr(a) == repr(b), f"ours {a} != reference {b}"


def raises_everywhere(fn: Callable[[], Any], exc: type[BaseException], *needles: str) -> str:
    """``fn`` (one step) raises ``exc`` with the same message on every rank, after exactly
    one collective."""
    with exactly_one_collective():
        try:
            fn()
        except exc as err:
            msg = str(err)
        else:
            raise AssertionError(f"{exc.__name__} not raised on rank {RANK}")
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    msgs = gather_object(msg)
    assert len(set(msgs)) == 1, f"ranks raised different messages: {msgs}"
    return msg


#: Every check, by name, in the order the ranks run them (``tests/test_distributed.py`` makes
#: one test of each).
CHECKS: dict[str, Callable[[], None]] = {}


def check(fn: Callable[[], None]) -> Callable[[], None]:
    CHECKS[fn.__name__] = fn
    return fn


# --- contract 1: a drop-in subclass -------------------------------------------------------
@check
def subclass_keeps_parent_arguments_and_attributes() -> None:
    s = make(0.5, mode="max", factor=0.5, patience=2, threshold=0.01, threshold_mode="abs",
             cooldown=1, min_lr=0.01, eps=1e-9)
    r = reference(0.5, mode="max", factor=0.5, patience=2, threshold=0.01, threshold_mode="abs",
                  cooldown=1, min_lr=0.01, eps=1e-9)
    assert isinstance(s, ReduceLROnPlateau)
    for name in ("mode", "factor", "patience", "threshold", "threshold_mode", "cooldown",
                 "min_lrs", "eps", "best", "num_bad_epochs", "cooldown_counter", "last_epoch"):
        assert getattr(s, name) == getattr(r, name), name
    assert s.get_last_lr() == last_lr(r)
    d = make()
    assert (d.mode, d.factor, d.patience, d.threshold, d.threshold_mode, d.cooldown, d.min_lrs, d.eps) == (
        "min", 0.1, 10, 1e-4, "rel", 0, [0], 1e-8)


# --- contract 2, 4, 10: inputs, weights, reductions -----------------------------------------
@check
def every_scalar_kind_is_accepted_and_reduced() -> None:
    kinds = [float(RANK) + 0.5, RANK + 1, np.float32(RANK + 0.25), np.float64(RANK), np.int64(RANK),
             torch.tensor(RANK + 0.75), torch.tensor([RANK + 1.0]), torch.tensor(RANK, dtype=torch.int32),
             torch.tensor(RANK + 0.5, dtype=torch.float16), np.array(RANK + 2.0),
             torch.tensor(RANK + 1.0, requires_grad=True) * 1]
    s = make(patience=100)
    for i, metric in enumerate(kinds):
        locals_ = gather_object(float(metric.item() if hasattr(metric, "item") else metric))
        with exactly_one_collective():
            s.step(metric)
        assert s.last_global_metric == math.fsum(locals_) / SIZE, (i, s.last_global_metric, locals_)
    same_everywhere(s)


@check
def weighted_mean_is_the_exact_global_mean_on_uneven_shards() -> None:
    gen = torch.Generator().manual_seed(1234)
    shards = [torch.rand(7 * (r + 1) + r, generator=gen, dtype=torch.float64) for r in range(SIZE)]
    shards[-1] = shards[-1][:0]  # the last rank has an empty shard: mean NaN, weight 0
    local = shards[RANK]
    s = make(patience=100)
    with exactly_one_collective():
        s.step(local.mean(), weight=local.numel())
    everything = torch.cat(shards)
    expected = float(everything.sum() / everything.numel())
    assert math.isclose(s.last_global_metric, expected, rel_tol=1e-14), (s.last_global_metric, expected)
    unweighted = float(torch.stack([sh.mean() for sh in shards[:-1]]).mean())
    if SIZE >= 3:  # two non-empty shards of different sizes: a mean of means is wrong
        assert not math.isclose(s.last_global_metric, unweighted, rel_tol=1e-9)
    same_everywhere(s)


@check
def reductions_sum_min_max_mean() -> None:
    values = [float(r * r) - 1.5 for r in range(SIZE)]
    expected = {"mean": math.fsum(values) / SIZE, "sum": math.fsum(values), "min": min(values), "max": max(values)}
    for reduction, want in expected.items():
        s = make(reduction=reduction)
        with exactly_one_collective():
            s.step(values[RANK])
        assert s.last_global_metric == want, (reduction, s.last_global_metric, want)
        same_everywhere(s)


@check
def schedule_matches_torch_fed_the_global_mean() -> None:
    gen = torch.Generator().manual_seed(7)
    per_rank = torch.rand(40, SIZE, generator=gen, dtype=torch.float64) + torch.linspace(2, 1, 40).unsqueeze(1)
    weights = [float(r + 1) for r in range(SIZE)]
    kw = dict(mode="min", factor=0.5, patience=1, threshold=0.02, cooldown=1, min_lr=1e-3)
    s, r = make(**kw), reference(**kw)
    for epoch in range(40):
        row = per_rank[epoch].tolist()
        s.step(row[RANK], weight=weights[RANK])
        r.step(math.fsum(w * v for w, v in zip(weights, row)) / math.fsum(weights))
        matches(s, r)
    assert s.get_last_lr()[0] < 1.0
    same_everywhere(s)


# --- contract 5: NaN policies ----------------------------------------------------------------
@check
def nan_policy_drop_leaves_the_rank_out() -> None:
    for bad in (math.nan, math.inf, -math.inf):
        s = make(nan_policy="drop")
        s.step(bad if RANK == 1 else float(RANK))
        finite = [float(r) for r in range(SIZE) if r != 1]
        assert s.last_global_metric == math.fsum(finite) / len(finite)
        same_everywhere(s)
    s, r = make(patience=0), reference(patience=0)
    s.step(1.0), r.step(1.0)
    s.step(math.nan), r.step(math.nan)  # nothing finite left: a bad epoch, as torch does
    matches(s, r)
    assert math.isnan(s.last_global_metric)


@check
def nan_policy_raise_names_the_ranks_everywhere() -> None:
    s = make(nan_policy="raise")
    s.step(1.0)
    before = snapshot_with_metric(s)
    raises_everywhere(lambda: s.step(math.nan if RANK in (0, SIZE - 1) else 1.0), FloatingPointError,
                      f"ranks 0, {SIZE - 1}")
    assert snapshot_with_metric(s) == before


@check
def nan_policy_skip_changes_nothing() -> None:
    s = make(patience=0, nan_policy="skip")
    s.step(1.0)
    before = snapshot_with_metric(s)
    with exactly_one_collective():
        s.step(math.inf if RANK == 1 else 0.1)
    assert snapshot_with_metric(s) == before
    s.step(0.5)
    assert s.best == 0.5


@check
def nan_policy_bad_counts_a_bad_epoch() -> None:
    s, r = make(patience=1, nan_policy="bad"), reference(patience=1)
    for step, value in enumerate([1.0, 0.5, 0.1, 0.05]):
        poisoned = step in (1, 2) and RANK == 1
        s.step(math.nan if poisoned else value)
        r.step(math.nan if step in (1, 2) else value)
        matches(s, r)
    assert s.get_last_lr() == [0.1]


@check
def nan_policy_last_reuses_the_last_finite_value() -> None:
    s = make(patience=0, nan_policy="last")
    s.step(math.nan if RANK == 0 else 1.0)  # nothing finite yet: as "skip"
    assert s.last_epoch == 0 and s.last_global_metric is None
    s.step(2.0)
    s.step(math.nan if RANK == 0 else 0.0)
    assert s.last_global_metric == 2.0 and s.last_epoch == 2 and s.num_bad_epochs == 0
    assert s.get_last_lr() == [0.1]  # 2.0 again is not an improvement: patience 0 reduces
    same_everywhere(s)


@check
def nan_policy_zero_counts_nonfinite_as_zero() -> None:
    s = make(nan_policy="zero", reduction="mean")
    s.step(math.nan if RANK == 0 else 3.0)
    assert s.last_global_metric == 3.0 * (SIZE - 1) / SIZE
    same_everywhere(s)


@check
def nonfinite_metrics_are_logged_once_from_rank_0_only() -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("distplateau")
    logger.addHandler(handler)
    try:
        s = make()
        s.step(math.nan if RANK == 1 else 1.0)
        s.step(1.0)
    finally:
        logger.removeHandler(handler)
    messages = gather_object([r.getMessage() for r in records])
    assert messages[0] == ["distplateau: metric is NaN or Inf on rank 1 at step 1; nan_policy='drop' steps on 1.0"]
    assert all(m == [] for m in messages[1:]), messages


# --- contract 3: one collective, whatever the settings ----------------------------------------
@check
def one_collective_per_step_for_every_reduction_and_policy() -> None:
    for reduction in ("mean", "sum", "min", "max"):
        for policy in ("drop", "skip", "bad", "last", "zero"):
            s = make(reduction=reduction, nan_policy=policy)
            for value in (1.0, math.nan if RANK == 0 else 2.0, 0.5):
                with exactly_one_collective():
                    s.step(value, weight=RANK + 1)
            same_everywhere(s)


# --- contract 7: no rank stranded ------------------------------------------------------------
BAD_INPUTS: list[tuple[Any, Any, type[Exception], str]] = [
    (None, None, TypeError, "metric is None"),
    ("0.5", None, TypeError, "metric is a str"),
    (True, None, TypeError, "metric is a bool"),
    ([1.0, 2.0], None, TypeError, "metric is not a real number"),
    (torch.ones(3), None, ValueError, "metric has 3 elements"),
    (np.ones((2, 2)), None, ValueError, "metric has 4 elements"),
    (1.0, -1.0, ValueError, "weight is negative"),
    (1.0, math.nan, ValueError, "weight is not finite"),
    (1.0, math.inf, ValueError, "weight is not finite"),
    (1.0, "3", TypeError, "weight is not a real number"),
    (1.0, torch.ones(2), ValueError, "weight has 2 elements"),
]


@check
def bad_input_on_one_rank_raises_the_same_error_on_every_rank() -> None:
    culprit = SIZE - 1
    s = make(patience=0)
    s.step(1.0)
    before = snapshot_with_metric(s)
    for metric, weight, exc, text in BAD_INPUTS:
        m, w = (metric, weight) if RANK == culprit else (0.5, 1.0)
        raises_everywhere(lambda m=m, w=w: s.step(m, weight=w), exc, text, f"on rank {culprit}")
        assert snapshot_with_metric(s) == before
    s.step(0.5)  # and the scheduler still works afterwards, in step on every rank
    assert s.best == 0.5
    same_everywhere(s)


@check
def every_weight_zero_is_an_error_not_a_step() -> None:
    s = make()
    raises_everywhere(lambda: s.step(1.0, weight=0), ValueError, "every rank passed weight 0")
    assert s.last_epoch == 0


# --- contract 8: diverged state ---------------------------------------------------------------
@check
def diverged_state_raises_everywhere() -> None:
    s = make(patience=5)
    s.step(1.0)
    s.step(2.0)
    good = s.state_dict()
    if RANK == 1:  # only some ranks "loaded a checkpoint"
        s.load_state_dict({**good, "num_bad_epochs": 0})
    msg = raises_everywhere(lambda: s.step(1.0), RuntimeError, "scheduler state differs across ranks")
    assert "rank 1" in msg
    s.load_state_dict(good)
    s.step(3.0)
    assert s.num_bad_epochs == 2
    same_everywhere(s)

    t = make(nan_policy="skip" if RANK == 0 else "drop")
    raises_everywhere(lambda: t.step(1.0), RuntimeError, "scheduler state differs")


# --- contract 9: state_dict ------------------------------------------------------------------
@check
def state_dict_round_trips_with_weights_only_and_accepts_plain_torch_state() -> None:
    s = make(patience=1, reduction="max", nan_policy="last")
    for v in (3.0, 2.0, math.nan, 2.5):
        s.step(v + RANK)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["reduction"] == "max" and state["nan_policy"] == "last"
    assert "optimizer" not in state and "_gather" not in state
    fresh = make(patience=1)
    fresh.load_state_dict(state)
    fresh.optimizer.param_groups[0]["lr"] = s.optimizer.param_groups[0]["lr"]
    assert (fresh.reduction, fresh.nan_policy) == ("max", "last")
    for v in (2.4, 2.3, 2.2):
        s.step(v + RANK)
        fresh.step(v + RANK)
        assert snapshot_with_metric(s) == snapshot_with_metric(fresh)

    plain = reference(patience=3)
    plain.step(1.0)
    ours = make(patience=3, reduction="min")
    ours.load_state_dict(plain.state_dict())
    assert ours.last_epoch == 1 and ours.best == 1.0 and ours.reduction == "min"
    ours.step(RANK + 0.5)
    assert ours.last_global_metric == 0.5
    same_everywhere(ours)


# --- torch's state contract, copies, repair and Horovod elastic state ---------------------------
def attributes(s: ReduceLROnPlateau) -> dict[str, str]:
    """Every attribute but the optimizer (``__dict__`` and our deployment slots), as exact reprs."""
    names = [*vars(s), *(getattr(s, "__slots__", ()))]
    return {name: repr(getattr(s, name, None)) for name in names if name not in ("optimizer", "_gather",
                                                                                 "_gather_world")}


@check
def state_dict_round_trip_restores_every_attribute() -> None:
    kwargs = dict(mode="max", factor=0.5, patience=1, cooldown=1, min_lr=0.01, reduction="max", nan_policy="last")
    for steps in (0, 1, 6):
        s = make(**kwargs)
        for t in range(steps):
            s.step(math.nan if t == 2 and RANK == 0 else float(RANK + t % 3))
        # torch documents state_dict() as every variable of __dict__ but the optimizer
        assert set(vars(s)) - {"optimizer"} == set(s.state_dict()), sorted(set(vars(s)) ^ set(s.state_dict()))
        rebuilt = make()  # other settings: every one of them comes from the state dict
        rebuilt.load_state_dict(s.state_dict())
        assert attributes(rebuilt) == attributes(s), (steps, attributes(rebuilt), attributes(s))
        assert (rebuilt.get_last_lr(), rebuilt._last_lr, rebuilt.last_epoch) == (s.get_last_lr(), s._last_lr,
                                                                                  s.last_epoch)
        rebuilt.optimizer.load_state_dict(s.optimizer.state_dict())
        for value in (3.0, 1.0, 0.5):
            s.step(value + RANK)
            rebuilt.step(value + RANK)
            assert attributes(rebuilt) == attributes(s)
        same_everywhere(rebuilt)


@check
def copies_and_unpickled_schedulers_gather_in_their_own_process() -> None:
    s = make(patience=1)
    s.step(float(RANK))
    s.step(float(RANK) + 1)
    mine = pickle.dumps(s)
    rank0s = gather_object(mine)[0]  # what Horovod's TorchState does with an object it has no handler for
    clones = {"copy": copy.copy(s), "deepcopy": copy.deepcopy(s), "pickle": pickle.loads(mine),
              "rank 0's pickle": pickle.loads(rank0s)}
    assert clones["copy"].optimizer is s.optimizer and clones["deepcopy"].optimizer is not s.optimizer
    for name, clone in clones.items():
        assert clone._gather is None and clone.state_dict() == s.state_dict(), name
        with exactly_one_collective():
            clone.step(2.0 * RANK)
        assert (clone._gather.size, clone._gather.index) == (SIZE, RANK), name
        assert clone.last_global_metric == math.fsum(2.0 * r for r in range(SIZE)) / SIZE, name
        same_everywhere(clone)
    if SUBSET is not None and RANK in SUBSET:  # a copy shares the process set / group handle
        key = "process_set" if BACKEND == "horovod" else "group"
        t = make(**{key: _subset_handle})
        t.step(1.0)
        for clone in (copy.copy(t), copy.deepcopy(t)):
            assert getattr(clone, "_" + key) is _subset_handle
            clone.step(float(RANK))
            assert clone._gather.ranks == tuple(SUBSET)
            assert clone.last_global_metric == math.fsum(map(float, SUBSET)) / len(SUBSET)


@check
def sync_state_repairs_diverged_state_in_one_collective() -> None:
    s = make(patience=2)
    s.step(1.0)
    s.step(2.0)
    good, good_lr = s.state_dict(), s.optimizer.param_groups[0]["lr"]
    if RANK == 1:  # only rank 1 loaded an older checkpoint, with its learning rate
        s.load_state_dict({**good, "num_bad_epochs": 0, "best": 5.0, "nan_policy": "skip"})
        s.optimizer.param_groups[0]["lr"] = 0.25
    raises_everywhere(lambda: s.step(1.0), RuntimeError, "scheduler state differs", "scheduler.sync_state(src=0)")
    with exactly_one_collective():
        s.sync_state(src=0)
    assert s.state_dict() == good and s.optimizer.param_groups[0]["lr"] == good_lr
    s.step(3.0)
    assert s.num_bad_epochs == 2
    same_everywhere(s)

    # a worker that joined late: a fresh scheduler on the last rank; copy the last rank's instead
    late = make(patience=2)
    for value in (1.0, 0.5, 0.7):
        late.step(value)
    if RANK == SIZE - 1:
        late = make(patience=2, nan_policy="zero")
    with exactly_one_collective():
        late.sync_state(src=SIZE - 1)
    assert late.last_epoch == 0 and late.nan_policy == "zero" and late.best == math.inf
    same_everywhere(late)

    before = CALLS["n"]
    try:
        late.sync_state(src=SIZE)
    except ValueError as err:
        assert f"rank {SIZE} is not in this scheduler's group" in str(err), err
    else:
        raise AssertionError("sync_state accepted a rank outside the group")
    assert CALLS["n"] == before, "a refused sync_state must not start a collective"

    if SUBSET is not None and RANK in SUBSET:
        key = "process_set" if BACKEND == "horovod" else "group"
        t = make(**{key: _subset_handle})
        t.step(float(RANK))
        if RANK == SUBSET[0]:
            t.load_state_dict({**t.state_dict(), "last_epoch": 9})
        t.sync_state(src=SUBSET[-1])
        assert t.last_epoch == 1
        t.step(1.0)


@check
def sync_state_and_steps_keep_tensor_learning_rates_in_place() -> None:
    # lr=torch.tensor(...), as compiled and capturable optimizers take it: warmup, the plateau's
    # reduction and sync_state write into that tensor on every rank, whatever the torch release.
    model = torch.nn.Linear(1, 1)
    lr = torch.tensor(0.5, dtype=torch.float64)
    s = DistributedReduceLROnPlateau(torch.optim.SGD(model.parameters(), lr=lr), patience=0, warmup=1,
                                     backend=BACKEND)
    for value in (1.0, 1.0, 1.0):  # the warmup step, then the first value, then a cut
        s.step(value)
    assert s.optimizer.param_groups[0]["lr"] is lr and lr.dtype == torch.float64 and float(lr) == 0.05, lr
    good = float(lr)
    if RANK == 1:  # rank 1 went astray: another state and another rate, in the same tensor
        s.load_state_dict({**s.state_dict(), "best": 5.0})
        lr.fill_(0.25)
    with exactly_one_collective():
        s.sync_state(src=0)
    assert s.optimizer.param_groups[0]["lr"] is lr and lr.dtype == torch.float64 and float(lr) == good, lr
    assert [float(x) for x in s.get_last_lr()] == [good] and s.best == 1.0
    same_everywhere(s)


@check
def horovod_elastic_state_keeps_the_live_schedulers() -> None:
    if BACKEND != "horovod":
        return
    from horovod.torch.elastic.state import get_handler_registry

    from distplateau.elastic import SchedulerStateHandler

    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    ours, plain = DistributedReduceLROnPlateau(opt, patience=0), ReduceLROnPlateau(opt, patience=0)
    assert (ReduceLROnPlateau, SchedulerStateHandler) in get_handler_registry()  # constructing ours did it
    if RANK != 0:  # as on a worker that joined late
        ours.load_state_dict({**ours.state_dict(), "best": 7.0, "last_epoch": 3})
        plain.best, plain.last_epoch = 7.0, 3
        opt.param_groups[0]["lr"] = 0.5
    state = hvd.elastic.TorchState(model=model, optimizer=opt, scheduler=ours, plain=plain, epoch=0)
    state.sync()
    assert state.scheduler is ours and state.plain is plain and ours.optimizer is opt and plain.optimizer is opt
    assert (ours.best, ours.last_epoch, plain.best, plain.last_epoch, opt.param_groups[0]["lr"]) == (
        math.inf, 0, math.inf, 0, 1.0)
    same_everywhere(ours)
    same_everywhere(plain)

    ours.step(1.0)
    plain.step(1.0)
    state.commit()
    committed = (snapshot_with_metric(ours), snapshot_with_metric(plain))
    for value in (2.0, 3.0):  # patience 0: both reduce the learning rate, then fail to commit
        ours.step(value)
        plain.step(value)
    assert opt.param_groups[0]["lr"] < 0.1
    state.restore()  # what hvd.elastic.run does after a HorovodInternalError
    assert (snapshot_with_metric(ours), snapshot_with_metric(plain)) == committed and opt.param_groups[0]["lr"] == 1.0
    ours.step(2.0)
    same_everywhere(ours)

    # Without the handler, TorchState sends the scheduler by pickling it: on every rank but 0
    # state.scheduler becomes a copy driving a copy of the optimizer (the bug this fixes).
    registry = get_handler_registry()
    registry.remove((ReduceLROnPlateau, SchedulerStateHandler))
    try:
        bare = hvd.elastic.TorchState(model=model, optimizer=opt, scheduler=plain)
    finally:
        registry.append((ReduceLROnPlateau, SchedulerStateHandler))
    bare.sync()
    assert (bare.scheduler is plain) == (RANK == 0) and (bare.scheduler.optimizer is opt) == (RANK == 0)


# --- contract 6: backends, process sets and groups -------------------------------------------
@check
def auto_backend_finds_the_initialized_one_and_none_gathers_nothing() -> None:
    s = make(backend="auto")
    s.step(float(RANK))
    assert type(s._gather).__name__ == ("HorovodGather" if BACKEND == "horovod" else "TorchGather")
    assert s.last_global_metric == math.fsum(range(SIZE)) / SIZE
    alone = make(backend="none")
    before = CALLS["n"]
    alone.step(float(RANK))
    assert CALLS["n"] == before and alone.last_global_metric == float(RANK)


@check
def subset_group_gathers_only_its_ranks_and_names_global_ranks() -> None:
    if SUBSET is None:
        return
    key = "process_set" if BACKEND == "horovod" else "group"
    if RANK in SUBSET:
        s = make(**{key: _subset_handle})
        s.step(float(RANK) * 10)
        assert s.last_global_metric == math.fsum(10.0 * r for r in SUBSET) / len(SUBSET)
        assert s._gather.ranks == tuple(SUBSET)
        msg = ""
        try:
            s.step(None if RANK == SUBSET[-1] else 1.0)
        except TypeError as err:
            msg = str(err)
        assert f"on rank {SUBSET[-1]}" in msg, msg
    else:
        s = make(**{key: _subset_handle})
        try:
            s.step(1.0)
        except ValueError as err:
            assert "not" in str(err) and "member" in str(err) or "not in the process set" in str(err), err
        else:
            raise AssertionError("a non-member stepped")


# --- the bound on a Horovod step's wait (DISTPLATEAU_HOROVOD_TIMEOUT_S) ------------------------
@contextmanager
def horovod_timeout(setting: str | None, default_s: float | None = None):
    """``DISTPLATEAU_HOROVOD_TIMEOUT_S`` set to ``setting`` (``None``: unset) on this rank while the
    block runs, and the default forced to ``default_s`` seconds (a test cannot wait 30 minutes)."""
    from distplateau import _gather

    saved = os.environ.pop(_gather.TIMEOUT_ENV, None), _gather.DEFAULT_TIMEOUT_S
    if setting is not None:
        os.environ[_gather.TIMEOUT_ENV] = setting
    if default_s is not None:
        _gather.DEFAULT_TIMEOUT_S = default_s
    try:
        yield
    finally:
        os.environ.pop(_gather.TIMEOUT_ENV, None)
        if saved[0] is not None:
            os.environ[_gather.TIMEOUT_ENV] = saved[0]
        _gather.DEFAULT_TIMEOUT_S = saved[1]


def _timed_step(s: DistributedReduceLROnPlateau, metric: float) -> tuple[float, BaseException | None]:
    started = time.monotonic()
    try:
        s.step(metric)
    except (TimeoutError, ValueError) as err:
        return time.monotonic() - started, err
    return time.monotonic() - started, None


@check
def horovod_wait_is_bounded_by_default_and_a_bad_setting_fails_the_first_step() -> None:
    if BACKEND != "horovod":
        return
    # The limit each adapter takes from its rank's environment when it is built (the first step;
    # again after an elastic reset): on the global process set, and on a process set.
    for setting, want in [(None, 1800.0), ("", 1800.0), (" 2.5 ", 2.5), ("0", None)]:
        with horovod_timeout(setting):
            s = make()
            s.step(1.0)
            assert s._gather.timeout == want, (setting, s._gather.timeout)
            if SUBSET and RANK in SUBSET:
                s = make(process_set=_subset_handle)
                s.step(1.0)
                assert s._gather.timeout == want, (setting, s._gather.timeout)
    # A bad setting everywhere: ValueError at the first step on every rank, before any collective.
    for bad in ["abc", "-1", "nan", "inf", "30m"]:
        with horovod_timeout(bad):
            s = make()
            before = CALLS["n"]
            _, err = _timed_step(s, 1.0)
            assert isinstance(err, ValueError) and CALLS["n"] == before and s._gather is None, (bad, err)
            assert str(err).startswith(f"DISTPLATEAU_HOROVOD_TIMEOUT_S={bad!r} on Horovod rank {RANK} is not a "
                                       "number of seconds >= 0: set it to the longest a step() may wait"), err
            assert "0 to wait forever" in str(err) and "default of 1800 seconds" in str(err), err


@check
def horovod_ranks_with_different_settings_raise_and_nothing_is_left_waiting() -> None:
    if BACKEND != "horovod":
        return
    # On the process set (3+ ranks) or the global one: the last member's setting is bad, so it
    # raises before the collective; the other members wait their own limit (0.3 s) and raise
    # TimeoutError. Then the last member, its setting fixed, steps again and completes the
    # allgather they left behind: no collective stays pending.
    members = SUBSET or list(range(SIZE))
    key = {"process_set": _subset_handle} if SUBSET else {}
    s: DistributedReduceLROnPlateau | None = None
    if RANK in members:
        with horovod_timeout("-1" if RANK == members[-1] else "0.3"):
            s = make(**key)
            waited, err = _timed_step(s, 1.0)
        if RANK == members[-1]:
            assert isinstance(err, ValueError), err
        else:
            group = (f"Horovod process set {_subset_handle.process_set_id} (ranks 0, 2)" if SUBSET
                     else f"the global process set ({SIZE} ranks)")
            assert isinstance(err, TimeoutError) and waited >= 0.3, (waited, err)
            assert str(err).startswith(f"step() on Horovod rank {RANK} gave up after waiting "), err
            assert (f"s (DISTPLATEAU_HOROVOD_TIMEOUT_S=0.3) for the other ranks of {group}. This rank cannot tell "
                    "which of these happened: a rank skipped or repeated a step() call") in str(err), err
            assert str(err).endswith("raise DISTPLATEAU_HOROVOD_TIMEOUT_S (seconds; 0 waits forever)."), err
    gather_object(None)  # every member is past its error
    if RANK == members[-1]:
        assert s is not None
        s.step(1.0)
        assert s.last_global_metric == 1.0
    gather_object(None)


@check
def horovod_setting_0_waits_past_the_default_and_the_default_waits_for_a_late_rank() -> None:
    if BACKEND != "horovod":
        return
    # The last rank steps late (0.6 s, then 0.3 s): with 0 the others wait past a 0.2-s default
    # (Horovod's blocking wait); unset, they wait through the polls' back-off within the default.
    for setting, default_s, late_s in [("0", 0.2, 0.6), (None, 30.0, 0.3)]:
        with horovod_timeout(setting, default_s):
            s = make()
            if RANK == SIZE - 1:
                time.sleep(late_s)
            waited, err = _timed_step(s, float(RANK))
            assert err is None, (setting, err)
            assert s.last_global_metric == math.fsum(range(SIZE)) / SIZE
            assert (s._gather.timeout is None) == (setting == "0")
            if RANK == 0:
                assert waited > late_s / 2, (setting, waited)
        same_everywhere(s)


# --- stopping together and warmup ----------------------------------------------------------
def _shard_values(step: int) -> tuple[list[float], list[int]]:
    """Every rank's local mean and sample count at ``step`` (the same on every rank): uneven
    shards, and rank SIZE-1's metric NaN at steps 2 and 4. Binary fractions: exact sums."""
    base = [3.0, 2.0, 1.5, 1.5, 1.25][step] if step < 5 else 1.25
    values = [base + 0.25 * r for r in range(SIZE)]
    if step in (2, 4):
        values[-1] = math.nan
    return values, [r + 1 for r in range(SIZE)]


@check
def every_rank_stops_at_the_same_step_with_nan_and_uneven_shards() -> None:
    settings = dict(factor=0.5, patience=1, threshold=0.0, threshold_mode="abs", stop_patience=4)
    s = make(**settings)
    one = make(backend="none", **settings)  # one process fed the global means
    steps = 0
    while not s.should_stop:  # the loop users write: every rank must leave it at the same step
        values, weights = _shard_values(steps)
        with exactly_one_collective():
            s.step(values[RANK], weight=weights[RANK])
        finite = [(v, w) for v, w in zip(values, weights) if math.isfinite(v)]
        one.step(math.fsum(v * w for v, w in finite) / math.fsum(w for _, w in finite))
        steps += 1
        assert s.should_stop == one.should_stop and s.get_last_lr() == one.get_last_lr(), steps
        assert steps < 50, "never stopped"
    assert steps == 9, steps  # best at step 5 (1.25), then 4 steps without improvement
    assert len(set(gather_object(steps))) == 1
    same_everywhere(s)


@check
def stopping_resumes_from_a_checkpoint_of_another_world_size() -> None:
    settings = dict(factor=0.5, patience=1, stop_patience=3)
    globals_ = [2.0, 1.0, 1.5, 1.5, 0.5, 0.75, 0.75, 0.75, 0.75]
    uninterrupted = make(backend="none", **settings)
    stop_at = next(i for i, g in enumerate(globals_, 1) if (uninterrupted.step(g), uninterrupted.should_stop)[1])
    single = make(backend="none", **settings)  # the run that saved the checkpoint had one process
    for g in globals_[:4]:
        single.step(g)
    buffer = io.BytesIO()
    torch.save({"scheduler": single.state_dict(), "optimizer": single.optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    s = make(**settings)
    s.optimizer.load_state_dict(saved["optimizer"])
    s.load_state_dict(saved["scheduler"])
    step = 4
    while not s.should_stop:
        s.step(globals_[step] + 0.125 * (RANK - (SIZE - 1) / 2))  # equal weights: the mean is globals_[step]
        step += 1
    assert step == stop_at == 8, (step, stop_at)
    assert s.get_last_lr() == uninterrupted.get_last_lr()
    same_everywhere(s)


@check
def warmup_then_plateau_follows_a_ramp_then_torch_on_the_global_mean() -> None:
    s = make(0.8, factor=0.5, patience=1, warmup=3, warmup_start_factor=0.25)
    ref = reference(0.8, factor=0.5, patience=1)  # torch's own, from the end of warmup
    globals_ = [4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5]
    for step, g in enumerate(globals_, 1):
        with exactly_one_collective():
            s.step(g + 0.125 * (RANK - (SIZE - 1) / 2))
        if step <= 3:
            assert math.isclose(s.get_last_lr()[0], 0.8 * (0.25 + 0.75 * step / 3), rel_tol=1e-12), step
            assert s.best == math.inf and s.num_bad_epochs == 0
        else:
            ref.step(g)
            matches_after_warmup = (s.get_last_lr(), s.best, s.num_bad_epochs) == (
                last_lr(ref), ref.best, ref.num_bad_epochs)
            assert matches_after_warmup, (step, s.get_last_lr(), last_lr(ref))
    same_everywhere(s)


# --- smoothing_factor and accumulation_size ------------------------------------------------------
def _uneven_round(step: int) -> tuple[list[float], list[float]]:
    """Every rank's local mean and sample count at ``step`` (the same table on every rank): a
    noisy loss on uneven shards that falls until step 8 and then stays, NaN on the last rank at
    steps 5 and 11 (dropped: the global value stays finite)."""
    gen = torch.Generator().manual_seed(1000 + step)
    noise = torch.rand(SIZE, generator=gen, dtype=torch.float64).tolist()
    values = [2.0 / (1 + 0.1 * min(step, 8)) + 0.5 * (n - 0.5) for n in noise]
    if step in (5, 11):
        values[-1] = math.nan
    return values, [float(7 * r + 3) for r in range(SIZE)]


def _global_mean(values: list[float], weights: list[float]) -> float:
    kept = [(v, w) for v, w in zip(values, weights) if math.isfinite(v) and w > 0]
    return math.fsum(v * w for v, w in kept) / math.fsum(w for _, w in kept)


@check
def smoothing_is_schnetpacks_average_of_the_exact_global_values() -> None:
    from tests.plateau_references import SchnetpackReduceLROnPlateau

    kwargs = dict(factor=0.5, patience=1, threshold=0.01, cooldown=1, smoothing_factor=0.8)
    s = make(**kwargs)
    ref = SchnetpackReduceLROnPlateau(torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0), **kwargs)
    for step in range(30):
        values, weights = _uneven_round(step)
        with exactly_one_collective():
            s.step(values[RANK], weight=weights[RANK])
        ref.step(_global_mean(values, weights))  # one process, schnetpack's class, the exact global value
        matches(s, ref)
        assert s.last_smoothed_metric == ref.ema_loss, (step, s.last_smoothed_metric, ref.ema_loss)
    assert s.get_last_lr()[0] < 0.5  # reductions happened
    same_everywhere(s)
    assert len(set(gather_object(repr(s.state_dict())))) == 1


@check
def smoothing_resumes_exactly_and_a_diverged_average_is_caught_and_synced() -> None:
    kwargs = dict(factor=0.5, patience=1, smoothing_factor=0.9, stop_patience=6)
    uninterrupted, first = make(**kwargs), make(**kwargs)
    for step in range(12):
        values, weights = _uneven_round(step)
        uninterrupted.step(values[RANK], weight=weights[RANK])
        first.step(values[RANK], weight=weights[RANK])
    buffer = io.BytesIO()
    torch.save({"scheduler": first.state_dict(), "optimizer": first.optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # rank 0's checkpoint would do: it is the same everywhere
    resumed = make()
    resumed.optimizer.load_state_dict(saved["optimizer"])
    resumed.load_state_dict(saved["scheduler"])
    for step in range(12, 24):
        values, weights = _uneven_round(step)
        uninterrupted.step(values[RANK], weight=weights[RANK])
        resumed.step(values[RANK], weight=weights[RANK])
        assert snapshot_with_metric(resumed) == snapshot_with_metric(uninterrupted), step
        assert resumed.state_dict() == uninterrupted.state_dict(), step
    if RANK == 1:  # only rank 1's average went astray (say, a checkpoint of another run)
        resumed.load_state_dict({**resumed.state_dict(), "last_smoothed_metric": 5.0})
    raises_everywhere(lambda: resumed.step(1.0), RuntimeError, "scheduler state differs", "ranks")
    with exactly_one_collective():
        resumed.sync_state(src=0)
    assert resumed.state_dict() == uninterrupted.state_dict()
    same_everywhere(resumed)


@check
def a_window_gathers_once_on_the_exact_global_mean_of_its_calls() -> None:
    size, windows = 4, 8
    s = make(factor=0.5, patience=1, accumulation_size=size)
    smoothed = make(factor=0.5, patience=1, accumulation_size=size, smoothing_factor=0.5)
    ref = reference(factor=0.5, patience=1)  # torch's class on the exact global window means
    from tests.plateau_references import SchnetpackReduceLROnPlateau

    ref_smoothed = SchnetpackReduceLROnPlateau(torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0),
                                               factor=0.5, patience=1, smoothing_factor=0.5)
    for window in range(windows):
        rows = [_uneven_round(window * size + call) for call in range(size)]
        for call, (values, weights) in enumerate(rows):
            weight = weights[RANK] + call  # the weights change from call to call too
            before = CALLS["n"]
            s.step(values[RANK], weight=weight)
            smoothed.step(values[RANK], weight=weight)
            assert CALLS["n"] - before == (2 if call == size - 1 else 0), (window, call, CALLS["n"] - before)
        cells = [(v, w + call) for call, (values, weights) in enumerate(rows) for v, w in zip(values, weights)]
        # a rank whose window saw a NaN (the last rank, at steps 5 and 11) is left out of it whole
        left_out = {SIZE - 1} if any(not math.isfinite(values[-1]) for values, _ in rows) else set()
        kept = [(v, w) for i, (v, w) in enumerate(cells) if i % SIZE not in left_out]
        expected = math.fsum(v * w for v, w in kept) / math.fsum(w for _, w in kept)
        assert math.isclose(s.last_global_metric, expected, rel_tol=1e-14), (window, s.last_global_metric, expected)
        ref.step(s.last_global_metric)
        ref_smoothed.step(s.last_global_metric)
        matches(s, ref)
        matches(smoothed, ref_smoothed)
        assert smoothed.last_smoothed_metric == ref_smoothed.ema_loss
    assert s.last_epoch == windows and s.get_last_lr()[0] < 1.0
    same_everywhere(s)
    same_everywhere(smoothed)


@check
def a_windows_nan_and_bad_input_act_at_its_last_call_on_every_rank() -> None:
    # raise: the rank whose window saw a NaN is named on every rank, at the window's last call
    s = make(accumulation_size=3, nan_policy="raise")
    s.step(1.0)
    s.step(math.nan if RANK == SIZE - 1 else 1.0)
    raises_everywhere(lambda: s.step(1.0), FloatingPointError, f"rank {SIZE - 1}")
    assert s.window_calls == 0 and s.last_epoch == 0
    # an unusable input on one rank inside the window: the same error on every rank, at its last call
    t = make(accumulation_size=3)
    before = CALLS["n"]
    t.step(1.0)
    t.step(None if RANK == SIZE - 1 else 1.0)
    assert CALLS["n"] == before
    raises_everywhere(lambda: t.step(1.0), TypeError, f"metric is None on rank {SIZE - 1}")
    for _ in range(3):  # and the next window is whole, in step on every rank
        t.step(float(RANK))
    assert t.last_global_metric == math.fsum(range(SIZE)) / SIZE and t.last_epoch == 1
    same_everywhere(t)


@check
def a_load_or_sync_in_mid_window_keeps_its_end_and_drops_the_calls_before() -> None:
    s = make(accumulation_size=4)
    for _ in range(6):
        s.step(100.0 + RANK)
    saved = s.state_dict()  # the same on every rank: the window count, not this rank's sums
    assert len(set(gather_object(repr(saved)))) == 1 and saved["window_calls"] == 2
    resumed = make()
    resumed.load_state_dict(saved)
    for value in (1.0, 3.0):
        before = CALLS["n"]
        resumed.step(value * (RANK + 1), weight=RANK + 1)
    assert CALLS["n"] - before == 1  # the window ended where the saving run's would have
    weights = [r + 1 for r in range(SIZE)]
    expected = math.fsum(v * w * w for w in weights for v in (1.0, 3.0)) / (2 * math.fsum(weights))
    assert math.isclose(resumed.last_global_metric, expected, rel_tol=1e-14)
    # sync_state: every rank, the source too, drops its sums and goes on from the source's count
    s.step(5.0)
    if RANK == 1:
        s.load_state_dict({**s.state_dict(), "window_calls": 0})
    s.sync_state(src=0)
    assert s.window_calls == 3
    with exactly_one_collective():
        s.step(7.0 + RANK)
    assert s.last_global_metric == math.fsum(7.0 + r for r in range(SIZE)) / SIZE
    same_everywhere(s)


@check
def horovod_elastic_restore_rolls_back_the_average_and_the_window() -> None:
    if BACKEND != "horovod":
        return
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    s = DistributedReduceLROnPlateau(opt, patience=0, smoothing_factor=0.5, accumulation_size=2)
    state = hvd.elastic.TorchState(model=model, optimizer=opt, scheduler=s)
    state.sync()
    for value in (1.0, 1.0, 2.0):  # one window, then a call into the next
        s.step(value + RANK)
    state.commit()
    committed = s.state_dict()
    s.step(50.0)  # the window ends: worse, a reduction
    assert opt.param_groups[0]["lr"] < 1.0
    s.step(7.0)
    state.restore()  # what hvd.elastic.run does after a HorovodInternalError
    assert s.state_dict() == committed and opt.param_groups[0]["lr"] == 1.0 and s.window_calls == 1
    s.step(3.0 + RANK)  # the replayed call ends the window; the sums from before the commit are gone
    assert s.last_global_metric == 3.0 + (SIZE - 1) / 2
    assert s.last_smoothed_metric == 0.5 * (1.0 + (SIZE - 1) / 2) + 0.5 * s.last_global_metric
    same_everywhere(s)


def main(argv: list[str] | None = None) -> None:
    backend, out = sys.argv[1:] if argv is None else argv
    init_backend(backend)
    count_collectives()
    results: dict[str, list[str]] = {}
    for name, fn in CHECKS.items():
        try:
            fn()
            err = ""
        except Exception:
            err = traceback.format_exc()
        # Always a str ("" for a pass): Horovod names allgather_object after the type, and ranks
        # gathering None and str would wait for each other forever.
        results[name] = gather_object(err)
        if RANK == 0:
            with open(out + ".tmp", "w") as f:
                json.dump({"size": SIZE, "backend": BACKEND, "results": results}, f)
            os.replace(out + ".tmp", out)
    if BACKEND == "horovod":
        hvd.shutdown()
    else:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
