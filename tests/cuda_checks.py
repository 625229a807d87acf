"""CUDA scenarios on real ranks: one launch per way of gathering, every scenario in each launch.

Launched by ``tests/test_cuda.py`` (and only where a GPU exists) as

    python tests/cuda_checks.py none OUT_DIR                      # one process
    python tests/cuda_checks.py {gloo,nccl,mixed,default,bound} OUT_DIR  # 2 processes: harness.launch.run_torch
    horovodrun -np 2 --gloo python tests/cuda_checks.py horovod OUT_DIR

:data:`MODES` says, for each mode, how many processes it runs, how many GPUs it needs and how
the ranks gather. Each rank computes on GPU ``LOCAL_RANK % device_count`` (made the current
device before anything else, as torch's NCCL documentation asks, except in mode ``bound``) and
hands the scheduler 0-d CUDA tensors.
After every scenario a rank writes ``OUT_DIR/rank{r}.json``: scenario name -> what the rank
observed, or ``{"error": traceback}``; ``tests/test_cuda.py`` compares the ranks.

Nothing happens at import: the test imports :data:`SCENARIOS`, :data:`MODES` and
:data:`SHARDS` from here.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from bench.abtest import compare
from distplateau import DistributedReduceLROnPlateau

NAN = math.nan


class Mode(NamedTuple):
    world: int  #: processes
    gpus: int  #: GPUs the mode needs at least
    scheduler_backend: str  #: the scheduler's ``backend`` argument
    process_group: str | None  #: ``init_process_group``'s backend ("": none given); None: no process group
    #: ``init_process_group(device_id=...)`` binds the rank's GPU, and nothing calls
    #: ``torch.cuda.set_device``: the current device stays ``cuda:0`` on every rank
    bind_device: bool = False


MODES: dict[str, Mode] = {
    "none": Mode(world=1, gpus=1, scheduler_backend="none", process_group=None),
    "gloo": Mode(world=2, gpus=1, scheduler_backend="torch", process_group="gloo"),
    # NCCL puts each rank on a GPU of its own.
    "nccl": Mode(world=2, gpus=2, scheduler_backend="torch", process_group="nccl"),
    # The gather takes the group's CPU backend, so two ranks can share one GPU.
    "mixed": Mode(world=2, gpus=1, scheduler_backend="torch", process_group="cpu:gloo,cuda:nccl"),
    # init_process_group() without a backend: on a GPU machine torch registers NCCL alone.
    "default": Mode(world=2, gpus=2, scheduler_backend="torch", process_group=""),
    # NCCL with each rank's GPU bound by init_process_group(device_id=...), torch's eager init.
    "bound": Mode(world=2, gpus=2, scheduler_backend="torch", process_group="nccl", bind_device=True),
    # Horovod gathers CPU tensors whatever its build.
    "horovod": Mode(world=2, gpus=1, scheduler_backend="horovod", process_group=None),
}

# One row per step, one (metric, weight) per rank. The ranks' local metrics drift apart while
# the global weighted mean (weights 3 and 1) is what a single process would step on. Rank 1's
# metric is NaN at step 3, so nan_policy="drop" steps on rank 0's alone. Every value is dyadic:
# exact in float32 and float64, and so is every weighted mean, whatever the order of the sums.
SHARDS: tuple[tuple[tuple[float, int], ...], ...] = (
    ((2.0, 3), (2.0, 1)),
    ((1.5, 3), (2.5, 1)),
    ((1.75, 3), (1.0, 1)),
    ((1.75, 3), (NAN, 1)),
    ((2.0, 3), (2.0, 1)),
    ((2.5, 3), (0.5, 1)),
    ((1.0, 3), (4.0, 1)),
    ((2.0, 3), (2.0, 1)),
)
FACTOR, PATIENCE = 0.5, 1  # the scheduler's settings in every scenario


class Rank(NamedTuple):
    """Where this process runs."""

    mode: str
    rank: int
    device: torch.device


def count_syncs(fn: Callable[[], object]) -> int:
    """How many times ``fn()`` makes the host wait for the GPU, as counted by torch's sync debug
    mode (one warning per synchronising copy or stream synchronisation)."""
    torch.cuda.synchronize()  # nothing of earlier work left to wait for
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def make_scheduler(here: Rank, **kwargs: Any) -> DistributedReduceLROnPlateau:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1, device=here.device))], lr=0.1)
    kwargs = {"factor": FACTOR, "patience": PATIENCE, **kwargs}
    return DistributedReduceLROnPlateau(optimizer, backend=MODES[here.mode].scheduler_backend, **kwargs)  # type: ignore[arg-type]


def trajectory(here: Rank, inputs: Callable[[float, int], tuple[Any, Any]]) -> dict[str, Any]:
    """Step once per row of SHARDS on ``inputs(metric, weight)``; the learning rate and global
    metric after each step, and the final state."""
    scheduler = make_scheduler(here)
    lrs, global_metrics = [], []
    for row in SHARDS:
        metric, weight = row[here.rank]
        scheduler.step(*inputs(metric, weight))
        lrs.append(scheduler.optimizer.param_groups[0]["lr"])
        global_metrics.append(scheduler.last_global_metric)
    return {"lrs": lrs, "globals": global_metrics, "state": scheduler.state_dict()}


# ------------------------------------------------------------------ scenarios (every rank runs each)


def shards_stepped_as_cuda_tensors_and_as_floats(here: Rank) -> dict[str, Any]:
    def on_device(metric: float, weight: int) -> tuple[torch.Tensor, torch.Tensor]:
        # a float32 loss and an int64 sample count, as a validation loop computes them
        return (torch.tensor(metric, dtype=torch.float32, device=here.device),
                torch.tensor(weight, device=here.device))

    return {"cuda": trajectory(here, on_device), "float": trajectory(here, lambda m, w: (m, float(w)))}


def syncs_per_step(here: Rank) -> dict[str, Any]:
    scheduler = make_scheduler(here, patience=10**9)  # every step takes the same path
    metric = torch.full((8,), 0.5, device=here.device).mean()  # a loss reduced on the GPU
    weight = torch.tensor(8, device=here.device)
    for _ in range(3):  # the first collectives set up communicators and buffers
        scheduler.step(metric, weight=weight)
    syncs = {
        "one_item": count_syncs(lambda: metric.item()),  # proves the counter counts
        "floats": count_syncs(lambda: scheduler.step(0.5, weight=8.0)),
        "cuda_metric": count_syncs(lambda: scheduler.step(metric, weight=8.0)),
        "cuda_metric_and_weight": count_syncs(lambda: scheduler.step(metric, weight=weight)),
    }
    timings = compare({"float metric": lambda: scheduler.step(0.5, weight=8.0),
                       "CUDA metric and weight": lambda: scheduler.step(metric, weight=weight)},
                      "float metric", blocks=5, iters=40)
    found: dict[str, Any] = {"syncs": syncs, "step_us": {t.name: round(t.us_per_call, 1) for t in timings},
                             "device": str(here.device)}
    if torch.distributed.is_initialized():
        found["process_group"] = str(torch.distributed.get_backend())
    return found


CHECKS: dict[str, Callable[[Rank], dict[str, Any]]] = {
    check.__name__: check for check in (shards_stepped_as_cuda_tensors_and_as_floats, syncs_per_step)
}
SCENARIOS: tuple[str, ...] = tuple(CHECKS)


# ------------------------------------------------------------------ launch


def start(mode: str) -> Rank:
    """Make this rank's GPU the current device (or bind it), then start the mode's backend."""
    if mode not in MODES:
        raise SystemExit(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    local_rank = int(os.environ.get("HOROVOD_LOCAL_RANK", os.environ.get("LOCAL_RANK", "0")))
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    process_group, bind_device = MODES[mode].process_group, MODES[mode].bind_device
    if not bind_device:
        torch.cuda.set_device(device)
    if mode == "horovod":
        import horovod.torch as hvd

        hvd.init()
        return Rank(mode, hvd.rank(), device)
    if process_group is None:
        return Rank(mode, 0, device)
    bound = {"device_id": device} if bind_device else {}  # device_id: torch >= 2.3
    torch.distributed.init_process_group(process_group or None, timeout=datetime.timedelta(seconds=60), **bound)
    return Rank(mode, torch.distributed.get_rank(), device)


def stop(mode: str) -> None:
    if mode == "horovod":
        import horovod.torch as hvd

        hvd.shutdown()
    elif torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(argv: list[str]) -> None:
    mode, out = argv[0], Path(argv[1])
    here = start(mode)
    results: dict[str, Any] = {}
    for name, check in CHECKS.items():
        try:
            results[name] = check(here)
        except Exception:  # noqa: BLE001
            results[name] = {"error": traceback.format_exc()}
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{here.rank}.json").write_text(json.dumps(results, indent=1))
    stop(mode)


if __name__ == "__main__":
    main(sys.argv[1:])
