"""Per-rank early stopping as users write it, on 2 gloo ranks: what docs/guides/stopping.md measured.

    for mode in exit barrier; do
      for r in 0 1; do RANK=$r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29512 T=20 \
        timeout -k 5 120 python docs/guides/stopping_recipe.py $mode & done; wait
    done

``exit``: the rank that stops leaves the script; ``barrier``: it waits in a ``barrier()``
before saving, as scripts often do. ``T``: the process group's timeout in seconds.
"""

import datetime
import os
import sys
import time

import torch
import torch.distributed as dist

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=int(os.environ.get("T", "20"))))
rank = dist.get_rank()
model = torch.nn.Linear(1, 1)
best, bad, patience = float("inf"), 0, 2
start = time.monotonic()
try:
    for epoch in range(10):
        g = torch.ones(1)
        dist.all_reduce(g)  # stands for DDP's gradient allreduce of the epoch
        val = 1.0 + epoch * (0.1 if rank == 0 else -0.1)  # rank 0's shard gets worse, rank 1's better
        if val < best:
            best, bad = val, 0
        else:
            bad += 1
        if bad >= patience:
            print(f"rank {rank}: early stop at epoch {epoch}", flush=True)
            break
    if sys.argv[1] == "barrier":
        dist.barrier()  # "make sure every rank is done" before saving
    print(f"rank {rank}: finished after {time.monotonic() - start:.1f} s", flush=True)
except Exception as err:
    print(f"rank {rank}: {type(err).__name__} after {time.monotonic() - start:.1f} s: {str(err)[:200]}", flush=True)
