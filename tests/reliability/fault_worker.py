"""One rank of a fault injected with real processes.

``python fault_worker.py BACKEND FAULT OUT [ARGS...]``, FAULT one of:

- ``kill``: the last rank SIGKILLs itself in the middle of step ``KILL_AT``; the others are in
  (or about to enter) that step's collective. Each rank records when it got which error.
- ``skip-exit`` / ``skip-sync``: rank 1 does not call ``step`` at epoch ``SKIP_AT``, then
  carries on; after the loop it ends its training (``exit``) or, like every rank, enters one
  more collective (``sync``: a 1-float sum, as a training loop's next gradient allreduce
  would). Each rank records its states, the limit on its Horovod adapter's wait and how its
  last operation ended.
- ``save``: run the first half of a schedule, then rank 0 saves scheduler and optimizer state.
- ``resume CKPT``: load that checkpoint (``weights_only=True``) on every rank and run the rest.

Every rank writes ``OUT.rank<R>.json`` as it goes (a rank may be killed or time out), and
ends with ``os._exit`` after an error, because a backend that lost a peer may hang in shutdown.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from distplateau import DistributedReduceLROnPlateau
from tests.reliability.cases import (
    CHECKPOINT_KWARGS,
    CHECKPOINT_RESUME_STEPS,
    CHECKPOINT_SAVE_STEPS,
    CHECKPOINT_SEED,
    checkpoint_rows,
    snapshot,
)

KILL_AT, SKIP_AT, STEPS = 5, 3, 8
#: Seconds that replace ``distplateau._gather.DEFAULT_TIMEOUT_S`` in this launch, if set.
FORCED_DEFAULT_ENV = "RELIABILITY_HOROVOD_DEFAULT_S"

# Set by main(): the command line and this rank's place in the backend, read by the faults below.
BACKEND, FAULT, OUT = "none", "", ""
RANK, SIZE = 0, 1
hvd: Any = None  # horovod.torch, under horovodrun
RECORD: dict[str, Any] = {}


def init_backend(backend: str) -> None:
    global BACKEND, RANK, SIZE, hvd
    BACKEND = backend
    if backend == "horovod":
        import horovod.torch

        from distplateau import _gather

        hvd = horovod.torch
        hvd.init()
        RANK, SIZE = hvd.rank(), hvd.size()
        # A launch cannot wait for the default bound of a Horovod step (30 minutes): it may force
        # a short one, which applies exactly as the real one does when the variable is unset.
        if os.environ.get(FORCED_DEFAULT_ENV):
            _gather.DEFAULT_TIMEOUT_S = float(os.environ[FORCED_DEFAULT_ENV])
    elif backend == "torch":
        timeout_s = float(os.environ.get("RELIABILITY_TIMEOUT_S", "30"))
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
        RANK, SIZE = dist.get_rank(), dist.get_world_size()


def write() -> None:
    path = f"{OUT}.rank{RANK}.json"
    with open(path + ".tmp", "w") as f:
        json.dump(RECORD, f)
    os.replace(path + ".tmp", path)


def failed(err: BaseException, where: str) -> None:
    RECORD.update(error=type(err).__name__, message=str(err)[:2000], error_at=time.time(), where=where)
    write()
    sys.stdout.flush()
    # Stay a moment, so that a peer whose timeout ends a few ms later reports its own error, not
    # this process's exit: horovodrun terminates every rank once one exits non-zero
    # (horovod/runner/gloo_run.py, 0.28.1). (Under torch.distributed gloo closes this rank's
    # connections as soon as its wait times out, exit or not: a peer then reads "Connection
    # closed by peer", which step() raises as ConnectionError.)
    time.sleep(1.0)
    os._exit(17)


def make() -> DistributedReduceLROnPlateau:
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    return DistributedReduceLROnPlateau(opt, **CHECKPOINT_KWARGS, backend=BACKEND)


def final_sync() -> None:
    if BACKEND == "horovod":
        hvd.allreduce(torch.ones(1), name="final_sync")
    elif BACKEND == "torch":
        dist.all_reduce(torch.ones(1))


def shutdown() -> None:
    if BACKEND == "horovod":
        hvd.shutdown()
    elif BACKEND == "torch":
        dist.destroy_process_group()


def kill() -> None:
    s = make()
    for t in range(STEPS):
        if t == KILL_AT and RANK == SIZE - 1:
            RECORD["killed_at"] = time.time()
            write()
            os.kill(os.getpid(), signal.SIGKILL)
        RECORD["entered"] = time.time()
        try:
            s.step(1.0 / (t + 1) + RANK)
        except Exception as err:
            failed(err, f"step {t}")
    RECORD.update(error=None, finished_at=time.time())
    write()


def skip(then: str) -> None:
    s = make()
    for t in range(STEPS):
        if t == SKIP_AT and RANK == 1:
            RECORD["skipped"] = t
            continue
        try:
            s.step(1.0 / (t + 1) + RANK, weight=RANK + 1)
        except Exception as err:
            failed(err, f"step {t}")
        RECORD["states"].append([t, snapshot(s), s.last_global_metric])
        if BACKEND == "horovod":
            RECORD["limit_s"] = getattr(s._gather, "timeout", "no Horovod adapter")
        write()
    RECORD["entered"] = time.time()
    write()
    if then == "sync":
        try:
            final_sync()
        except Exception as err:
            failed(err, "final collective")
    RECORD.update(error=None, finished_at=time.time())
    write()


def run_rows(s: DistributedReduceLROnPlateau, rows: list[list[list[Any]]]) -> None:
    for t, row in enumerate(rows):
        value, weight, _ = row[RANK]
        s.step(value, weight=weight)
        RECORD["states"].append([t, snapshot(s), s.last_global_metric])


def save() -> None:
    s = make()
    run_rows(s, checkpoint_rows(SIZE, CHECKPOINT_SAVE_STEPS, CHECKPOINT_SEED))
    if RANK == 0:
        torch.save({"scheduler": s.state_dict(), "optimizer": s.optimizer.state_dict()}, OUT + ".ckpt")
    write()


def resume(path: str) -> None:
    s = make()
    checkpoint = torch.load(path, weights_only=True)
    s.optimizer.load_state_dict(checkpoint["optimizer"])
    s.load_state_dict(checkpoint["scheduler"])
    RECORD["loaded"] = snapshot(s)
    run_rows(s, checkpoint_rows(SIZE, CHECKPOINT_RESUME_STEPS, CHECKPOINT_SEED + 1))
    write()


def main(argv: list[str] | None = None) -> None:
    global FAULT, OUT, RECORD
    args = sys.argv[1:] if argv is None else argv
    FAULT, OUT = args[1], args[2]
    init_backend(args[0])
    RECORD = {"rank": RANK, "size": SIZE, "backend": BACKEND, "fault": FAULT, "states": []}
    if FAULT == "kill":
        kill()
    elif FAULT in ("skip-exit", "skip-sync"):
        skip(FAULT.split("-")[1])
    elif FAULT == "save":
        save()
    elif FAULT == "resume":
        resume(args[3])
    else:
        raise SystemExit(f"unknown fault {FAULT!r}")
    shutdown()


if __name__ == "__main__":
    main()
