"""Multi-rank benchmark worker: runs on every rank, rank 0 writes the results as JSON.

Launched by ``bench/run_all.py`` as
``horovodrun -np N --gloo python bench/ranks.py horovod OUT.json`` or as N processes with
``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` and backend ``torch`` (gloo).
Every variant below is real: real collectives, real schedulers, timed side by side in
alternating blocks (``bench/abtest.py``).

Tables it fills:

* ``step``: our ``step`` against one bare allreduce of one float64 (the least any
  synchronised step can cost), and the bare collective our ``step`` makes (an allgather
  of a 5-float64 record per rank), so that what ``step`` adds to its collective shows.
* ``alternatives``: what a user could write instead, against our ``step``: the seed's recipe
  (allreduce Sum / size, then plain ``step``; one collective but no weights, no NaN policy,
  no validation, no state check), a "robust" version with one collective each for value,
  weight and NaN flag, and one built on ``all_gather_object``.
* ``design``: the bare collective our design needs (allgather of a 5-float64 record per rank)
  against allreduces carrying the same information (a zero-padded world x 5 matrix) or less
  (a 5-float vector).
* ``wait`` (Horovod only): our ``step`` with the default bound on its wait
  (``DISTPLATEAU_HOROVOD_TIMEOUT_S`` unset: the collective started asynchronously and polled)
  against the same ``step`` with ``DISTPLATEAU_HOROVOD_TIMEOUT_S=0`` (Horovod's own blocking
  ``allgather``), against 0.2.0's bounded wait (a 1 ms sleep between polls), and against the
  default's back-off without its first 2 ms of polling.

``--tables`` picks some of them (``bench/horovod_wait.py`` runs ``wait`` alone).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from typing import Any

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.abtest import Ratio, compare  # noqa: E402
from distplateau import DistributedReduceLROnPlateau  # noqa: E402
from distplateau._decide import reduce  # noqa: E402
from distplateau._gather import MAX_PAUSE_S, TIMEOUT_ENV, HorovodGather, world  # noqa: E402

TABLES = ("step", "alternatives", "design", "wait")


class Wire:
    """The collectives the variants use, on one backend, all on float64 CPU tensors."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        if backend == "horovod":
            import horovod.torch as hvd

            hvd.init()
            self.hvd = hvd
            self.rank, self.size = hvd.rank(), hvd.size()
        else:
            import torch.distributed as dist

            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
            self.dist = dist
            # all_gather_single from torch 2.13 on (all_gather_into_tensor is deprecated there).
            self.all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def allreduce_sum(self, t: torch.Tensor, name: str) -> torch.Tensor:
        # Horovod: a fixed name per call site, as a careful user writes it (unnamed ops get a
        # fresh name each call and miss Horovod's response cache).
        if self.backend == "horovod":
            return self.hvd.allreduce(t, op=self.hvd.Sum, name=name)
        self.dist.all_reduce(t)
        return t

    def allgather_rows(self, row: torch.Tensor, name: str) -> torch.Tensor:
        if self.backend == "horovod":
            return self.hvd.allgather(row.view(1, -1), name=name)
        out = torch.empty(self.size * row.numel(), dtype=row.dtype)
        self.all_gather(out, row)
        return out

    def allgather_object(self, obj: Any) -> list[Any]:
        if self.backend == "horovod":
            return list(self.hvd.allgather_object(obj, name="bench.object"))
        out: list[Any] = [None] * self.size
        self.dist.all_gather_object(out, obj)
        return out

    def shutdown(self) -> None:
        if self.backend == "horovod":
            self.hvd.shutdown()
        else:
            self.dist.destroy_process_group()


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)


class _PolledEveryMillisecond(HorovodGather):
    """0.2.0's bounded wait, for comparison only: poll, sleep 1 ms, poll again."""

    def _wait(self, handle: Any, call: str) -> torch.Tensor:
        while not self._hvd.poll(handle):
            time.sleep(0.001)
        return self._hvd.synchronize(handle)


class _SleepingFromTheFirstPoll(HorovodGather):
    """The default bound's back-off without its first 2 ms of polling, for comparison only."""

    def _wait(self, handle: Any, call: str) -> torch.Tensor:
        started = time.monotonic()
        while not self._hvd.poll(handle):
            time.sleep(min(MAX_PAUSE_S, (time.monotonic() - started) / 20))
        return self._hvd.synchronize(handle)


def _built_with(setting: str | None, metric: float, weight: float) -> DistributedReduceLROnPlateau:
    """A scheduler whose Horovod adapter was built (by one step, on every rank) with
    ``DISTPLATEAU_HOROVOD_TIMEOUT_S`` set to ``setting`` (``None``: unset)."""
    saved = os.environ.pop(TIMEOUT_ENV, None)
    if setting is not None:
        os.environ[TIMEOUT_ENV] = setting
    try:
        s = DistributedReduceLROnPlateau(_optimizer(), patience=10**9)
        s.step(metric, weight)
    finally:
        os.environ.pop(TIMEOUT_ENV, None)
        if saved is not None:
            os.environ[TIMEOUT_ENV] = saved
    return s


def measure_wait(wire: Wire, blocks: int, iters: int) -> list[Ratio]:
    """Horovod: ``step`` waiting with the default bound vs Horovod's blocking wait vs 0.2.0's."""
    metric, weight = 0.5 + 0.125 * wire.rank, 100.0 + wire.rank
    blocking = _built_with("0", metric, weight)
    bounded = _built_with(None, metric, weight)
    every_ms = _built_with(None, metric, weight)
    every_ms._gather, every_ms._gather_world = _PolledEveryMillisecond(), world("horovod")
    no_spin = _built_with(None, metric, weight)
    no_spin._gather, no_spin._gather_world = _SleepingFromTheFirstPoll(), world("horovod")
    assert blocking._gather.timeout is None and bounded._gather.timeout is not None  # type: ignore[union-attr]
    return compare({"step, DISTPLATEAU_HOROVOD_TIMEOUT_S=0 (Horovod's blocking wait)":
                    lambda: blocking.step(metric, weight),
                    "step, default bound (polled 2 ms, then backing off)": lambda: bounded.step(metric, weight),
                    "step, 0.2.0's bounded wait (1 ms sleep per poll)": lambda: every_ms.step(metric, weight),
                    "step, backing off from the first poll (no 2 ms of polling)": lambda: no_spin.step(metric, weight)},
                   "step, DISTPLATEAU_HOROVOD_TIMEOUT_S=0 (Horovod's blocking wait)", blocks=blocks, iters=iters)


def measure(wire: Wire, blocks: int, iters: int, tables: tuple[str, ...] = TABLES) -> dict[str, list[Ratio]]:
    rank, size = wire.rank, wire.size
    metric = 0.5 + 0.125 * rank  # different on every rank, as validation losses are
    weight = 100.0 + rank
    patience = 10**9  # every step takes the same path; none changes the lr

    ours = DistributedReduceLROnPlateau(_optimizer(), patience=patience)

    def our_step() -> None:
        ours.step(metric, weight)

    one = torch.zeros(1, dtype=torch.float64)

    def bare_allreduce() -> None:
        one.fill_(metric)
        wire.allreduce_sum(one, "bench.bare")

    seed = ReduceLROnPlateau(_optimizer(), patience=patience)

    def seed_recipe() -> None:
        total = wire.allreduce_sum(torch.tensor([metric], dtype=torch.float64), "bench.seed")
        seed.step(total.item() / size)

    robust = ReduceLROnPlateau(_optimizer(), patience=patience)

    def robust_three_collectives() -> None:
        finite = math.isfinite(metric)
        w = weight if finite else 0.0
        weighted = wire.allreduce_sum(torch.tensor([metric * w if finite else 0.0], dtype=torch.float64),
                                      "bench.value")
        weights = wire.allreduce_sum(torch.tensor([w], dtype=torch.float64), "bench.weight")
        nans = wire.allreduce_sum(torch.tensor([0.0 if finite else 1.0], dtype=torch.float64), "bench.nan")
        if nans.item() == size:
            robust.step(math.nan)
        else:
            robust.step(weighted.item() / weights.item())

    objects = ReduceLROnPlateau(_optimizer(), patience=patience)

    def all_gather_object() -> None:
        pairs = wire.allgather_object((metric, weight))
        kept = [(v, w) for v, w in pairs if w > 0 and math.isfinite(v)]
        objects.step(reduce([v for v, _ in kept], [w for _, w in kept], "mean") if kept else math.nan)

    record = torch.tensor([metric, weight, 0.0, 0.0, 12345.0], dtype=torch.float64)
    padded = torch.zeros(size, 5, dtype=torch.float64)
    vector = torch.zeros(5, dtype=torch.float64)

    def allgather_record() -> None:
        wire.allgather_rows(record, "bench.record").tolist()

    def allreduce_padded_matrix() -> None:
        padded.zero_()
        padded[rank] = record
        wire.allreduce_sum(padded, "bench.padded").tolist()

    def allreduce_vector() -> None:
        vector.copy_(record)
        wire.allreduce_sum(vector, "bench.vector").tolist()

    result = {}
    if "step" in tables:
        result["step"] = compare({"one bare allreduce (1 float64)": bare_allreduce,
                                  "DistributedReduceLROnPlateau.step": our_step,
                                  "allgather of a 5-float64 record (ours)": allgather_record},
                                 "one bare allreduce (1 float64)", blocks=blocks, iters=iters)
    if "alternatives" in tables:
        result["alternatives"] = compare({"DistributedReduceLROnPlateau.step": our_step,
                                          "seed recipe: allreduce Sum / size + step": seed_recipe,
                                          "robust: 3 allreduces (value, weight, NaN) + step": robust_three_collectives,
                                          "all_gather_object + step": all_gather_object},
                                         "DistributedReduceLROnPlateau.step", blocks=blocks, iters=iters)
    if "wait" in tables and wire.backend == "horovod":
        result["wait"] = measure_wait(wire, blocks, iters)
    if size == 2 and "design" in tables:
        result["design"] = compare({"allgather of a 5-float64 record (ours)": allgather_record,
                                    "allreduce of a zero-padded world x 5 matrix": allreduce_padded_matrix,
                                    "allreduce of a 5-float64 vector": allreduce_vector},
                                   "allgather of a 5-float64 record (ours)", blocks=blocks, iters=iters)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="multi-rank benchmark worker")
    parser.add_argument("backend", choices=["horovod", "torch"])
    parser.add_argument("out")
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--tables", nargs="+", choices=TABLES, default=list(TABLES))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    wire = Wire(args.backend)
    result = measure(wire, args.blocks, args.iters, tuple(args.tables))
    if wire.rank == 0:
        with open(args.out, "w") as f:
            json.dump({name: [r._asdict() for r in ratios] for name, ratios in result.items()}, f, indent=1)
    wire.shutdown()
    # Skip interpreter shutdown: torch 2.13's gloo worker threads may still be releasing the
    # tensors of the last timed collectives (the bare ones, not step()'s: see TorchGather), and
    # a worker that needs the GIL during shutdown aborts the process after the results are in.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
