"""Lightning Fabric loops on real ranks, many scenarios per launch.

``python tests/fabric_checks.py LAUNCH OUT_DIR PACKAGE [CHECKPOINT]``:

- ``LAUNCH`` ``ddp``: ``Fabric(accelerator="cpu", devices=2, strategy="ddp")``; ``fabric.launch()``
  starts rank 1 by running this script again. ``ddp_spawn``: the same with
  ``strategy="ddp_spawn"``, ``fabric.launch(function)`` in 2 spawned processes. ``single``:
  ``Fabric(accelerator="cpu", devices=1)``, one process, no process group.
- ``PACKAGE``: ``lightning.fabric`` or ``lightning_fabric``, where ``Fabric`` comes from.
- ``CHECKPOINT``: a ``fabric.save`` checkpoint written at the other world size (see
  ``LAUNCHES``), resumed here.

Each rank writes ``OUT_DIR/rank{r}.json`` after every scenario: scenario name -> what that rank
observed, or ``{"error": traceback}``. ``tests/test_fabric.py`` compares the ranks with torch's
own ``ReduceLROnPlateau`` fed the exact global metric. Importing this module starts nothing.

The validation losses are scripted per sample on uneven shards, with one NaN
(``tests/uneven_shards.py``); the model itself trains for real under DDP.
"""

from __future__ import annotations

import importlib
import json
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.data import DataLoader, TensorDataset

from distplateau import DistributedReduceLROnPlateau
from tests.uneven_shards import EPOCHS, FACTOR, LR, PATIENCE, RESUME_AT
from tests.uneven_shards import local_val_loss as scripted_loss

LAUNCHES = {
    "ddp": ("class_swap_follows_global_mean", "scheduler_built_before_setup", "plain_scheduler_on_local_metric",
            "all_reduce_mean_then_plain", "all_reduce_sum_and_count_then_plain", "padded_sampler_repeats_samples",
            "resume_same_world_size", "save_for_world_size_1"),
    "single": ("resume_from_world_size_2", "save_for_world_size_2"),
    "ddp_spawn": ("class_swap_follows_global_mean", "resume_from_world_size_1"),
}
SCENARIOS = tuple(dict.fromkeys(name for names in LAUNCHES.values() for name in names))

def train_loader() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(32, 3, generator=gen)
    return DataLoader(TensorDataset(x, x @ torch.tensor([1.0, -2.0, 0.5]) + 0.25), batch_size=4)


def local_val_loss(fabric: Any, epoch: int) -> tuple[torch.Tensor, int]:
    """This rank's mean validation loss at ``epoch`` and its number of samples."""
    return scripted_loss(epoch, fabric.global_rank, fabric.world_size)


class Run:
    """A model, its optimizer and a scheduler set up with ``fabric``, trained epoch by epoch."""

    def __init__(self, fabric: Any, scheduler: str = "ours", before_setup: bool = False) -> None:
        self.fabric = fabric
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        make = DistributedReduceLROnPlateau if scheduler == "ours" else ReduceLROnPlateau
        if before_setup:
            self.scheduler = make(optimizer, factor=FACTOR, patience=PATIENCE)
            self.model, self.optimizer = fabric.setup(model, optimizer)
        else:
            self.model, self.optimizer = fabric.setup(model, optimizer)
            self.scheduler = make(self.optimizer, factor=FACTOR, patience=PATIENCE)
        self.loader = fabric.setup_dataloaders(train_loader())
        self.lrs: list[float] = []
        self.metrics: list[float | None] = []

    def train_epoch(self) -> None:
        for x, y in self.loader:
            self.optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(self.model(x).squeeze(-1), y)
            self.fabric.backward(loss)
            self.optimizer.step()

    def epochs(self, first: int, last: int, step: Callable[[Run, int], None] | None = None) -> None:
        for epoch in range(first, last):
            self.train_epoch()
            if step is None:
                loss, count = local_val_loss(self.fabric, epoch)
                self.scheduler.step(loss, weight=count)
                self.metrics.append(self.scheduler.last_global_metric)
            else:
                step(self, epoch)
            self.lrs.append(self.optimizer.param_groups[0]["lr"])

    def state(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler}

    def outcome(self) -> dict[str, Any]:
        return {"lrs": self.lrs, "metrics": self.metrics, "weights": self.model.weight.detach().flatten().tolist(),
                "scheduler": {k: v for k, v in self.scheduler.state_dict().items() if k != "_last_lr"}}


# ------------------------------------------------------------------ scenarios


def class_swap_follows_global_mean(fabric: Any, out: Path, checkpoint: str | None) -> dict[str, Any]:
    run = Run(fabric)
    run.epochs(0, EPOCHS)
    return {**run.outcome(), "backend": type(run.scheduler._gather).__name__}


def scheduler_built_before_setup(fabric: Any, out: Path, checkpoint: str | None) -> dict[str, Any]:
    run = Run(fabric, before_setup=True)
    run.epochs(0, EPOCHS)
    return run.outcome()


def plain_scheduler_on_local_metric(fabric: Any, out: Path, checkpoint: str | None) -> dict[str, Any]:
    run = Run(fabric, scheduler="plain")

    def step(run: Run, epoch: int) -> None:
        run.scheduler.step(local_val_loss(fabric, epoch)[0])

    run.epochs(0, EPOCHS, step)
    return run.outcome()


def all_reduce_mean_then_plain(fabric: Any, out: Path, checkpoint: str | None) -> dict[str, Any]:
    """The usual Fabric recipe: average each rank's mean, then torch's scheduler."""
    run = Run(fabric, scheduler="plain")

    def step(run: Run, epoch: int) -> None:
        metric = fabric.all_reduce(local_val_loss(fabric, epoch)[0], reduce_op="mean")
        run.metrics.append(float(metric))
        run.scheduler.step(metric)

    run.epochs(0, EPOCHS, step)
    return run.outcome()


def all_reduce_sum_and_count_then_plain(fabric: Any, out: Path, checkpoint: str | None) -> dict[str, Any]:
    """The careful recipe: sum of losses and count of samples, reduced, divided."""
    run = Run(fabric, scheduler="plain")

    def step(run: Run, epoch: int) -> None:
        loss, count = local_val_loss(fabric, epoch)
        total, n = fabric.all_reduce(torch.stack([loss * count, torch.tensor(float(count))]), reduce_op="sum")
        run.metrics.append(float(total / n))
        run.scheduler.step(total / n)

    run.epochs(0, EPOCHS, step)
    return run.outcome()


def padded_sampler_repeats_samples(fabric: Any, out: Path, checkpoint: str | None) -> dict[str, Any]:
    """7 validation samples through ``fabric.setup_dataloaders``: its DistributedSampler pads
    the shards to 4 + 4 by repeating a sample; sharding by index instead does not."""
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 100.0])
    dataset = TensorDataset(torch.arange(len(losses)), losses)
    seen = {}
    for recipe in ("setup_dataloaders", "shard_by_index"):
        if recipe == "setup_dataloaders":
            loader = fabric.setup_dataloaders(DataLoader(dataset, batch_size=2))
        else:
            mine = range(fabric.global_rank, len(dataset), fabric.world_size)
            loader = DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=2)
        indices, values = [], []
        for index, loss in loader:
            indices += index.tolist()
            values += loss.tolist()
        scheduler = DistributedReduceLROnPlateau(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR))
        scheduler.step(sum(values) / len(values), weight=len(values))
        seen[recipe] = {"indices": indices, "global_metric": scheduler.last_global_metric}
    return seen


def resume_same_world_size(fabric: Any, out: Path, checkpoint: str | None) -> dict[str, Any]:
    path = out / f"resume-world{fabric.world_size}.ckpt"
    first = Run(fabric)
    first.epochs(0, RESUME_AT)
    fabric.save(path, {**first.state(), "epoch": RESUME_AT})
    return resume(fabric, path)


def resume(fabric: Any, path: Path | str) -> dict[str, Any]:
    """A fresh model, optimizer and scheduler, loaded from ``path`` on every rank, trained on."""
    run = Run(fabric)
    state = run.state()
    rest = fabric.load(path, state)
    run.epochs(rest["epoch"], EPOCHS)
    return {**run.outcome(), "path": str(path)}


def save_at_this_world_size(fabric: Any, out: Path) -> dict[str, Any]:
    path = out / f"saved-world{fabric.world_size}.ckpt"
    run = Run(fabric)
    run.epochs(0, RESUME_AT)
    fabric.save(path, {**run.state(), "epoch": RESUME_AT})
    return {**run.outcome(), "path": str(path)}


def save_for_world_size_1(fabric: Any, out: Path, checkpoint: str | None) -> dict[str, Any]:
    return save_at_this_world_size(fabric, out)


def save_for_world_size_2(fabric: Any, out: Path, checkpoint: str | None) -> dict[str, Any]:
    return save_at_this_world_size(fabric, out)


def resume_from_world_size_1(fabric: Any, out: Path, checkpoint: str | None) -> dict[str, Any]:
    assert checkpoint, "no checkpoint of a 1-process run given"
    return resume(fabric, checkpoint)


def resume_from_world_size_2(fabric: Any, out: Path, checkpoint: str | None) -> dict[str, Any]:
    assert checkpoint, "no checkpoint of a 2-rank run given"
    return resume(fabric, checkpoint)


# ------------------------------------------------------------------ launch


def run_scenarios(fabric: Any, launch: str, out: Path, checkpoint: str | None) -> None:
    """Every scenario of ``launch`` on this rank (under ``ddp_spawn``, in a spawned process)."""
    warnings.filterwarnings("ignore", ".*(does not have many workers|GPU available|TPU available).*")
    results: dict[str, Any] = {}
    for name in LAUNCHES[launch]:
        try:
            results[name] = globals()[name](fabric, out, checkpoint)
        except Exception:  # noqa: BLE001 - reported per rank, the test shows the traceback
            results[name] = {"error": traceback.format_exc()}
        (out / f"rank{fabric.global_rank}.json").write_text(json.dumps(results, indent=1))


def main(argv: list[str]) -> None:
    launch, out, package = argv[0], Path(argv[1]), argv[2]
    checkpoint = argv[3] if len(argv) > 3 else None
    out.mkdir(parents=True, exist_ok=True)
    fabric_module = importlib.import_module(package)
    if launch == "single":
        fabric = fabric_module.Fabric(accelerator="cpu", devices=1)
    else:
        fabric = fabric_module.Fabric(accelerator="cpu", devices=2, strategy=launch)
    if launch == "ddp_spawn":
        fabric.launch(run_scenarios, launch, out, checkpoint)
    else:
        fabric.launch()
        run_scenarios(fabric, launch, out, checkpoint)


if __name__ == "__main__":
    main(sys.argv[1:])
