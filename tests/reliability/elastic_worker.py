"""One worker of a Horovod elastic run (launched by ``tests/reliability/elastic.py``).

``horovodrun ... --host-discovery-script DISCOVER python elastic_worker.py OUT``; ``OUT`` holds
``plan.json``, the ``hosts`` file the discovery script prints, and one record file per process.

The training is the recipe of ``docs/guides/elastic.md``: a ``DistributedOptimizer``, our
scheduler, and ``hvd.elastic.TorchState(model=..., optimizer=..., scheduler=...)`` with no
other call for the scheduler. The plan's phases change the world between epochs: rank 0
rewrites the hosts file (a host removed or added), or a worker SIGKILLs itself mid-epoch.

Checked here, on every rank, and recorded as ``mismatch`` when they fail: after every (re)entry
into the training function, ``state.scheduler`` is the live scheduler, its optimizer is the live
optimizer, and every rank holds the same scheduler state and learning rates; in every batch,
the optimizer's learning rates are the scheduler's; after every step, the gather adapter has
the current world's size and the default limit on its wait (``DISTPLATEAU_HOROVOD_TIMEOUT_S``
unset), and every rank agrees. Each committed epoch is recorded for the reference comparison,
and a ``step()`` that raises (a peer killed while this rank waits in it) as ``step_error``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import torch

from tests.reliability.elastic import KWARGS, LR0, Recorder, scheduler_state, shard_metric

EPOCH_SLEEP_S = 0.05  # an epoch of this toy model takes ~10 ms; resets wait for Horovod's 1 s discovery
BATCHES = 4
IN_STEP_S = 0.3  # a worker killed "in_step" dies this long after the others entered their step()


def main(argv: list[str] | None = None) -> None:
    import horovod.torch as hvd

    from distplateau import DistributedReduceLROnPlateau, _gather

    out = (sys.argv[1:] if argv is None else argv)[0]
    plan = json.loads(open(os.path.join(out, "plan.json")).read())
    phases, tail = plan["phases"], plan["tail"]
    record = Recorder(out)
    hvd.init()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR0),
                                         named_parameters=model.named_parameters())
    scheduler = DistributedReduceLROnPlateau(optimizer, **KWARGS)
    state = hvd.elastic.TorchState(model=model, optimizer=optimizer, scheduler=scheduler,
                                   epoch=0, phase=0, phase_epoch=0)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def mismatch(what: str) -> None:
        record("mismatch", what=what, rank=hvd.rank(), size=hvd.size())

    def lrs() -> list[float]:
        return [float(group["lr"]) for group in optimizer.param_groups]

    def same_on_every_rank(where: str) -> None:
        """One allgather of everything that must be equal across ranks."""
        mine = (repr(sorted(scheduler.state_dict().items())), repr(lrs()))
        everyone = hvd.allgather_object(mine)
        if len(set(everyone)) != 1:
            mismatch(f"{where}: ranks differ: {everyone}")

    @hvd.elastic.run
    def train(state: Any) -> None:
        record("enter", rank=hvd.rank(), size=hvd.size(), epoch=state.epoch, phase=state.phase,
               host=os.environ.get("HOROVOD_HOSTNAME"))
        if state.scheduler is not scheduler or scheduler.optimizer is not optimizer or state.optimizer is not optimizer:
            mismatch("state.scheduler is not the live scheduler, or its optimizer not the live optimizer")
        same_on_every_rank("after the reset")
        while state.phase < len(phases) or state.epoch < state.phase_epoch + tail:
            epoch, size = state.epoch, hvd.size()
            phase = phases[state.phase] if state.phase < len(phases) else {}
            if phase and size == phase["size"] and _acted(out, phase, state):
                state.phase, state.phase_epoch = state.phase + 1, epoch
                # Saved at once: a HorovodInternalError restores the last save, and a phase undone
                # there waits for a world it already had. (A kill in the epoch of the advance left
                # the plan waiting at 2 ranks until the launch's timeout: CI, 2026-12-06.)
                state.save()
                continue
            kill_now = (phase.get("kill") and epoch >= state.phase_epoch + phase["after"] and epoch % 5 == 3
                        and not os.path.exists(os.path.join(out, f"killed-{state.phase}"))
                        and hvd.rank() == (0 if phase["kill"] == "first" else size - 1))
            train_lrs = lrs()
            for batch in range(BATCHES):
                if kill_now and phase["where"] == "mid_batches" and batch == BATCHES // 2:
                    _kill(out, state.phase, record, phase["where"])
                if lrs() != scheduler.get_last_lr():
                    mismatch(f"epoch {epoch}: optimizer lr {lrs()} != scheduler's {scheduler.get_last_lr()}")
                rows = slice(hvd.rank() + batch * size, None, BATCHES * size)
                optimizer.zero_grad()
                torch.nn.functional.mse_loss(model(x[rows]).squeeze(1), y[rows]).backward()
                optimizer.step()
            metric, weight = shard_metric(epoch, hvd.rank(), size)
            if kill_now and phase["where"] == "in_step":
                time.sleep(IN_STEP_S)  # the other rank waits in step() meanwhile, past its first polls
                _kill(out, state.phase, record, phase["where"])
            entered = time.time()
            try:
                scheduler.step(metric, weight=weight)
            except Exception as err:  # HorovodInternalError when a peer dies: hvd.elastic.run resets
                record("step_error", epoch=epoch, rank=hvd.rank(), size=size, error=type(err).__name__,
                       waited=time.time() - entered)
                raise
            record("step", epoch=epoch, rank=hvd.rank(), size=size)
            if kill_now and phase["where"] == "after_step":
                _kill(out, state.phase, record, phase["where"])
            gather = scheduler._gather
            if gather is None or gather.size != size:
                mismatch(f"epoch {epoch}: gather adapter of size {gather and gather.size} in a world of {size}")
            elif size > 1 and getattr(gather, "timeout", None) != _gather.DEFAULT_TIMEOUT_S:
                mismatch(f"epoch {epoch}: the adapter's limit is {getattr(gather, 'timeout', None)}, not the default")
            same_on_every_rank(f"epoch {epoch}")
            time.sleep(EPOCH_SLEEP_S)
            state.epoch = epoch + 1
            # state.commit() is save() then check_host_updates(): the epoch is committed once
            # save() returns, even if the check then raises for a reset.
            state.save()
            record("commit", epoch=epoch, rank=hvd.rank(), size=size, metric=scheduler.last_global_metric,
                   train_lrs=repr(train_lrs), state=scheduler_state(scheduler))
            if phase.get("hosts") and epoch + 1 >= state.phase_epoch + phase["after"] and hvd.rank() == 0:
                _write_hosts(out, phase["hosts"], record)
            state.check_host_updates()
        record("done", rank=hvd.rank(), size=hvd.size(), epoch=state.epoch)

    train(state)


def _acted(out: str, phase: dict[str, Any], state: Any) -> bool:
    """Whether the phase's action already happened (files, so that a rollback does not repeat it)."""
    if "hosts" in phase:
        return open(os.path.join(out, "hosts")).read().split() == phase["hosts"]
    if "kill" in phase:
        return os.path.exists(os.path.join(out, f"killed-{state.phase}"))
    return True


def _write_hosts(out: str, hosts: list[str], record: Recorder) -> None:
    path = os.path.join(out, "hosts")
    if open(path).read().split() == hosts:
        return
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(hosts) + "\n")
    os.replace(path + ".tmp", path)
    record("hosts", hosts=hosts)


def _kill(out: str, phase: int, record: Recorder, where: str) -> None:
    open(os.path.join(out, f"killed-{phase}"), "w").close()
    record("kill", where=where, phase=phase)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main()
