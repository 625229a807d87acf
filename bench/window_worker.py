"""Rank script of ``bench/window.py``: what ``accumulation_size`` saves per call, on real ranks.

Launched as ``horovodrun -np N --gloo python bench/window_worker.py horovod OUT.json`` or as N
processes with the torch.distributed variables set and backend ``torch`` (gloo). Every rank
steps two real schedulers, ``accumulation_size=1`` and ``accumulation_size=100``, with a
per-step training loss and its batch size as the weight:

* collectives: every collective function of the backend is wrapped (and called through) while
  each scheduler takes ``CALLS`` calls, and counted;
* time per call: the two side by side in alternating blocks of 200 calls each
  (``bench/abtest.py``), so that every block holds exactly two windows of 100.

Rank 0 writes the result as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.abtest import compare  # noqa: E402
from distplateau import DistributedReduceLROnPlateau  # noqa: E402

SIZES = (1, 100)
CALLS = 1000
_HOROVOD = ("allgather", "allgather_async", "allreduce", "allreduce_async", "broadcast", "broadcast_async",
            "allgather_object", "broadcast_object", "barrier")
_TORCH = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce", "broadcast", "barrier",
          "all_gather_object", "broadcast_object_list")


def init(backend: str) -> tuple[Any, int, int, Callable[[], None]]:
    """Start ``backend``; its module, this rank, the world size and its shutdown."""
    if backend == "horovod":
        import horovod.torch as hvd

        hvd.init()
        return hvd, hvd.rank(), hvd.size(), hvd.shutdown
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    return dist, dist.get_rank(), dist.get_world_size(), dist.destroy_process_group


def count_collectives(module: Any, names: tuple[str, ...]) -> dict[str, int]:
    counts = {"n": 0}

    def counting(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts["n"] += 1
            return fn(*args, **kwargs)

        return wrapper

    for name in names:
        if hasattr(module, name):
            setattr(module, name, counting(getattr(module, name)))
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backend", choices=["horovod", "torch"])
    parser.add_argument("out")
    parser.add_argument("--blocks", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    module, rank, size, shutdown = init(args.backend)
    counts = count_collectives(module, _HOROVOD if args.backend == "horovod" else _TORCH)
    gen = torch.Generator().manual_seed(rank)
    losses = (2.0 + torch.rand(997, generator=gen, dtype=torch.float64)).tolist()  # per-step training losses
    batch = 32.0 + rank  # this rank's batch size, the weight

    def scheduler(accumulation_size: int) -> Callable[[], None]:
        model = torch.nn.Linear(1, 1)
        s = DistributedReduceLROnPlateau(torch.optim.SGD(model.parameters(), lr=0.1), patience=10**9,
                                         accumulation_size=accumulation_size)
        calls = iter(range(10**12))

        def step() -> None:
            s.step(losses[next(calls) % len(losses)], weight=batch)

        return step

    steps = {n: scheduler(n) for n in SIZES}
    collectives = {}
    for n, step in steps.items():
        before = counts["n"]
        for _ in range(CALLS):
            step()
        collectives[n] = counts["n"] - before
    names = {n: f"step, accumulation_size={n}" for n in SIZES}
    ratios = compare({names[n]: steps[n] for n in SIZES}, names[1], blocks=args.blocks, iters=200, warmup=100)
    if rank == 0:
        result = {"ranks": size, "calls": CALLS, "collectives": {str(n): c for n, c in collectives.items()},
                  "timing": [r._asdict() for r in ratios]}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    shutdown()
    # As bench/ranks.py: skip interpreter shutdown, which torch 2.13's gloo threads may abort.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
