"""One rank of an equivalence campaign: replay every case, then inject faults (c) and (e).

Launched as ``python equivalence_worker.py BACKEND CASES.json OUT`` on every rank (one plain
process for backend ``none``, ``horovodrun -np N --gloo`` for ``horovod``, N processes with the
env:// variables for ``torch``). After every step this rank's scheduler state is compared with
torch's own ``ReduceLROnPlateau`` fed the value of ``cases.expected_step``; each rank writes
``OUT.rank<R>.json`` (its counts, mismatches and fault outcomes) and never exchanges results
through the backend, so the campaign itself uses no object collective. The launcher compares
the ranks' files.
"""

from __future__ import annotations

import copy
import datetime
import io
import json
import math
import os
import pickle
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import ReduceLROnPlateau

from distplateau import DistributedReduceLROnPlateau
from tests.reliability.cases import expected_step, snapshot

# Set by main(): the command line and this rank's place in the backend, read by the campaign below.
BACKEND, OUT = "none", ""
RANK, SIZE = 0, 1
hvd: Any = None  # horovod.torch, under horovodrun
_modules: list[Any] = []  # the backend modules whose object collectives are counted


def init_backend(backend: str) -> None:
    global BACKEND, RANK, SIZE, hvd, _modules
    BACKEND = backend
    if backend == "horovod":
        import horovod.torch

        hvd = horovod.torch
        hvd.init()
        RANK, SIZE = hvd.rank(), hvd.size()
        _modules = [hvd]
    elif backend == "torch":
        timeout = datetime.timedelta(seconds=float(os.environ.get("RELIABILITY_TIMEOUT_S", "60")))
        dist.init_process_group("gloo", timeout=timeout)
        RANK, SIZE = dist.get_rank(), dist.get_world_size()
        _modules = [dist, dist.distributed_c10d]

# Security: count every unpickling and every object collective made while step() runs. The
# wrappers call the real functions; nothing is replaced by a fake.
IN_STEP = {"on": False}
UNPICKLES = {"n": 0}


def _counting(fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if IN_STEP["on"]:
            UNPICKLES["n"] += 1
        return fn(*args, **kwargs)

    return wrapper


def count_unpickling() -> None:
    for module, name in [(pickle, "loads"), (pickle, "load")] + [
        (m, n) for m in _modules for n in dir(m) if n.endswith("_object") or n.endswith("_object_list")
        or n == "_unpickler"
    ]:
        setattr(module, name, _counting(getattr(module, name)))
    try:
        import cloudpickle

        cloudpickle.loads = _counting(cloudpickle.loads)
    except ImportError:
        pass


def step(s: DistributedReduceLROnPlateau, metric: Any, weight: Any = None, passed: bool = True) -> None:
    IN_STEP["on"] = True
    try:
        if passed:
            s.step(metric, weight=weight)
        else:
            s.step(metric)
    finally:
        IN_STEP["on"] = False


def optimizer(lrs: list[float]) -> torch.optim.Optimizer:
    params = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(params, lr=lrs[0])


def as_kind(value: float, kind: str) -> Any:
    if kind == "tensor":
        return torch.tensor(value, dtype=torch.float64)
    if kind == "numpy":
        return np.float64(value)
    return value


def backend_for(index: int) -> str:
    if BACKEND == "none":
        return "none" if index % 2 == 0 else "auto"  # auto with nothing initialised: one process
    return BACKEND if index % 2 == 0 else "auto"


class Campaign:
    def __init__(self) -> None:
        self.cases = 0
        self.steps = 0
        self.expected_errors = 0
        self.mismatched_cases = 0
        self.mismatches: list[dict[str, Any]] = []
        self.faults: list[dict[str, Any]] = []

    def mismatch(self, **what: Any) -> None:
        if len(self.mismatches) < 20:
            self.mismatches.append({k: repr(v) for k, v in what.items()})

    def write(self) -> None:
        data = {"backend": BACKEND, "rank": RANK, "size": SIZE, "cases": self.cases, "steps": self.steps,
                "expected_errors": self.expected_errors, "mismatched_cases": self.mismatched_cases,
                "mismatches": self.mismatches, "faults": self.faults, "unpickles_in_step": UNPICKLES["n"]}
        path = f"{OUT}.rank{RANK}.json"
        with open(path + ".tmp", "w") as f:
            json.dump(data, f)
        os.replace(path + ".tmp", path)

    # --- part 1: equivalence ----------------------------------------------------------------
    def replay(self, index: int, case: dict[str, Any]) -> None:
        kw = case["kwargs"]
        torch_kw = {k: v for k, v in kw.items() if k not in ("reduction", "nan_policy", "stop_patience")}
        ours = DistributedReduceLROnPlateau(optimizer(case["lrs"]), **kw, backend=backend_for(index))
        ref = ReduceLROnPlateau(optimizer(case["lrs"]), **torch_kw)
        last_finite: float | None = None
        since_best = 0  # the reference's steps without a new best: what stop_patience counts
        bad = False
        for t, row in enumerate(case["steps"]):
            value, weight, kind = row[RANK]
            want = expected_step(row, kw["reduction"], kw["nan_policy"], last_finite)
            before = snapshot(ours)
            before_metric = ours.last_global_metric
            raised = None
            try:
                step(ours, as_kind(value, kind), weight, passed=weight is not None)
            except Exception as err:  # compared with the expectation below
                raised = err
            self.steps += 1
            if want.error is not None:
                self.expected_errors += 1
                ok = type(raised).__name__ == want.error and snapshot(ours) == before \
                    and repr(ours.last_global_metric) == repr(before_metric)
            elif raised is not None:
                ok = False
            else:
                if want.value is not None:
                    best = ref.best
                    ref.step(want.value)
                    since_best = 0 if ref.best != best else since_best + 1
                    last_finite = want.value if math.isfinite(want.value) else last_finite
                    ok = repr(ours.last_global_metric) == repr(want.value)
                else:
                    ok = repr(ours.last_global_metric) == repr(before_metric)
                ok = ok and snapshot(ours) == snapshot(ref)
            stop = kw.get("stop_patience") is not None and since_best >= kw["stop_patience"]
            ok = ok and ours.steps_since_best == since_best and ours.should_stop == stop
            if not ok:
                bad = True
                self.mismatch(case=case["id"], step=t, rank=RANK, expected=want, raised=raised,
                              ours=snapshot(ours), reference=snapshot(ref), metric=ours.last_global_metric)
        # The state survives a weights_only round trip and carries on identically.
        buf = io.BytesIO()
        torch.save(ours.state_dict(), buf)
        buf.seek(0)
        again = DistributedReduceLROnPlateau(optimizer(case["lrs"]), **kw, backend="none")
        again.load_state_dict(torch.load(buf, weights_only=True))
        for g, lr in zip(again.optimizer.param_groups, ours.optimizer.param_groups):
            g["lr"] = lr["lr"]
        if snapshot(again) != snapshot(ours) or again.fingerprint() != ours.fingerprint():
            bad = True
            self.mismatch(case=case["id"], step="state_dict round trip", rank=RANK, ours=snapshot(ours),
                          reloaded=snapshot(again))
        self.cases += 1
        self.mismatched_cases += bad

    # --- part 2: faults (c) bad input on one rank, (e) state altered on one rank -------------
    def fault(self, kind: str, culprit: int, fn: Callable[[], None], exc: type[BaseException],
              needles: tuple[str, ...]) -> None:
        start = time.perf_counter()
        outcome: dict[str, Any] = {"kind": kind, "culprit": culprit}
        try:
            fn()
        except exc as err:
            outcome.update(error=type(err).__name__, message=str(err))
            missing = [n for n in needles if n not in str(err)]
            if missing:
                outcome["failure"] = f"{missing} not in the message"
        except Exception as err:
            outcome.update(error=type(err).__name__, message=str(err),
                           failure=f"expected {exc.__name__}, got {traceback.format_exc()}")
        else:
            outcome.update(error=None, message=None, failure=f"{exc.__name__} not raised")
        outcome["seconds"] = time.perf_counter() - start
        self.faults.append(outcome)

    def bad_inputs(self) -> None:
        bad: list[tuple[str, Any, Any, type[Exception], str]] = [
            ("metric None", None, None, TypeError, "metric is None"),
            ("metric str", "0.5", None, TypeError, "metric is a str"),
            ("metric bool", True, None, TypeError, "metric is a bool"),
            ("metric numpy bool", np.bool_(True), None, TypeError, "metric is a bool"),
            ("metric list", [1.0], None, TypeError, "metric is not a real number"),
            ("metric dict", {"loss": 1.0}, None, TypeError, "metric is not a real number"),
            ("metric complex", 1 + 2j, None, TypeError, "metric is not a real number"),
            ("metric complex tensor", torch.tensor(1 + 1j), None, TypeError, "metric is not a real number"),
            ("metric bool tensor", torch.tensor(True), None, TypeError, "metric is not a real number"),
            ("metric tensor of 3", torch.ones(3), None, ValueError, "metric has 3 elements"),
            ("metric empty tensor", torch.ones(0), None, ValueError, "metric has 0 elements"),
            ("metric numpy 2x2", np.ones((2, 2)), None, ValueError, "metric has 4 elements"),
            ("weight negative", 1.0, -1.0, ValueError, "weight is negative"),
            ("weight NaN", 1.0, math.nan, ValueError, "weight is not finite"),
            ("weight +Inf", 1.0, math.inf, ValueError, "weight is not finite"),
            ("weight str", 1.0, "3", TypeError, "weight is not a real number"),
            ("weight None-like list", 1.0, [1], TypeError, "weight is not a real number"),
            ("weight tensor of 2", 1.0, torch.ones(2), ValueError, "weight has 2 elements"),
            ("weight bool", 1.0, True, TypeError, "weight is not a real number"),
        ]
        s = DistributedReduceLROnPlateau(optimizer([1.0]), patience=1, backend=BACKEND if SIZE > 1 else "none")
        ref = ReduceLROnPlateau(optimizer([1.0]), patience=1)
        for i, (name, metric, weight, exc, text) in enumerate(bad):
            culprit = i % SIZE
            good = 1.0 / (i + 1)
            step(s, good)
            ref.step(good)
            before = snapshot(s)
            m, w = (metric, weight) if RANK == culprit else (0.5, 1.0)
            self.fault(f"bad input: {name}", culprit, lambda m=m, w=w: step(s, m, w), exc,
                       (text, f"on rank {culprit}"))
            if snapshot(s) != before or snapshot(s) != snapshot(ref):
                self.faults[-1]["failure"] = f"state changed by a failed step: {snapshot(s)} vs {snapshot(ref)}"
        # Every rank with weight 0 is the same kind of error.
        self.fault("bad input: weight 0 on every rank", 0, lambda: step(s, 1.0, 0), ValueError,
                   ("every rank passed weight 0",))

    def altered_state(self) -> None:
        if SIZE == 1:
            return  # one rank has nothing to disagree with
        alterations: list[tuple[str, Callable[[DistributedReduceLROnPlateau], None]]] = [
            ("best", lambda s: setattr(s, "best", math.nextafter(s.best, math.inf))),
            ("num_bad_epochs", lambda s: setattr(s, "num_bad_epochs", s.num_bad_epochs + 1)),
            ("cooldown_counter", lambda s: setattr(s, "cooldown_counter", s.cooldown_counter + 1)),
            ("last_epoch", lambda s: setattr(s, "last_epoch", s.last_epoch + 1)),
            ("learning rate", lambda s: s.optimizer.param_groups[0].__setitem__("lr", 0.5)),
            ("factor", lambda s: setattr(s, "factor", 0.5)),
            ("patience", lambda s: setattr(s, "patience", s.patience + 1)),
            ("threshold", lambda s: setattr(s, "threshold", s.threshold * 2)),
            ("threshold_mode", lambda s: setattr(s, "threshold_mode", "abs")),
            ("mode", lambda s: setattr(s, "mode", "max")),
            ("cooldown", lambda s: setattr(s, "cooldown", s.cooldown + 1)),
            ("min_lrs", lambda s: setattr(s, "min_lrs", [0.25])),
            ("eps", lambda s: setattr(s, "eps", 1e-9)),
            ("reduction", lambda s: setattr(s, "reduction", "max")),
            ("nan_policy", lambda s: setattr(s, "nan_policy", "skip")),
            ("last_finite_metric", lambda s: setattr(s, "last_finite_metric", 123.0)),
            ("older checkpoint loaded on one rank", lambda s: s.load_state_dict(OLDER)),
        ]
        s = DistributedReduceLROnPlateau(optimizer([1.0]), patience=2, cooldown=1, backend=BACKEND)
        ref = ReduceLROnPlateau(optimizer([1.0]), patience=2, cooldown=1)
        step(s, 3.0)
        ref.step(3.0)
        OLDER.update(copy.deepcopy(s.state_dict()))
        for i, (name, alter) in enumerate(alterations):
            culprit = (i + 1) % SIZE
            step(s, 2.0 + i)
            ref.step(2.0 + i)
            good, lrs = copy.deepcopy(s.state_dict()), [g["lr"] for g in s.optimizer.param_groups]
            if RANK == culprit:
                alter(s)
            self.fault(f"state altered: {name}", culprit, lambda: step(s, 1.0), RuntimeError,
                       ("scheduler state differs across ranks", f"rank {culprit}"))
            s.load_state_dict(good)  # the remedy the message names: the same state on every rank
            for g, lr in zip(s.optimizer.param_groups, lrs):
                g["lr"] = lr
            if snapshot(s) != snapshot(ref):
                self.faults[-1]["failure"] = f"not restored: {snapshot(s)} vs {snapshot(ref)}"
        step(s, 0.5)
        ref.step(0.5)
        if snapshot(s) != snapshot(ref):
            self.faults.append({"kind": "state altered: recovery", "culprit": -1, "error": None,
                                "message": None, "seconds": 0.0,
                                "failure": f"{snapshot(s)} vs {snapshot(ref)}"})


OLDER: dict[str, Any] = {}


def main(argv: list[str] | None = None) -> None:
    global OUT
    backend, cases_path, OUT = sys.argv[1:] if argv is None else argv
    init_backend(backend)
    count_unpickling()
    with open(cases_path) as f:
        cases = json.load(f)
    campaign = Campaign()
    for index, case in enumerate(cases):
        assert case["world"] == SIZE, (case["world"], SIZE)
        campaign.replay(index, case)
        if index % 50 == 49:
            campaign.write()
    campaign.write()
    campaign.bad_inputs()
    campaign.altered_state()
    campaign.write()
    if BACKEND == "horovod":
        hvd.shutdown()
    elif BACKEND == "torch":
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
