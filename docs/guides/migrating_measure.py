"""Measure, on 2 real ranks, the recipes that docs/guides/migrating.md replaces.

    python docs/guides/migrating_measure.py all   # the three launches below, each under a hard timeout

or one launch at a time (each prints its tables from rank 0):

    python docs/guides/migrating_measure.py lightning            # Lightning's DDP launcher starts rank 1
    python docs/guides/migrating_measure.py lightning-epoch-end  # a module with validation_epoch_end
    horovodrun -np 2 -H localhost:2 --gloo python docs/guides/migrating_measure.py horovod

The validation losses are scripted per sample, so that the exact global mean is known: the
numbers measure what each recipe does with them, not how well a model trains. Every collective
is real (gloo, 2 processes).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from distplateau import DistributedReduceLROnPlateau

# Lightning: each rank's validation samples. "odd": a set of 5 split without padding (rank 0 gets
# samples 0, 2, 4, rank 1 samples 1, 3); "even": 6 samples split 4 + 2; "padded": the same 5
# samples through Lightning's own DistributedSampler, which pads them to 3 + 3 (sample 0 twice).
VAL_VALUES = [1.0, 2.0, 3.0, 4.0, 10.0]
SHARDS = {
    "odd": [[1.0, 3.0, 10.0], [2.0, 4.0]],
    "even": [[1.0, 3.0, 10.0, 6.0], [2.0, 4.0]],
}
EPOCH_SCALE = [1.0, 0.5]  # epoch 1: every loss halves, and rank 1's are NaN
NAN_RANK, NAN_EPOCH = 1, 1

# Horovod: rank 0 validates 192 samples, rank 1 64; each rank's mean loss per epoch.
HVD_SAMPLES = [192, 64]
HVD_MEANS = [
    [1.0, 0.9, 0.8, 0.8, 0.8, 0.7, 0.6, 0.5],
    [0.6, 0.5, 0.4, 0.4, float("nan"), 0.3, 0.2, 0.1],  # one NaN epoch on rank 1
]


def sample_losses(values: torch.Tensor, epoch: int, rank: int) -> torch.Tensor:
    """The per-sample validation losses of ``values`` on ``rank`` at ``epoch``."""
    losses = values * EPOCH_SCALE[epoch]
    return losses * float("nan") if (rank, epoch) == (NAN_RANK, NAN_EPOCH) else losses


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


# --------------------------------------------------------------------------------------------
# Lightning: recipe 1 (allreduce in on_validation_end) and recipe 2 (epoch-end aggregation)
# --------------------------------------------------------------------------------------------


def lightning_main(epoch_end: bool) -> None:
    import lightning.pytorch as pl
    import torch.distributed as dist
    import torchmetrics
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    events: list[tuple[str, int, float | None]] = []  # this rank's hooks and scheduler steps, in order

    def val_loss_now(trainer: pl.Trainer) -> float | None:
        value = trainer.callback_metrics.get("val_loss")
        return None if value is None else float(value)

    # ---- the recipes, as users write them ----

    class AllreduceValLoss(pl.Callback):
        """Recipe 1, as a callback."""

        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            val_loss = trainer.callback_metrics["val_loss"].clone()
            dist.all_reduce(val_loss, op=dist.ReduceOp.SUM)
            trainer.callback_metrics["val_loss"] = val_loss / trainer.world_size
            # (reading trainer.callback_metrics here would undo the assignment, see 1d)
            events.append(("recipe (callback on_validation_end) sets", trainer.current_epoch,
                           float(val_loss / trainer.world_size)))

    class MeanLoss(torchmetrics.Metric):
        """Recipe 2: a hand-written torchmetrics Metric, summed over ranks."""

        def __init__(self) -> None:
            super().__init__()
            self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

        def update(self, losses: torch.Tensor) -> None:
            self.total += losses.sum()
            self.count += losses.numel()

        def compute(self) -> torch.Tensor:
            return self.total / self.count

    # ---- what each scheduler saw ----

    class SeenPlain(ReduceLROnPlateau):
        def step(self, metrics: Any, epoch: Any = None) -> None:  # type: ignore[override]
            super().step(metrics)
            events.append(("scheduler.step", len(self.seen), float(metrics)))
            self.seen.append((float(metrics), float(metrics)))

    class SeenOurs(DistributedReduceLROnPlateau):
        def step(self, metrics: Any, weight: float | None = None) -> None:
            super().step(metrics, weight)
            events.append(("scheduler.step", len(self.seen), self.last_global_metric))
            self.seen.append((float(metrics), self.last_global_metric))

    class Probe(pl.Callback):
        """First in the callback list: the rank's own val_loss, before any recipe callback."""

        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            events.append(("on_validation_end, first callback", trainer.current_epoch, val_loss_now(trainer)))

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            events.append(("on_train_epoch_end", trainer.current_epoch, val_loss_now(trainer)))

    class Model(pl.LightningModule):
        def __init__(self, recipe: str, scheduler: str, sampler: str) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.layer = torch.nn.Linear(2, 1)
            self.recipe, self.scheduler_kind, self.sampler = recipe, scheduler, sampler
            self.outputs: list[torch.Tensor] = []
            self.validated: list[list[float]] = [[] for _ in EPOCH_SCALE]  # this rank's losses per epoch
            self.metric = MeanLoss()
            self.mean_metric = torchmetrics.MeanMetric()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self.layer(x).squeeze(-1), y)

        def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
            losses = sample_losses(batch, self.current_epoch, self.global_rank)
            self.validated[self.current_epoch] += losses.tolist()
            loss = losses.mean()
            if self.recipe == "sync_dist":
                self.log("val_loss", loss, sync_dist=True)
            elif self.recipe == "port":  # Lightning's migration example (PR 16520)
                self.outputs.append(loss)
            elif self.recipe == "metric":
                self.metric.update(losses)
            elif self.recipe == "meanmetric":
                self.mean_metric.update(loss)
            else:
                self.log("val_loss", loss)  # this rank's mean, weighted by batch size

        def on_validation_epoch_end(self) -> None:
            if self.recipe == "port":
                self.log("val_loss", torch.stack(self.outputs).mean(), sync_dist=True)
                self.outputs.clear()
            elif self.recipe == "metric":
                self.log("val_loss", self.metric.compute())
                self.metric.reset()
            elif self.recipe == "meanmetric":
                self.log("val_loss", self.mean_metric.compute())
                self.mean_metric.reset()

        def on_validation_end(self) -> None:
            if self.recipe == "hook":  # recipe 1, as a module hook
                val_loss = self.trainer.callback_metrics["val_loss"].clone()
                dist.all_reduce(val_loss, op=dist.ReduceOp.SUM)
                self.trainer.callback_metrics["val_loss"] = val_loss / self.trainer.world_size
                events.append(("recipe (module on_validation_end) sets", self.current_epoch,
                               float(val_loss / self.trainer.world_size)))

        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
            kind = SeenOurs if self.scheduler_kind == "ours" else SeenPlain
            scheduler = kind(optimizer, factor=0.5, patience=1)
            scheduler.seen = []
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss"}}

        def train_dataloader(self) -> DataLoader:
            x = torch.rand(8, 2, generator=torch.Generator().manual_seed(0))
            return DataLoader(TensorDataset(x, x.sum(1)), batch_size=8)

        def val_dataloader(self) -> DataLoader:
            if self.sampler == "padded":  # Lightning injects its DistributedSampler
                return DataLoader(torch.tensor(VAL_VALUES, dtype=torch.float64), batch_size=2)
            return DataLoader(torch.tensor(SHARDS[self.sampler][self.global_rank], dtype=torch.float64), batch_size=2)

    class ValidationEpochEnd(Model):
        """Recipe 2 as written for Lightning 1.x."""

        def validation_step(self, batch: torch.Tensor, batch_idx: int) -> dict[str, torch.Tensor]:
            return {"val_loss": sample_losses(batch, self.current_epoch, self.global_rank).mean()}

        def validation_epoch_end(self, outputs: list[dict[str, torch.Tensor]]) -> None:
            self.log("val_loss", torch.stack([o["val_loss"] for o in outputs]).mean(), sync_dist=True)

    root = os.environ.get("MIGRATING_MEASURE_DIR")
    if root is None:  # rank 0; the rank Lightning starts inherits the variable
        root = os.environ["MIGRATING_MEASURE_DIR"] = tempfile.mkdtemp(prefix="distplateau-migrating-")

    def trainer(*callbacks: pl.Callback, sampler: str = "odd") -> pl.Trainer:
        return pl.Trainer(
            strategy="ddp", accelerator="cpu", devices=2, max_epochs=len(EPOCH_SCALE), num_sanity_val_steps=0,
            use_distributed_sampler=sampler == "padded", callbacks=[Probe(), *callbacks], logger=False,
            enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
            enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=root,
        )

    if epoch_end:
        t = trainer()
        try:
            t.fit(ValidationEpochEnd("none", "plain", "odd"))
            print(f"rank {t.global_rank}: fit returned", flush=True)
        except NotImplementedError as error:
            print(f"rank {t.global_rank}: NotImplementedError: {error}", flush=True)
        for child in getattr(t.strategy.launcher, "procs", []):  # rank 0 waits for the rank it started
            child.wait(timeout=60)
        return

    def checkpoint_at_validation_end() -> ModelCheckpoint:
        return ModelCheckpoint(dirpath=root, monitor="val_loss", save_on_train_epoch_end=False)

    scenarios: list[tuple[str, str, str, str, list[pl.Callback]]] = [
        # name, recipe, scheduler, shards, extra callbacks
        ("1a recipe as a callback", "callback", "plain", "odd", [AllreduceValLoss()]),
        ("1b recipe as a module hook", "hook", "plain", "odd", []),
        ("1c recipe as a callback + ModelCheckpoint(monitor='val_loss', save_on_train_epoch_end=False)",
         "callback", "plain", "odd", [AllreduceValLoss(), checkpoint_at_validation_end()]),
        ("1d recipe as a module hook + ModelCheckpoint(monitor='val_loss', save_on_train_epoch_end=False)",
         "hook", "plain", "odd", [checkpoint_at_validation_end()]),
        ("1e recipe kept + DistributedReduceLROnPlateau", "callback", "ours", "odd", [AllreduceValLoss()]),
        ("1f recipe, Lightning's padded DistributedSampler", "callback", "plain", "padded", [AllreduceValLoss()]),
        ("1g self.log(sync_dist=True), 5 samples", "sync_dist", "plain", "odd", []),
        ("1h self.log(sync_dist=True), 6 samples", "sync_dist", "plain", "even", []),
        ("2b port to on_validation_epoch_end + sync_dist=True", "port", "plain", "odd", []),
        ("2c torchmetrics Metric with sum/count states", "metric", "plain", "odd", []),
        ("2d torchmetrics MeanMetric of batch losses", "meanmetric", "plain", "odd", []),
        ("replacement: DistributedReduceLROnPlateau", "none", "ours", "odd", []),
        ("replacement, 6 samples", "none", "ours", "even", []),
        ("replacement, Lightning's padded DistributedSampler", "none", "ours", "padded", []),
    ]
    for name, recipe, scheduler, sampler, callbacks in scenarios:
        events.clear()
        t = trainer(*callbacks, sampler=sampler)
        model = Model(recipe, scheduler, sampler)
        t.fit(model)
        seen = t.lr_scheduler_configs[0].scheduler.seen
        final = t.lr_scheduler_configs[0].scheduler
        mine = {"seen": seen, "events": list(events), "validated": model.validated,
                "after": (final.best, final.num_bad_epochs, final.get_last_lr()[0])}
        if t.checkpoint_callback is not None and t.checkpoint_callback.best_model_score is not None:
            mine["checkpoint best"] = float(t.checkpoint_callback.best_model_score)
        ranks: list[Any] = [None] * t.world_size
        dist.all_gather_object(ranks, mine)
        if t.global_rank == 0:
            print_lightning(name, sampler, ranks)
    dist.barrier()
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        shutil.rmtree(root, ignore_errors=True)


def lightning_truth(shards: str, epoch: int) -> float:
    """The exact mean over the validation set's finite losses (without any padding repeat)."""
    dataset = SHARDS["even"][0] + SHARDS["even"][1] if shards == "even" else VAL_VALUES
    if epoch == NAN_EPOCH:  # rank 1's losses are NaN: the mean over the finite ones, rank 0's
        dataset = SHARDS["even" if shards == "even" else "odd"][0]  # also rank 0's padded shard
    return sum(dataset) / len(dataset) * EPOCH_SCALE[epoch]


def print_lightning(name: str, shards: str, ranks: list[dict[str, Any]]) -> None:
    print(f"\n=== {name}")
    for epoch in range(len(EPOCH_SCALE)):
        cells = []
        for rank, r in enumerate(ranks):
            given, used = r["seen"][epoch] if epoch < len(r["seen"]) else (None, None)
            cells.append(f"rank {rank} {r['validated'][epoch]} -> step({fmt(given)}) on {fmt(used)}")
        print(f"epoch {epoch}: exact mean {lightning_truth(shards, epoch):.4f} | " + " | ".join(cells))
    print("after fit, per rank (best, num_bad_epochs, lr): "
          + "  ".join(f"({fmt(r['after'][0])}, {r['after'][1]}, {r['after'][2]:g})" for r in ranks))
    if "checkpoint best" in ranks[0]:
        print("ModelCheckpoint.best_model_score per rank: " + "  ".join(fmt(r["checkpoint best"]) for r in ranks))
    order = [f"{what} {fmt(v)}" for what, e, v in ranks[0]["events"] if e == 0]
    print("rank 0, epoch 0, in order (val_loss): " + "; ".join(order))


# --------------------------------------------------------------------------------------------
# Horovod: recipe 3 (nan_to_num, then hvd.allreduce)
# --------------------------------------------------------------------------------------------


def horovod_main() -> None:
    import horovod.torch as hvd
    import numpy as np

    hvd.init()
    rank = hvd.rank()
    n = HVD_SAMPLES[rank]
    half = torch.where(torch.arange(n) % 2 == 0, 0.05, -0.05).double()  # the rank's mean stays exact

    # The recipe as written: a numpy scalar into hvd.allreduce.
    val = np.nan_to_num(float("nan") if rank == NAN_RANK else 0.5)
    try:
        hvd.allreduce(val)
        print(f"rank {rank}: hvd.allreduce(np.nan_to_num(val)) returned", flush=True)
    except Exception as error:  # what every rank sees; no rank is left waiting
        print(f"rank {rank}: hvd.allreduce({type(val).__module__}.{type(val).__name__}) raised "
              f"{type(error).__name__}: {error}", flush=True)

    def scheduler(kind: type[ReduceLROnPlateau]) -> ReduceLROnPlateau:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        return kind(optimizer, mode="min", factor=0.5, patience=1)

    recipe, ours = scheduler(ReduceLROnPlateau), scheduler(DistributedReduceLROnPlateau)
    rows = []
    for epoch in range(len(HVD_MEANS[0])):
        losses = HVD_MEANS[rank][epoch] + half
        every = hvd.allgather(losses)
        truth = float(every[torch.isfinite(every)].mean())
        val = losses.mean().item()  # this rank's mean validation loss

        # The recipe, "fixed" so that it runs: NaN -> 0, then the average of the ranks' means.
        val_recipe = hvd.allreduce(torch.tensor(np.nan_to_num(val)), name=f"val.{epoch}").item()
        recipe.step(val_recipe)
        # The replacement.
        ours.step(val, weight=n)

        state = [val_recipe, recipe.best, recipe.num_bad_epochs, recipe.get_last_lr()[0],
                 ours.last_global_metric, ours.best, ours.num_bad_epochs, ours.get_last_lr()[0]]
        everyone = hvd.allgather_object(state)
        rows.append((epoch, [HVD_MEANS[r][epoch] for r in range(hvd.size())], truth, state,
                     all(s == state for s in everyone)))

    if rank == 0:
        print(f"\nrank 0 validates {HVD_SAMPLES[0]} samples, rank 1 {HVD_SAMPLES[1]}; mode='min', factor=0.5, "
              "patience=1, lr 0.1")
        print("epoch | rank means     | exact mean | recipe: steps on  best    bad  lr     "
              "| ours: steps on  best    bad  lr     | same on both ranks")
        for epoch, means, truth, s, same in rows:
            m = "  ".join(f"{x:<5g}" for x in means)
            print(f"{epoch:5d} | {m:<14} | {truth:10.4f} | {s[0]:16.4f}  {s[1]:.4f}  {s[2]:3d}  {s[3]:<6g} "
                  f"| {s[4]:14.4f}  {s[5]:.4f}  {s[6]:3d}  {s[7]:<6g} | {same}")


# --------------------------------------------------------------------------------------------


def run_all(timeout: float) -> int:
    """Each launch in its own process group, killed whole if it outlives ``timeout`` seconds
    (Lightning's DDP ranks can outlive a SIGTERM to their parent)."""
    script = str(Path(__file__).resolve())
    horovodrun = str(Path(sys.executable).with_name("horovodrun"))
    launches = [
        [sys.executable, script, "lightning"],
        [sys.executable, script, "lightning-epoch-end"],
        [horovodrun, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, script, "horovod"],
    ]
    worst = 0
    for cmd in launches:
        print(f"\n##### {' '.join(Path(c).name if c in (script, sys.executable, horovodrun) else c for c in cmd)}",
              flush=True)
        process = subprocess.Popen(cmd, start_new_session=True)
        try:
            rc = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            print(f"##### killed after {timeout:g} s", flush=True)
            rc = 124
        try:  # a rank that outlived its launcher
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        worst = max(worst, rc)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["all", "lightning", "lightning-epoch-end", "horovod"])
    parser.add_argument("--timeout", type=float, default=300, help="seconds per launch, with 'all'")
    args = parser.parse_args()
    if args.what == "all":
        sys.exit(run_all(args.timeout))
    elif args.what == "horovod":
        horovod_main()
    else:
        lightning_main(epoch_end=args.what == "lightning-epoch-end")


if __name__ == "__main__":
    main()
