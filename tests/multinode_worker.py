"""One rank of a plain training loop spread over several "hosts" (``tests/netns.py``).

    torchrun --nnodes 2 --nproc-per-node 2 --node-rank N --master-addr A --master-port P \\
        tests/multinode_worker.py torch OUT [options]          # on each node
    horovodrun -np 4 -H A:2,B:2 --gloo --network-interface dpnet0 \\
        python tests/multinode_worker.py horovod OUT [options]  # on node 0

A linear model trained data-parallel (DDP / ``hvd.DistributedOptimizer``) with a
``DistributedReduceLROnPlateau`` stepped once per epoch on this rank's validation mean, weighted by
its number of samples; 11 validation samples split over the ranks give uneven shards. The loss of
each sample is scripted (:func:`sample_loss`), so the launcher knows every global metric and the
whole learning-rate trajectory in advance (:func:`reference`).

Each rank rewrites ``OUT/rank{r}.json`` after every epoch: where it ran (hostname, local rank,
node), per epoch the learning rate it trained with, the global metric and the scheduler state,
and at the end its weights; a rank that raises records the exception, its message and the time.
Rank 0 writes ``OUT/checkpoint.pt`` after every step; ``--resume`` starts from it.

Options for the fault measurements of ``tests/multinode.py``: ``--hold-host H --hold-epoch E``
makes the ranks on host ``H`` write ``OUT/held-<rank>`` and sleep ``--hold-s`` seconds before
their step of epoch ``E``, so that the other ranks are waiting inside ``step()`` when the launcher
injects the fault. ``--timeout`` is torch.distributed's ``init_process_group(timeout=...)``;
Horovod reads ``DISTPLATEAU_HOROVOD_TIMEOUT_S`` from the environment. ``--bench N`` times ``N``
more ``step()`` calls after training.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import socket
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import torch

#: The scheduler's arguments; the reference gets the same ones.
KWARGS: dict[str, Any] = {"mode": "min", "factor": 0.5, "patience": 1, "min_lr": 1e-4}
LR0 = 0.2
VALIDATION = 11  # samples of the whole job; rank r validates samples r, r + world, ...


def sample_loss(epoch: int, i: int) -> float:
    """Validation loss of sample ``i`` at ``epoch``: three epochs of improvement, then a
    plateau of two, so that ``patience=1`` halves the learning rate every five epochs."""
    block, within = divmod(epoch, 5)
    return (0.5 + (i % 4) * 0.25 + (i == 0) * 3.0) / (1.0 + 3 * block + min(within, 2))


def shard_metric(epoch: int, rank: int, world: int) -> tuple[float, int]:
    """This rank's mean validation loss and its number of samples."""
    losses = [sample_loss(epoch, i) for i in range(rank, VALIDATION, world)]
    return math.fsum(losses) / len(losses), len(losses)


def global_metric(epoch: int, world: int) -> float:
    """The documented rule: ``fsum(weight * value) / fsum(weight)`` over the ranks' records."""
    shards = [shard_metric(epoch, r, world) for r in range(world)]
    return math.fsum(v * w for v, w in shards) / math.fsum(w for _, w in shards)


def reference(epochs: int, world: int) -> list[dict[str, Any]]:
    """What every rank must record per epoch: torch's own scheduler fed the global metrics."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **KWARGS)
    rows = []
    for epoch in range(epochs):
        trained_with = opt.param_groups[0]["lr"]
        sched.step(global_metric(epoch, world))
        rows.append({"epoch": epoch, "lr": trained_with, "global": global_metric(epoch, world),
                     "state": state_of(sched)})
    return rows


def state_of(s: Any) -> dict[str, Any]:
    return {"lrs": repr(s.get_last_lr()), "best": repr(s.best), "num_bad_epochs": s.num_bad_epochs,
            "cooldown_counter": s.cooldown_counter, "last_epoch": s.last_epoch}


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("backend", choices=["torch", "horovod"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=60.0, help="torch.distributed timeout, seconds")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--hold-host", default="")
    parser.add_argument("--hold-epoch", type=int, default=-1)
    parser.add_argument("--hold-s", type=float, default=2.0)
    parser.add_argument("--bench", type=int, default=0)
    args = parser.parse_args(argv)

    from distplateau import DistributedReduceLROnPlateau

    hostname = socket.gethostname()
    record: dict[str, Any] = {"hostname": hostname, "pid": os.getpid(), "epochs": [], "error": None}
    t0 = time.time()
    if args.backend == "torch":
        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
        rank, world = dist.get_rank(), dist.get_world_size()
        record.update(local_rank=int(os.environ["LOCAL_RANK"]), node=int(os.environ["GROUP_RANK"]),
                      local_size=int(os.environ["LOCAL_WORLD_SIZE"]))
    else:
        import horovod.torch as hvd

        hvd.init()
        rank, world = hvd.rank(), hvd.size()
        record.update(local_rank=hvd.local_rank(), local_size=hvd.local_size(), cross_rank=hvd.cross_rank(),
                      cross_size=hvd.cross_size(), horovod_hostname=os.environ.get("HOROVOD_HOSTNAME"))
    record.update(rank=rank, size=world, init_s=time.time() - t0)
    out = args.out / f"rank{rank}.json"
    try:
        _train(args, record, rank, world, out, DistributedReduceLROnPlateau)
    except BaseException as err:
        record["error"] = {"type": type(err).__name__, "message": str(err)[:2000], "t": time.time(),
                           "traceback": traceback.format_exc()[-4000:]}
        _write(out, record)
        raise
    record["done"] = time.time()
    _write(out, record)
    if args.backend == "torch":
        dist.barrier()  # against gloo's abort at exit, see docs/troubleshooting.md
        dist.destroy_process_group()
    else:
        hvd.shutdown()


def _train(args: argparse.Namespace, record: dict[str, Any], rank: int, world: int, out: Path,
           scheduler_class: Any) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR0)
    if args.backend == "torch":
        import torch.distributed as dist

        net: torch.nn.Module = torch.nn.parallel.DistributedDataParallel(model)

        def same_everywhere(obj: Any) -> list[Any]:
            everyone: list[Any] = [None] * world
            dist.all_gather_object(everyone, obj)
            return everyone
    else:
        import horovod.torch as hvd

        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
        net = model
        same_everywhere = hvd.allgather_object
    scheduler = scheduler_class(optimizer, **KWARGS)
    checkpoint = args.out / "checkpoint.pt"
    first = 0
    if args.resume and checkpoint.exists():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        first = saved["epoch"]
    record["first_epoch"] = first
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=gen)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    for epoch in range(first, args.epochs):
        lr = optimizer.param_groups[0]["lr"]
        for batch in range(2):
            rows = slice(rank + batch * world, None, 2 * world)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(net(x[rows]).squeeze(1), y[rows]).backward()
            optimizer.step()
        metric, weight = shard_metric(epoch, rank, world)
        if epoch == args.hold_epoch and record["hostname"] == args.hold_host:
            (args.out / f"held-{rank}").write_text(repr(time.time()))
            time.sleep(args.hold_s)
        t = time.time()
        scheduler.step(metric, weight=weight)
        record["epochs"].append({"epoch": epoch, "lr": lr, "global": scheduler.last_global_metric,
                                 "state": state_of(scheduler), "step_s": time.time() - t, "t": time.time()})
        if rank == 0:
            state = {"epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict()}
            torch.save(state, str(checkpoint) + ".tmp")
            os.replace(str(checkpoint) + ".tmp", checkpoint)
        _write(out, record)
    weights = [p.detach().tolist() for p in model.parameters()]
    record["weights"] = weights
    record["weights_same_everywhere"] = len({repr(w) for w in same_everywhere(weights)}) == 1
    if args.bench:
        bench = scheduler_class(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), patience=10**9)
        same_everywhere(None)  # start together
        times = []
        for i in range(args.bench):
            t = time.perf_counter()
            bench.step(float(i % 7), weight=rank + 1)
            times.append(time.perf_counter() - t)
        record["bench_us"] = {"median": 1e6 * statistics.median(times),
                              "p90": 1e6 * sorted(times)[int(0.9 * len(times))], "steps": len(times)}


if __name__ == "__main__":
    main()
