"""Lightning scenarios on real ranks, many fits per launch.

``python tests/lightning_checks.py ddp OUT_DIR [CKPT_OTHER]``: Lightning's own launcher starts
the second rank (``Trainer(strategy="ddp", accelerator="cpu", devices=2)``).
``horovodrun -np 2 --gloo python tests/lightning_checks.py horovod OUT_DIR [CKPT_OTHER]``: the
ranks come from horovodrun (``Trainer(strategy="horovod")``). ``CKPT_OTHER`` is a checkpoint
of a 1-process run, resumed on the 2 ranks.
``DISTPLATEAU_LIGHTNING_PACKAGE`` names the Lightning package every class comes from,
``lightning.pytorch`` (default) or ``pytorch_lightning``, with distplateau's module for it.
``DISTPLATEAU_LIGHTNING_ACCELERATOR`` is the Trainer's ``accelerator``: ``cpu`` (default) or
``gpu`` (``tests/test_cuda.py``: one GPU per rank, so DDP's process group is NCCL).
Both are read by ``main()``: importing this file imports no Lightning and reads nothing.

Each rank writes ``OUT_DIR/rank{r}.json`` after every scenario: scenario name -> what that
rank observed (or ``{"error": traceback}``). ``tests/test_lightning_ranks.py`` compares the
ranks. The validation metric is scripted per sample so that the exact global mean is known:
sample ``i`` at epoch ``e`` has loss ``BASE + (+d_e if i is even else -d_e)``, so the two
ranks' local means drift apart while the global mean stays ``BASE``.
"""

from __future__ import annotations

import csv
import importlib
import json
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.data import DataLoader, Dataset, TensorDataset

from distplateau import DistributedReduceLROnPlateau
from distplateau._lightning import DISTPLATEAU_MODULE
from distplateau.replay import read_series, replay

BASE = 2.0
EPOCHS = 6
DRIFT = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]  # one per epoch of a full fit; exact in float32: no rounding in local means
assert len(DRIFT) == EPOCHS

# Set by main(): the command line, the environment and the Lightning package they name.
STRATEGY = "single"
OUT = Path(".")
CKPT_OTHER: str | None = None
PACKAGE = "lightning.pytorch"
ACCELERATOR = "cpu"
pl: Any = None  # the Lightning package
dp: Any = None  # distplateau's module for it
Trainer: Any = None
ModelCheckpoint: Any = None
# Built by load_lightning() on the classes of that package, from the ...Hooks classes below.
Model: Any = None
LrHistory: Any = None
RecordingIO: Any = None


class Indexed(Dataset):
    def __init__(self, n: int, values: list[float] | None = None) -> None:
        self.n, self.values = n, values

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(float(i) if self.values is None else self.values[i])


def train_data(n: int = 16) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, generator=gen)
    return TensorDataset(torch.arange(n), x, x @ torch.tensor([1.0, -2.0, 0.5]) + 0.25)


class ModelHooks:
    """A linear regression whose validation loss is scripted (see the module docstring);
    ``Model`` is this on the LightningModule of the package under test."""

    def __init__(self, scheduler: str = "ours", log_on: str = "all", strict: bool = True, val: Any = None,
                 scheduler_kwargs: dict[str, Any] | None = None, bare: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(3, 1)
        self.scheduler, self.log_on, self.strict, self.val = scheduler, log_on, strict, val
        self.scheduler_kwargs = scheduler_kwargs or {}
        self.bare = bare
        self.lr = 0.1
        self.lrs: list[float] = []
        self.train_indices: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        _, x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x).squeeze(-1), y)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        if self.val is not None:  # explicit per-sample losses
            loss = batch.mean()
        else:
            drift = DRIFT[self.current_epoch]
            loss = (BASE + torch.where(batch.long() % 2 == 0, drift, -drift)).mean()
        if self.log_on == "all" or (self.log_on == "rank0" and self.global_rank == 0):
            self.log("val_loss", loss, batch_size=len(batch))

    def val_dataloader(self) -> DataLoader:
        if self.val is not None:
            values = self.val[self.global_rank]
            return DataLoader(Indexed(len(values), values), batch_size=2)
        return DataLoader(Indexed(8), batch_size=2)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(train_data(), batch_size=4)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        kwargs = {"factor": 0.5, "patience": 1, **self.scheduler_kwargs}
        if self.scheduler == "plain":
            sched: Any = ReduceLROnPlateau(opt, **kwargs)
        else:
            sched = DistributedReduceLROnPlateau(opt, **kwargs)
        if self.bare:
            return [opt], [sched]
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss", "strict": self.strict}}


class LrHistoryHooks:
    """Records the learning rate after each epoch's plateau step, and the scheduler's state
    (``LrHistory``: this on the package's Callback)."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.globals: list[float | None] = []
        self.restored: dict[str, Any] | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.restored = _plain(trainer.lr_scheduler_configs[0].scheduler.state_dict())

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.current_epoch > 0 and len(self.lrs) < trainer.current_epoch:
            self._record(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._record(trainer)

    def _record(self, trainer: Any) -> None:
        sched = trainer.lr_scheduler_configs[0].scheduler
        self.lrs.append(float(trainer.optimizers[0].param_groups[0]["lr"]))
        self.globals.append(getattr(sched, "last_global_metric", None))


def _plain(state: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, type(None), list)) else repr(v)) for k, v in state.items()}


def fit(model: Any, epochs: int = EPOCHS, root: str = "run", ckpt_path: str | None = None,
        callbacks: list[Any] | None = None, strategy: Any = None, **trainer_kwargs: Any) -> tuple[Any, Any]:
    history = LrHistory()
    trainer = Trainer(
        strategy=strategy or ("auto" if STRATEGY == "single" else STRATEGY), accelerator=ACCELERATOR,
        devices=2 if STRATEGY == "ddp" else 1,
        max_epochs=epochs, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks or []),
        num_sanity_val_steps=0, default_root_dir=str(OUT / root), callbacks=[history, *(callbacks or [])],
        **{"logger": False, **trainer_kwargs},
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, history


def scheduler_state(trainer: Any) -> dict[str, Any]:
    sched = trainer.lr_scheduler_configs[0].scheduler
    state = _plain(sched.state_dict())
    state["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
    return state


# ------------------------------------------------------------------ scenarios (every rank runs each)

def plain_torch_scheduler_diverges() -> dict[str, Any]:
    trainer, h = fit(Model(scheduler="plain"))
    return {"lrs": h.lrs}


def class_swap_follows_global_schedule() -> dict[str, Any]:
    trainer, h = fit(Model())
    return {"lrs": h.lrs, "globals": h.globals, "state": scheduler_state(trainer),
            "callbacks": [f"{type(c).__module__}.{type(c).__name__}" for c in trainer.callbacks],
            "strategy": f"{type(trainer.strategy).__module__}.{type(trainer.strategy).__name__}",
            "lightning": f"{PACKAGE} {pl.__version__}",
            "device": str(trainer.strategy.root_device),
            "process_group": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
            "weights": {k: v.tolist() for k, v in trainer.lightning_module.state_dict().items()}}


def sample_counts_weight_uneven_shards() -> dict[str, Any]:
    # rank 0: three samples (mean 2), rank 1: one sample (mean 10): exact global mean 4, unweighted 6
    model = Model(val=[[1.0, 2.0, 3.0], [10.0]], scheduler_kwargs={"patience": 100})
    trainer, h = fit(model, epochs=2, use_distributed_sampler=False)
    return {"globals": h.globals, "default_weight": trainer.lr_scheduler_configs[0].scheduler.default_weight}


def padded_sampler_gives_the_mean_over_the_dataset() -> dict[str, Any]:
    # 7 samples on 2 ranks: Lightning's DistributedSampler would give rank 1 sample 0 again
    # (4 + 4 samples). Sample 0 is an outlier, so a repeat of it would move the mean.
    values = [100.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    model = Model(val=[values, values], scheduler_kwargs={"patience": 100})
    model.val_dataloader = lambda: DataLoader(Indexed(len(values), values), batch_size=2)  # type: ignore[method-assign]
    trainer, h = fit(model, epochs=2)
    sampler = trainer.val_dataloaders.sampler
    return {"globals": h.globals, "default_weight": trainer.lr_scheduler_configs[0].scheduler.default_weight,
            "sampler": type(sampler).__name__, "expected": sum(values) / len(values)}


def stops_together() -> dict[str, Any]:
    # The global mean stays BASE while rank 0's local loss worsens and rank 1's improves: an
    # early stop decided per rank would stop rank 0 alone and leave rank 1 waiting.
    trainer, h = fit(Model(scheduler_kwargs={"stop_patience": 2}), epochs=EPOCHS)
    return {"should_stop": trainer.should_stop, "epochs_run": trainer.current_epoch, "lrs": h.lrs,
            "state": scheduler_state(trainer)}


def warmup_then_plateau() -> dict[str, Any]:
    trainer, h = fit(Model(scheduler_kwargs={"warmup": 2, "warmup_start_factor": 0.5}), epochs=EPOCHS)
    return {"lrs": h.lrs, "globals": h.globals, "state": scheduler_state(trainer)}


def strict_false_metric_on_rank0_only() -> dict[str, Any]:
    trainer, h = fit(Model(log_on="rank0", strict=False), epochs=4)
    return {"lrs": h.lrs, "globals": h.globals, "state": scheduler_state(trainer)}


def strict_false_metric_missing_everywhere_skips() -> dict[str, Any]:
    # validation only every second epoch: at epoch 0 no rank has val_loss yet
    trainer, h = fit(Model(strict=False), epochs=4, check_val_every_n_epoch=2)
    return {"state": scheduler_state(trainer), "globals": h.globals}


def strict_true_metric_on_rank0_only_raises() -> dict[str, Any]:
    try:
        fit(Model(log_on="rank0", strict=True), epochs=2)
    except Exception as err:  # noqa: BLE001
        return {"raised": type(err).__name__, "message": str(err)}
    return {"raised": None}


def monitor_on_scheduler_is_enough() -> dict[str, Any]:
    model = Model(bare=True, scheduler_kwargs={"monitor": "val_loss"})
    trainer, h = fit(model, epochs=3)
    return {"monitor": trainer.lr_scheduler_configs[0].monitor, "state": scheduler_state(trainer)}


def resume_same_world_size() -> dict[str, Any]:
    ckpt = ModelCheckpoint(dirpath=str(OUT / "ckpt-same"), save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    first, _ = fit(Model(), epochs=3, root="resume-a", callbacks=[ckpt])
    path = str(OUT / "ckpt-same" / "epoch=2.ckpt")
    saved = _plain(torch.load(path, weights_only=False)["lr_schedulers"][0])
    trainer, h = fit(Model(), epochs=EPOCHS, root="resume-b", ckpt_path=path)
    return {"saved": saved, "restored": h.restored, "state": scheduler_state(trainer)}


def resume_from_other_world_size() -> dict[str, Any]:
    assert CKPT_OTHER, "no checkpoint from a run at another world size was passed"
    saved = _plain(torch.load(CKPT_OTHER, weights_only=False)["lr_schedulers"][0])
    trainer, h = fit(Model(), epochs=EPOCHS, root="resume-c", ckpt_path=CKPT_OTHER)
    return {"saved": saved, "restored": h.restored, "state": scheduler_state(trainer)}


#: One global validation loss per validation run (``val_check_interval=0.25``: after every
#: training batch, four a epoch): the k-th run (global step k) logs ``VALUES[k - 1]`` on average.
VALUES = [5.0, 4.0, 4.0, 4.0, 3.0, 3.0, 3.0, 3.0, 2.0, 2.5, 2.5, 2.5]
#: Per-sample offsets of the 7 validation samples: they sum to 0, but rank 0's (samples 0, 2, 4, 6)
#: average +0.75 and rank 1's (1, 3, 5) -1, so only the sample-weighted mean of the ranks is VALUES.
OFFSETS = [3.0, -1.0, 3.0, -1.0, 3.0, -1.0, -6.0]


def no_step_without_a_new_value() -> dict[str, Any]:
    """Validation every second epoch on a loss that improves at every validation: the epochs in
    between bring no new value, and a step on the old one would count as a bad epoch."""

    class Improving(Model):
        def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
            loss = (10.0 - self.current_epoch + torch.where(batch.long() % 2 == 0, 0.5, -0.5)).mean()
            self.log("val_loss", loss, batch_size=len(batch))

    trainer, h = fit(Improving(scheduler_kwargs={"patience": 0}), epochs=EPOCHS, check_val_every_n_epoch=2)
    return {"lrs": h.lrs, "state": scheduler_state(trainer)}


def step_after_every_validation(ckpt_path: str | None = None, callbacks: list[Any] | None = None,
                                root: str = "per-validation", **scheduler_kwargs: Any) -> dict[str, Any]:
    """``"interval": "validation"`` with four validation runs an epoch, uneven shards (4 + 3)."""

    class PerValidation(Model):
        def __init__(self) -> None:
            super().__init__(scheduler_kwargs={"interval": "validation", **scheduler_kwargs})
            self.steps: list[list[Any]] = []

        def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
            offsets = torch.tensor([OFFSETS[int(i)] for i in batch])
            self.log("val_loss", (VALUES[self.global_step - 1] + offsets).mean(), batch_size=len(batch))

        def val_dataloader(self) -> DataLoader:
            return DataLoader(Indexed(len(OFFSETS)), batch_size=2)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(train_data(32), batch_size=4)  # 16 samples a rank: 4 batches

        def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
            super().lr_scheduler_step(scheduler, metric)
            self.steps.append([self.global_step, float(metric), scheduler.default_weight,
                               scheduler.last_global_metric, float(scheduler.optimizer.param_groups[0]["lr"]),
                               scheduler.last_smoothed_metric])

    model = PerValidation()
    trainer, h = fit(model, epochs=3, root=root, ckpt_path=ckpt_path, callbacks=callbacks, val_check_interval=0.25)
    return {"steps": model.steps, "state": scheduler_state(trainer), "restored": h.restored,
            "interval": trainer.lr_scheduler_configs[0].interval}


def step_after_every_validation_and_resume() -> dict[str, Any]:
    """The run of ``step_after_every_validation`` with a checkpoint after every validation
    run, then resumed from one saved mid-epoch (global step 6 of 12) and one at an epoch's end (8)."""
    ckpt = ModelCheckpoint(dirpath=str(OUT / "ckpt-val"), save_top_k=-1, filename="{step}")
    result = {"uninterrupted": step_after_every_validation(callbacks=[ckpt]),
              "files": sorted(os.listdir(OUT / "ckpt-val"))}
    for step in (6, 8):
        path = str(OUT / "ckpt-val" / f"step={step}.ckpt")
        result[f"from_{step}"] = step_after_every_validation(ckpt_path=path, root=f"per-validation-{step}")
    return result


def smoothing_after_every_validation() -> dict[str, Any]:
    """``step_after_every_validation`` with ``smoothing_factor=0.5``."""
    return step_after_every_validation(root="per-validation-smoothed", smoothing_factor=0.5)


#: The global validation loss of epochs 1, 3 and 5 (``check_val_every_n_epoch=2``): 2.25 is worse
#: than 2.0, but its average with the earlier ones (2.375) is better than theirs (2.5).
SMOOTHED_VALUES = [3.0, 2.0, 2.25]


def smoothing_with_stale_epochs_and_pending_steps(ckpt_path: str | None = None, callbacks: list[Any] | None = None,
                                                  root: str = "smoothed") -> dict[str, Any]:
    """``smoothing_factor=0.5``, ``patience=0``, validation every second epoch on uneven shards
    (4 + 3): the epochs without validation must leave the average alone."""

    class Smoothed(Model):
        def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
            offsets = torch.tensor([OFFSETS[int(i)] for i in batch])
            value = SMOOTHED_VALUES[self.current_epoch // 2]
            self.log("val_loss", (value + offsets).mean(), batch_size=len(batch))

        def val_dataloader(self) -> DataLoader:
            return DataLoader(Indexed(len(OFFSETS)), batch_size=2)

    model = Smoothed(scheduler_kwargs={"patience": 0, "smoothing_factor": 0.5})
    trainer, h = fit(model, epochs=EPOCHS, root=root, ckpt_path=ckpt_path, callbacks=callbacks,
                     check_val_every_n_epoch=2)
    return {"lrs": h.lrs, "globals": h.globals, "state": scheduler_state(trainer), "restored": h.restored}


def smoothing_resumed_with_and_without_a_pending_step() -> dict[str, Any]:
    """The run of ``smoothing_with_stale_epochs_and_pending_steps`` with a checkpoint at the end of
    every epoch, resumed from epoch 1's (saved before its plateau step: pending) and epoch 2's
    (no validation: nothing pending)."""
    ckpt = ModelCheckpoint(dirpath=str(OUT / "ckpt-smoothed"), save_top_k=-1, every_n_epochs=1, filename="{epoch}",
                           save_on_train_epoch_end=True)
    result = {"uninterrupted": smoothing_with_stale_epochs_and_pending_steps(callbacks=[ckpt])}
    for epoch in (1, 2):
        path = str(OUT / "ckpt-smoothed" / f"epoch={epoch}.ckpt")
        result[f"from_{epoch}"] = smoothing_with_stale_epochs_and_pending_steps(ckpt_path=path,
                                                                                root=f"smoothed-{epoch}")
        result[f"from_{epoch}"]["pending"] = "distplateau_pending_steps" in torch.load(path, weights_only=False)
    return result


#: The training loss every optimizer step logs on average over the ranks (rank 0 +0.5, rank 1
#: -0.5): windows of 4 steps average 4, 3 and 3.5.
TRAIN_VALUES = [4.0] * 4 + [3.0, 2.0, 4.0, 3.0] + [3.5] * 4


def window_of_training_steps() -> dict[str, Any]:
    """``"interval": "step"`` on a training loss logged at every step, ``accumulation_size=4``
    and ``smoothing_factor=0.5``, uneven validation shards (4 + 3) that must not weigh it;
    every all-gather of the fit counted."""

    class PerStep(Model):
        def __init__(self) -> None:
            super().__init__(scheduler_kwargs={"patience": 0, "accumulation_size": 4, "smoothing_factor": 0.5})
            self.steps: list[list[Any]] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            offset = 0.5 if self.global_rank == 0 else -0.5
            self.log("train_loss", TRAIN_VALUES[self.global_step] + offset, on_step=True, on_epoch=False)
            return super().training_step(batch, batch_idx)

        def val_dataloader(self) -> DataLoader:
            return DataLoader(Indexed(len(OFFSETS)), batch_size=2)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(train_data(32), batch_size=4)  # 16 samples a rank: 4 steps an epoch

        def configure_optimizers(self) -> Any:
            config = super().configure_optimizers()
            config["lr_scheduler"].update(monitor="train_loss", interval="step")
            return config

        def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
            super().lr_scheduler_step(scheduler, metric)
            self.steps.append([self.global_step, float(metric), scheduler.default_weight, scheduler.window_calls,
                               scheduler.last_global_metric, scheduler.last_smoothed_metric,
                               float(scheduler.optimizer.param_groups[0]["lr"])])

    model = PerStep()
    strategy = dp.HorovodStrategy() if STRATEGY == "horovod" else None
    counts, stop = _counting_gathers()
    try:
        trainer, h = fit(model, epochs=3, root="per-step-window", strategy=strategy)
    finally:
        stop()
    return {"steps": model.steps, "gathers": counts["gathers"], "state": scheduler_state(trainer)}


def _counting_gathers() -> tuple[dict[str, int], Callable[[], None]]:
    """Count every all-gather of this rank from now on (torch.distributed's and Horovod's, which
    the scheduler's backends and the strategies' ``all_gather`` end in); returns the counts
    and the function that stops counting."""
    dist = torch.distributed
    targets = [(dist, name) for name in ("all_gather", "all_gather_into_tensor", "all_gather_single",
                                         "all_gather_object") if hasattr(dist, name)]
    if STRATEGY == "horovod":
        hvd = importlib.import_module("horovod.torch")
        targets += [(hvd, "allgather"), (hvd, "allgather_async"), (hvd, "allgather_object")]
    counts = {"gathers": 0}
    originals = [(module, name, getattr(module, name)) for module, name in targets]

    def counting(original: Callable[..., Any]) -> Callable[..., Any]:
        def gather(*args: Any, **kwargs: Any) -> Any:
            counts["gathers"] += 1
            return original(*args, **kwargs)
        return gather

    for module, name, original in originals:
        setattr(module, name, counting(original))

    def stop() -> None:
        for module, name, original in originals:
            setattr(module, name, original)

    return counts, stop


def one_collective_per_plateau_step() -> dict[str, Any]:
    """Count the all-gathers of whole fits, validating every second epoch: the metric on every
    rank, and (``strict=False``) on rank 0 only, where the ranks must learn who has it."""
    result = {}
    for name, model in (("everywhere", Model()), ("rank0_only", Model(log_on="rank0", strict=False))):
        # Built before counting starts: HorovodStrategy gathers the node layout once, when built.
        strategy = dp.HorovodStrategy() if STRATEGY == "horovod" else None
        counts, stop = _counting_gathers()
        try:
            trainer, h = fit(model, epochs=4, root=f"count-{name}", check_val_every_n_epoch=2, strategy=strategy)
        finally:
            stop()
        result[name] = {"gathers": counts["gathers"], "state": scheduler_state(trainer), "globals": h.globals}
    return result


class RecordingIOHooks:
    """Lightning's checkpoint writer, noting which rank wrote what (``RecordingIO``: this on the
    package's TorchCheckpointIO)."""

    writes: list[str] = []

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        RecordingIO.writes.append(os.path.basename(str(path)))
        super().save_checkpoint(checkpoint, path, storage_options)


def horovod_checkpoints_written_by_rank0_only() -> dict[str, Any]:
    HorovodStrategy = dp.HorovodStrategy  # the strategy object of this package
    RecordingIO.writes = []
    ckpt = ModelCheckpoint(dirpath=str(OUT / "ckpt-hvd"), save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    fit(Model(), epochs=2, root="hvd-ckpt", callbacks=[ckpt], strategy=HorovodStrategy(checkpoint_io=RecordingIO()))
    return {"writes": RecordingIO.writes, "files": sorted(os.listdir(OUT / "ckpt-hvd"))}


def horovod_matches_full_batch_reference(accumulate: int = 1) -> dict[str, Any]:
    """Every optimizer step applies the mean over ranks (and accumulated batches) of the batch
    gradients: compare with plain torch doing exactly that from rank 0's start."""

    class Shards(Model):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            rank = int(os.environ["HOROVOD_RANK"])
            # Different weights and optimizer settings off rank 0: the strategy must broadcast rank 0's.
            with torch.no_grad():
                self.layer.weight.add_(rank)
            self.lr = 0.1 + rank

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.train_indices.append(batch[0].tolist())
            return super().training_step(batch, batch_idx)

    model = Shards(scheduler_kwargs={"patience": 100})
    trainer, _ = fit(model, epochs=2, accumulate_grad_batches=accumulate)
    # every rank's sample indices, step by step: shape (world, steps, batch)
    shards = trainer.strategy.all_gather(torch.tensor(model.train_indices)).tolist()
    torch.manual_seed(0)
    ref = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    _, x, y = train_data().tensors
    for step in range(0, len(shards[0]), accumulate):
        grads = []
        for rank_indices in shards:
            opt.zero_grad()
            for batch in rank_indices[step:step + accumulate]:
                idx = torch.tensor(batch)
                (torch.nn.functional.mse_loss(ref(x[idx]).squeeze(-1), y[idx]) / accumulate).backward()
            grads.append([p.grad.clone() for p in ref.parameters()])
        for p, *gs in zip(ref.parameters(), *grads):
            p.grad = torch.stack(gs).mean(0)
        opt.step()
    got = trainer.lightning_module.layer
    diff = max(float((a - b).abs().max()) for a, b in zip(got.parameters(), ref.parameters()))
    strategy = trainer.strategy
    rank = strategy.global_rank
    return {
        "max_diff_to_reference": diff,
        "shards": shards,
        "rank": rank, "world": strategy.world_size,
        "strategy": f"{type(strategy).__module__}.{type(strategy).__name__}",
        "reduce_sum": float(strategy.reduce(torch.tensor(float(rank + 1)), reduce_op="sum")),
        "reduce_mean": float(strategy.reduce(torch.tensor(float(rank + 1)))),
        "all_gather": strategy.all_gather(torch.tensor([rank, 10 + rank])).tolist(),
        "broadcast": strategy.broadcast({"from": rank}, src=1),
        "barrier": strategy.barrier() is None,
        "backend": type(trainer.lr_scheduler_configs[0].scheduler._gather).__name__,
    }


def horovod_accumulates_gradients() -> dict[str, Any]:
    return horovod_matches_full_batch_reference(accumulate=2)


def horovod_fits_the_same_model_twice() -> dict[str, Any]:
    model = Model()
    fit(model, epochs=1, root="twice-a")
    trainer, _ = fit(model, epochs=2, root="twice-b")  # a second strategy wraps the same parameters
    return {"weights": model.layer.weight.detach().tolist()}


def global_value_in_the_loggers() -> dict[str, Any]:
    """The callback's ``val_loss/global`` (and ``/smoothed``, ``/best``, ...) in a CSVLogger's file,
    the scheduler's log line per cut (captured on every rank), and the replay of the logged column,
    from the CSV file and from the event files of a TensorBoardLogger beside it."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger("distplateau")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    settings = {"factor": 0.5, "patience": 1, "smoothing_factor": 0.5, "stop_patience": 4}
    try:
        csv_logger = pl.loggers.CSVLogger(str(OUT / "loggers"), name="", version=0)
        tb_logger = pl.loggers.TensorBoardLogger(str(OUT / "tensorboard"), name="", version=0)
        trainer, h = fit(Model(scheduler_kwargs=settings), logger=[csv_logger, tb_logger])
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    result: dict[str, Any] = {"lrs": h.lrs, "lines": lines, "epochs_run": trainer.current_epoch}
    path = OUT / "loggers" / "version_0" / "metrics.csv"
    if trainer.global_rank == 0:
        rows = list(csv.DictReader(path.read_text().splitlines()))
        result["rows"] = [{k: v for k, v in row.items() if v} for row in rows]
        steps, values = read_series(path, "val_loss/global")
        result["replayed"] = replay(values, settings, lr=0.1, steps=steps).lrs
        result["csv_series"] = [steps, values]
        steps, values = read_series(OUT / "tensorboard" / "version_0", "val_loss/global")
        result["tensorboard_series"] = [steps, values]
        result["replayed_tensorboard"] = replay(values, settings, lr=0.1, steps=steps).lrs
    return result


def world_size_1_checkpoint() -> dict[str, Any]:
    ckpt = ModelCheckpoint(dirpath=str(OUT / "ckpt-world1"), save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer, h = fit(Model(), epochs=3, root="world1", callbacks=[ckpt])
    return {"path": str(OUT / "ckpt-world1" / "epoch=2.ckpt"), "lrs": h.lrs, "state": scheduler_state(trainer),
            "device": str(trainer.strategy.root_device)}


#: The scenarios each launch runs, in order; ``single`` is one process that writes a checkpoint
#: (``world_size_1_checkpoint``), or resumes ``CKPT_OTHER`` when given (``resume_from_other_world_size``).
SCENARIOS: dict[str, list[Callable[[], dict[str, Any]]]] = {
    "ddp": [plain_torch_scheduler_diverges, class_swap_follows_global_schedule, sample_counts_weight_uneven_shards,
            padded_sampler_gives_the_mean_over_the_dataset, stops_together, warmup_then_plateau,
            strict_false_metric_on_rank0_only, strict_false_metric_missing_everywhere_skips,
            monitor_on_scheduler_is_enough, resume_same_world_size, resume_from_other_world_size,
            strict_true_metric_on_rank0_only_raises, no_step_without_a_new_value,
            step_after_every_validation_and_resume, one_collective_per_plateau_step,
            smoothing_after_every_validation, smoothing_resumed_with_and_without_a_pending_step,
            window_of_training_steps, global_value_in_the_loggers],
    "horovod": [class_swap_follows_global_schedule, horovod_matches_full_batch_reference, horovod_accumulates_gradients,
                horovod_checkpoints_written_by_rank0_only, horovod_fits_the_same_model_twice,
                sample_counts_weight_uneven_shards, padded_sampler_gives_the_mean_over_the_dataset,
                resume_same_world_size, resume_from_other_world_size, stops_together, warmup_then_plateau,
                strict_false_metric_on_rank0_only, strict_false_metric_missing_everywhere_skips,
                strict_true_metric_on_rank0_only_raises, no_step_without_a_new_value,
                step_after_every_validation_and_resume, one_collective_per_plateau_step,
                smoothing_after_every_validation, smoothing_resumed_with_and_without_a_pending_step,
                window_of_training_steps, global_value_in_the_loggers],
}


def load_lightning(package: str) -> None:
    """Import ``package`` (``lightning.pytorch`` or ``pytorch_lightning``) and distplateau's module
    for it, and build ``Model``, ``LrHistory`` and ``RecordingIO`` on that package's classes.
    Not at import: the package is chosen at run time, and importing this file imports no Lightning."""
    global PACKAGE, pl, dp, Trainer, ModelCheckpoint, Model, LrHistory, RecordingIO
    PACKAGE = package
    pl = importlib.import_module(package)
    dp = importlib.import_module(DISTPLATEAU_MODULE[package])
    Trainer, ModelCheckpoint = pl.Trainer, pl.callbacks.ModelCheckpoint
    Model = type("Model", (ModelHooks, pl.LightningModule), {})
    LrHistory = type("LrHistory", (LrHistoryHooks, pl.callbacks.Callback), {})
    checkpoint_io = importlib.import_module(f"{package}.plugins.io").TorchCheckpointIO
    RecordingIO = type("RecordingIO", (RecordingIOHooks, checkpoint_io), {"writes": []})


def main(argv: list[str] | None = None) -> None:
    global STRATEGY, OUT, CKPT_OTHER, ACCELERATOR
    args = sys.argv[1:] if argv is None else argv
    STRATEGY, OUT, CKPT_OTHER = args[0], Path(args[1]), args[2] if len(args) > 2 else None
    ACCELERATOR = os.environ.get("DISTPLATEAU_LIGHTNING_ACCELERATOR", "cpu")
    load_lightning(os.environ.get("DISTPLATEAU_LIGHTNING_PACKAGE", "lightning.pytorch"))
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*(GPU available|TPU available|LOCAL_RANK|sync_dist).*")
    if STRATEGY == "single":
        scenarios = [resume_from_other_world_size] if CKPT_OTHER else [world_size_1_checkpoint]
    else:
        scenarios = SCENARIOS[STRATEGY]
    results: dict[str, Any] = {}
    rank = None
    for scenario in scenarios:
        try:
            results[scenario.__name__] = scenario()
        except Exception:  # noqa: BLE001
            results[scenario.__name__] = {"error": traceback.format_exc()}
        if rank is None:
            rank = int(os.environ.get("HOROVOD_RANK", os.environ.get("LOCAL_RANK", "0")))
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / f"rank{rank}.json").write_text(json.dumps(results, indent=1, default=repr))


if __name__ == "__main__":
    main()
