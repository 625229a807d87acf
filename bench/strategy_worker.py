"""Rank script of ``bench/strategy.py``: one model trained three ways, in alternating blocks.

Launched by ``bench/strategy.py`` as
``horovodrun -np 2 --gloo python bench/strategy_worker.py OUT.json --blocks N``. For each
``ddp`` fit the two ranks also form a torch.distributed gloo group, so that Lightning's
``DDPStrategy`` runs in the same processes as Horovod; the group is torn down after the fit.

Every block fits a fresh copy of the same MLP (same seed, same data, same batch size, same
number of steps) once under each configuration, in an order that rotates from block to block:

* ``raw``: a plain loop with ``hvd.DistributedOptimizer``, ``hvd.broadcast_parameters``,
  ``hvd.broadcast_optimizer_state`` and a ``DistributedSampler``; no Lightning;
* ``horovod``: ``Trainer(strategy="horovod")``, distplateau's ``HorovodStrategy``;
* ``ddp``: ``Trainer(strategy="ddp")``, Lightning's ``DDPStrategy`` on the gloo group.

An epoch's time runs from the start of one epoch to the start of the next (the end of
training for the last one), a step's from the start of one batch to the next, on rank 0; the
ranks wait for each other in every step's allreduce. The first epoch of every fit is warmup
and is not timed. Start-up (``Trainer()`` and ``fit`` up to the first epoch; for the raw
loop, wrapping the optimizer, the broadcasts and building the sampler and loader) is timed
separately. Rank 0 writes every time and every check to ``OUT.json``; ``bench/strategy.py``
turns them into the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from typing import Any

import horovod.torch as hvd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import distplateau.lightning  # noqa: E402  (registers strategy="horovod")

CONFIGS = ("raw", "horovod", "ddp")
FEATURES, HIDDEN, CLASSES = 256, 1024, 10  # 1,323,018 parameters
LR, MOMENTUM = 0.01, 0.9


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights for every configuration and block
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, HIDDEN),
                               torch.nn.ReLU(), torch.nn.Linear(HIDDEN, CLASSES))


def dataset(samples: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(samples, FEATURES, generator=gen)
    teacher = torch.randn(FEATURES, CLASSES, generator=gen)
    return TensorDataset(x, (x @ teacher).argmax(dim=1))


class Classifier(LightningModule):
    """The same MLP and optimizer as the raw loop; nothing logged, as the raw loop logs nothing."""

    def __init__(self, data: TensorDataset, batch_size: int) -> None:
        super().__init__()
        self.net = mlp()
        self.data, self.batch_size = data, batch_size

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)

    def train_dataloader(self) -> DataLoader:
        # Lightning swaps in DistributedSampler(shuffle=True, seed=0), the raw loop's sampler.
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)


class Clock:
    """When each epoch and each step of one fit started, and when the fit ended."""

    def __init__(self) -> None:
        self.epochs: list[float] = []
        self.steps: list[float] = []
        self.end = 0.0
        self.threads: set[int] = set()

    def epoch(self) -> None:
        self.epochs.append(time.perf_counter())
        self.threads.add(torch.get_num_threads())

    def step(self) -> None:
        self.steps.append(time.perf_counter())

    def times(self, start: float) -> dict[str, Any]:
        """Start-up, every epoch, and every step after the first (warmup) epoch, in seconds.
        A step runs from its start to the next step's, so the epoch's last step also holds
        what happens between epochs."""
        per_epoch = len(self.steps) // len(self.epochs)
        epochs, steps = [*self.epochs, self.end], [*self.steps[per_epoch:], self.end]
        return {"startup_s": self.epochs[0] - start, "epochs_s": [b - a for a, b in zip(epochs, epochs[1:])],
                "timed_steps_s": [b - a for a, b in zip(steps, steps[1:])], "steps": len(self.steps),
                "threads": sorted(self.threads)}


class LightningClock(Callback):
    """A :class:`Clock` on Lightning's hooks, and checks that the run is what its configuration claims."""

    def __init__(self, config: str) -> None:
        self.config = config
        self.clock = Clock()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        strategy = trainer.strategy
        check(trainer.world_size == 2 and trainer.global_rank == hvd.rank(),
              f"{self.config}: world size {trainer.world_size}, rank {trainer.global_rank} (Horovod: {hvd.rank()})")
        optimizer = trainer.optimizers[0]
        if self.config == "horovod":
            check(type(strategy) is distplateau.lightning.HorovodStrategy, f"horovod: strategy is {type(strategy)}")
            check(hasattr(optimizer, "synchronize"), "horovod: the optimizer is not a hvd.DistributedOptimizer")
            check(not dist.is_initialized(), "horovod: torch.distributed is initialised")
        else:
            check(type(strategy) is DDPStrategy, f"ddp: strategy is {type(strategy)}")
            check(isinstance(strategy.model, DistributedDataParallel), "ddp: the model is not wrapped in DDP")
            check(dist.is_initialized() and dist.get_backend() == "gloo" and dist.get_world_size() == 2,
                  "ddp: no 2-rank gloo group")
            check(type(strategy.cluster_environment) is LightningEnvironment,
                  f"ddp: cluster environment is {type(strategy.cluster_environment)}")
            check(not hasattr(optimizer, "synchronize"), "ddp: the optimizer is a Horovod one")

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.clock.epoch()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.clock.step()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.clock.end = time.perf_counter()


def check(ok: bool, what: str) -> None:
    if not ok:
        raise RuntimeError(f"rank {hvd.rank()}: {what}")


def gloo_group() -> dist.TCPStore:
    """A torch.distributed gloo group of the Horovod ranks, on a port rank 0 picks.

    Up only while a ``ddp`` fit runs: while a group is up, Lightning broadcasts a SIGTERM flag
    over it before every training step (``training_epoch_loop.py``), which a ``horovodrun``
    job without torch.distributed never pays. Keep the store until the group is destroyed.
    """
    # Port 0: the OS picks a free one; rank 1 learns it over Horovod, so rank 0 must not wait for it.
    store = None
    if hvd.rank() == 0:
        store = dist.TCPStore("127.0.0.1", 0, hvd.size(), is_master=True, wait_for_workers=False)
    port = hvd.broadcast_object(store.port if store else None, root_rank=0, name="bench.port")
    if store is None:
        store = dist.TCPStore("127.0.0.1", port, hvd.size(), is_master=False)
    dist.init_process_group("gloo", store=store, rank=hvd.rank(), world_size=hvd.size())
    return store


def fit_lightning(config: str, data: TensorDataset, batch_size: int, epochs: int) -> dict[str, Any]:
    model = Classifier(data, batch_size)
    if config == "ddp":
        store = gloo_group()
    hooks = LightningClock(config)
    start = time.perf_counter()
    trainer = Trainer(strategy=config, accelerator="cpu", devices=2 if config == "ddp" else "auto",
                      max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                      callbacks=[hooks])
    trainer.fit(model)
    if config == "ddp":
        dist.destroy_process_group()
        del store
    check(trainer.global_step == len(hooks.clock.steps), f"{config}: {trainer.global_step} optimizer steps, "
          f"{len(hooks.clock.steps)} batches")
    return {**hooks.clock.times(start), "weights": torch.nn.utils.parameters_to_vector(model.net.parameters())}


def fit_raw(data: TensorDataset, batch_size: int, epochs: int) -> dict[str, Any]:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    start = time.perf_counter()
    # Horovod's recipe, with the names Lightning gives the same parameters ("net.0.weight").
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=[(f"net.{n}", p)
                                                                      for n, p in model.named_parameters()])
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    sampler = DistributedSampler(data, num_replicas=hvd.size(), rank=hvd.rank(), shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=batch_size, sampler=sampler)
    clock = Clock()
    for epoch in range(epochs):
        clock.epoch()
        sampler.set_epoch(epoch)
        for x, y in loader:
            clock.step()
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()  # where Lightning's closure zeroes them: after the forward
            loss.backward()
            optimizer.step()
    clock.end = time.perf_counter()
    return {**clock.times(start), "weights": torch.nn.utils.parameters_to_vector(model.parameters())}


def machine_cpu_s() -> float:
    """CPU seconds all processes of this machine have used since boot (Linux ``/proc/stat``)."""
    with open("/proc/stat") as f:
        ticks = [int(t) for t in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user time


def other_cores(since: tuple[float, float, float]) -> float:
    """Cores that other processes kept busy, on average, since ``since`` (wall, machine CPU and
    this process's CPU seconds); one collective. Both ranks share the machine's cores, so
    anything else running shows up as spread and skews the ratios."""
    ours = hvd.allreduce(torch.tensor(time.process_time() - since[2], dtype=torch.float64), op=hvd.Sum,
                         name="bench.cpu").item()
    return (machine_cpu_s() - since[1] - ours) / (time.perf_counter() - since[0])


def measure(blocks: int, epochs: int, steps: int, batch_size: int) -> dict[str, Any]:
    data = dataset(steps * batch_size * hvd.size())
    runs: dict[str, list[dict[str, Any]]] = {config: [] for config in CONFIGS}
    others = []
    for block in range(blocks):
        shift = block % len(CONFIGS)
        order = list(CONFIGS[shift:] + CONFIGS[:shift])
        if block % 2:
            order.reverse()
        since = time.perf_counter(), machine_cpu_s(), time.process_time()
        weights = {}
        for config in order:
            if config == "raw":
                run = fit_raw(data, batch_size, epochs)
            else:
                run = fit_lightning(config, data, batch_size, epochs)
            weights[config] = run.pop("weights").detach()
            check(run["steps"] == steps * epochs, f"{config}: {run['steps']} steps, expected {steps * epochs}")
            check(run["threads"] == [1], f"{config}: ran with {run['threads']} intra-op threads, not 1")
            # Every rank must hold the same weights at the end, or the configuration is not data parallel.
            both = hvd.allgather(weights[config].unsqueeze(0), name=f"bench.weights.{config}")
            run["ranks_equal"] = bool(torch.equal(both[0], both[1]))
            runs[config].append(run)
        for config in CONFIGS:
            runs[config][-1]["max_abs_diff_to_raw"] = float((weights[config] - weights["raw"]).abs().max())
        others.append(other_cores(since))
        if hvd.rank() == 0:
            line = "  ".join(f"{c} {sum(runs[c][-1]['epochs_s'][1:]) / (epochs - 1):.3f} s" for c in CONFIGS)
            print(f"block {block}: {line}  (other processes: {others[-1]:.2f} cores)", flush=True)
    return {"runs": runs, "other_cores": others, "epochs": epochs, "steps": steps, "batch_size": batch_size,
            "world": hvd.size(), "parameters": sum(p.numel() for p in mlp().parameters())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="rank script of bench/strategy.py")
    parser.add_argument("out")
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per fit, the first one untimed")
    parser.add_argument("--steps", type=int, default=32, help="steps per epoch on every rank")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", ".*(does not have many workers|GPU available|TPU available|LOCAL_RANK).*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    # One intra-op thread per rank, as many ranks as cores: what every configuration gets.
    torch.set_num_threads(1)
    hvd.init()
    # For strategy="ddp": Lightning's LightningEnvironment takes the rank from LOCAL_RANK (one
    # node) and DDPStrategy keeps an already initialised process group.
    os.environ["LOCAL_RANK"] = str(hvd.local_rank())
    check(hvd.size() == 2, f"{hvd.size()} ranks; run 2")
    result = measure(args.blocks, args.epochs, args.steps, args.batch_size)
    if hvd.rank() == 0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    hvd.shutdown()
    # As bench/ranks.py: skip interpreter shutdown, where gloo's worker threads can abort the
    # process after the results are written.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
