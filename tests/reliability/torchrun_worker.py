"""One worker of a torchrun elastic run (launched by ``tests/reliability/elastic.py``).

``torchrun --nnodes=1:2 --max-restarts=2 ... torchrun_worker.py OUT PLAN``; ``PLAN`` is one
launch of ``elastic.CI_TORCHRUN``: train until epoch ``until``, and in the first attempt
(``TORCHELASTIC_RESTART_COUNT`` 0) let rank ``kill["rank"]`` SIGKILL itself at epoch
``kill["epoch"]``, right after its ``step()`` or in the middle of the epoch's batches.

The training is the recipe of ``docs/guides/elastic.md``: every rank loads the last checkpoint
(``weights_only=True``) if there is one; after every epoch's ``step()`` rank 0 writes the next
one (atomically). A worker that dies before that write makes torchrun restart every worker,
and the epoch is trained again from the checkpoint. Checked on every rank and recorded as
``mismatch`` when they fail: the same scheduler state and learning rates on every rank after
the resume and after every step, and the optimizer's learning rates equal to the scheduler's
in every batch.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import time

import torch

from tests.reliability.elastic import KWARGS, LR0, Recorder, scheduler_state, shard_metric

BATCHES = 4


def main(argv: list[str] | None = None) -> None:
    import torch.distributed as dist

    from distplateau import DistributedReduceLROnPlateau

    out, plan_path = sys.argv[1:] if argv is None else argv
    plan = json.loads(open(plan_path).read())
    record = Recorder(out)
    restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    # torchrun keeps one store across restarts: without a prefix per restart, a restarted
    # worker can read a dead worker's gloo address and fail to connect (torch 2.13).
    timeout = datetime.timedelta(seconds=30)
    store = dist.PrefixStore(f"restart-{restart}", dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout))
    dist.init_process_group("gloo", store=store, rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR0)
    scheduler = DistributedReduceLROnPlateau(optimizer, **KWARGS)
    checkpoint = os.path.join(out, "checkpoint.pt")
    epoch = 0
    if os.path.exists(checkpoint):
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.module.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        epoch = saved["epoch"]
    kill_file = os.path.join(out, f"killed-{plan['nproc']}")
    record("enter", rank=rank, size=world, epoch=epoch, restart=restart)
    if restart and rank == 0:
        record("restart", size=world, epoch=epoch, killed_at=float(open(kill_file).read()))
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def lrs() -> list[float]:
        return [float(group["lr"]) for group in optimizer.param_groups]

    def same_on_every_rank(where: str) -> None:
        everyone: list[object] = [None] * world
        dist.all_gather_object(everyone, (repr(sorted(scheduler.state_dict().items())), repr(lrs())))
        if len(set(everyone)) != 1:
            record("mismatch", what=f"{where}: ranks differ: {everyone}")

    def kill(where: str) -> None:
        with open(kill_file, "w") as f:
            f.write(repr(time.time()))
        record("kill", where=where)
        os.kill(os.getpid(), signal.SIGKILL)

    same_on_every_rank("after the resume")
    kill_at = plan.get("kill") if restart == 0 else None
    while epoch < plan["until"]:
        victim = kill_at is not None and epoch == kill_at["epoch"] and rank == kill_at["rank"]
        train_lrs = lrs()
        for batch in range(BATCHES):
            if victim and kill_at["where"] == "mid_batches" and batch == BATCHES // 2:
                kill("mid_batches")
            if lrs() != scheduler.get_last_lr():
                record("mismatch", what=f"epoch {epoch}: optimizer lr {lrs()} != scheduler's {scheduler.get_last_lr()}")
            rows = slice(rank + batch * world, None, BATCHES * world)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x[rows]).squeeze(1), y[rows]).backward()
            optimizer.step()
        metric, weight = shard_metric(epoch, rank, world)
        scheduler.step(metric, weight=weight)
        record("step", epoch=epoch, rank=rank, size=world)
        if victim and kill_at["where"] == "after_step":
            kill("after_step")
        same_on_every_rank(f"epoch {epoch}")
        if rank == 0:
            state = {"epoch": epoch + 1, "model": model.module.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict()}
            torch.save(state, checkpoint + ".tmp")
            os.replace(checkpoint + ".tmp", checkpoint)
            record("commit", epoch=epoch, rank=rank, size=world, metric=scheduler.last_global_metric,
                   train_lrs=repr(train_lrs), state=scheduler_state(scheduler))
        epoch += 1
    record("done", rank=rank, size=world, epoch=epoch)
    dist.barrier()
    dist.destroy_process_group()
    # gloo's abort at exit (docs/troubleshooting.md) still hit ~1 launch in 10 at 4 ranks on 2
    # cores, and torchrun restarts a worker that aborts: end without interpreter shutdown.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
