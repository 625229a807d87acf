"""Rank script of ``bench/soak.py``: one long run of ``step`` with random input, on one rank.

Launched by ``bench/soak.py`` as ``horovodrun -np 2 --gloo python bench/soak_worker.py horovod
OUT STEPS SEED`` or as 2 torch.distributed processes with backend ``torch`` (gloo). Every rank
steps one :class:`~distplateau.DistributedReduceLROnPlateau` ``STEPS`` times on its own random
metric (a float or a 0-d tensor; NaN or Inf one step in a hundred) and weight (0 one step in
twenty, on rank 1 only, so that some rank always contributes), and calls ``sync_state`` every
:data:`BLOCK` steps, alternating the source rank, which first restarts its own learning rates.
At the end of every block, before that ``sync_state`` (which would hide a divergence), it notes
the time the block took, its resident memory (anonymous and file-backed) and a digest of its
scheduler state and learning rates. Each rank writes ``OUT.rank<R>.json``; ``bench/soak.py``
compares the ranks' digests and fits the trends.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import random
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distplateau import DistributedReduceLROnPlateau  # noqa: E402

BLOCK = 1000  #: steps between two samples, and between two sync_state calls
INITIAL_LRS = (0.1, 0.05)  #: of the two parameter groups


def memory_kib() -> dict[str, int]:
    """This process's resident memory now (not its peak), from /proc: ``anon`` (heap and other
    private memory, where a leak shows) and ``file`` (mapped files, mostly torch's shared
    libraries, which the kernel may drop and read back at any time)."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {"anon": int(fields["RssAnon"].split()[0]), "file": int(fields["RssFile"].split()[0])}


def digest(scheduler: DistributedReduceLROnPlateau) -> str:
    lrs = [group["lr"] for group in scheduler.optimizer.param_groups]
    return hashlib.sha256(repr((sorted(scheduler.state_dict().items()), lrs)).encode()).hexdigest()[:16]


def metric(rng: random.Random, t: int) -> Any:
    """A validation loss that keeps making new bests now and then: a slow downward drift, noise,
    and one bad value in a hundred."""
    roll = rng.random()
    if roll < 0.005:
        return math.nan
    if roll < 0.01:
        return math.inf
    value = 10.0 / (1 + t / 20000) + rng.gauss(0, 0.05)
    return torch.tensor(value, dtype=torch.float64) if rng.random() < 0.5 else value


def main(argv: list[str] | None = None) -> None:
    backend, out, steps, seed = (argv or sys.argv[1:])[:4]
    if backend == "horovod":
        import horovod.torch as hvd

        hvd.init()
        rank, size = hvd.rank(), hvd.size()
    else:
        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
        rank, size = dist.get_rank(), dist.get_world_size()
    # One warning per non-finite step from rank 0 would be ~1000 lines: the path runs, quietly.
    logging.getLogger("distplateau").setLevel(logging.ERROR)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD([{"params": [model.weight], "lr": INITIAL_LRS[0]},
                                 {"params": [model.bias], "lr": INITIAL_LRS[1]}])
    scheduler = DistributedReduceLROnPlateau(optimizer, factor=0.7, patience=3, cooldown=1, min_lr=1e-6,
                                             nan_policy="drop", backend=backend)
    rng = random.Random(int(seed) * 1000 + rank)
    samples: list[dict[str, Any]] = []
    start = time.perf_counter()
    for t in range(int(steps)):
        weight = 0.0 if rank == 1 and rng.random() < 0.05 else rng.randint(1, 500)
        scheduler.step(metric(rng, t), weight=weight)
        if (t + 1) % BLOCK == 0:
            now = time.perf_counter()
            samples.append({"step": t + 1, "block_s": now - start, "memory_kib": memory_kib(),
                            "digest": digest(scheduler)})
            src = (t // BLOCK) % size
            if rank == src:
                # A warm restart on the source rank only: sync_state must carry it to the other
                # rank (else the next step raises: the state differs), and it keeps the learning
                # rate moving all run long instead of resting at min_lr after ~200 steps.
                for group, lr in zip(optimizer.param_groups, INITIAL_LRS):
                    group["lr"] = lr
            scheduler.sync_state(src=src)
            start = time.perf_counter()
    result = {"rank": rank, "size": size, "backend": backend, "steps": int(steps), "samples": samples,
              "last_epoch": scheduler.last_epoch, "best": scheduler.best}
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(result, f)
    if backend == "torch":
        torch.distributed.barrier()  # a last collective of our own before exit: docs/troubleshooting.md
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
