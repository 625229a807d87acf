"""DeepSpeed scenarios on real processes, many per launch.

- ``python tests/deepspeed_checks.py ranks OUT_DIR`` on every rank of a torch.distributed job
  (the ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` variables of
  ``harness.launch.run_torch``), with ``DS_ACCELERATOR=cpu``: DeepSpeed's CPU accelerator, whose
  process group is gloo. Each rank runs every scenario of :data:`SCENARIOS`.
- ``python tests/deepspeed_checks.py lightning OUT_DIR``: one process, Lightning's
  ``Trainer(strategy="deepspeed", accelerator="cpu")`` with our scheduler (:func:`lightning_fit`).

Each rank writes ``OUT_DIR/rank{r}.json`` after each scenario: scenario name -> what that rank
observed, or ``{"error": traceback}``. ``tests/test_deepspeed.py`` compares that with torch's own
``ReduceLROnPlateau`` stepped in one process on the exact global mean. Importing this module does
nothing: DeepSpeed and Lightning are imported by :func:`main` only.

The model is trained by the engine for real (forward, ``engine.backward``, ``engine.step``),
under ZeRO stage 0 and 2. Its loss is linear in the parameters, ``model(x).mean()`` on a fixed
batch per rank, so that its gradient is the same at every step and the weights after training
tell which learning rate each optimizer step used. The validation losses are scripted per sample
on uneven shards with one NaN (``tests/uneven_shards.py``).
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from distplateau import DistributedReduceLROnPlateau
from tests.uneven_shards import EPOCHS, FACTOR, LR, PATIENCE, local_val_loss

MICRO_BATCH = 4
STEPS_PER_EPOCH = 2  # optimizer steps between two validations
ENGINE_STEPS = 8  # optimizer steps of the scenarios that hand the scheduler to deepspeed.initialize
STAGES = (0, 2)
# checkpoint_resume saves after this many epochs: after the first cut (0.1 -> 0.05), so that a
# resume that lost the learning rate would show.
SAVE_AFTER = 5
SCENARIOS: tuple[str, ...] = (
    *(f"engine_steps_ours_stage{stage}" for stage in STAGES),
    "engine_steps_ours_gradient_accumulation",
    *(f"engine_steps_torch_stage{stage}" for stage in STAGES),
    "engine_lr_kwargs_with_gradient_accumulation",
    *(f"validation_steps_stage{stage}" for stage in STAGES),
    *(f"checkpoint_resume_stage{stage}" for stage in STAGES),
    "zero_optimizer_is_no_torch_optimizer",
)


def batch(rank: int) -> torch.Tensor:
    """Rank ``rank``'s training batch: the same at every step, different on each rank, every
    value exact in float32 (so is the gradient of ``model(x).mean()``: the column means)."""
    return torch.arange(MICRO_BATCH * 3, dtype=torch.float32).reshape(MICRO_BATCH, 3) / 8 + rank


def config(stage: int, gradient_accumulation_steps: int = 1) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # ZeRO with torch's SGD
        # Off (0.19.8's default clips to norm 1.0): each update is then the learning rate times
        # the gradient, and the weights tell which learning rate the engine used.
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }


class Training:
    """A model, torch's SGD on it, and the DeepSpeed engine around both; with
    ``handed_to_initialize``, a scheduler built on the SGD and passed to ``deepspeed.initialize``
    (the pitfall), as ``self.scheduler``."""

    def __init__(self, stage: int, handed_to_initialize: Callable[[torch.optim.Optimizer], Any] | None = None,
                 gradient_accumulation_steps: int = 1) -> None:
        import deepspeed

        torch.manual_seed(0)
        self.model = torch.nn.Linear(3, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR)
        self.scheduler = handed_to_initialize(self.optimizer) if handed_to_initialize is not None else None
        self.engine, self.engine_optimizer, _, self.engine_scheduler = deepspeed.initialize(
            model=self.model, optimizer=self.optimizer, lr_scheduler=self.scheduler,
            config=config(stage, gradient_accumulation_steps))
        self.rank = torch.distributed.get_rank()
        self.initial_weights = self.weights()

    def train_step(self, lr_kwargs: dict[str, Any] | None = None) -> None:
        """One micro-batch: forward, backward and ``engine.step`` (an optimizer step at each
        gradient accumulation boundary)."""
        loss = self.engine(batch(self.rank)).mean()
        self.engine.backward(loss)
        self.engine.step(lr_kwargs=lr_kwargs)

    def weights(self) -> list[float]:
        """The model's parameters (whole on every rank: ZeRO stage 2 partitions only gradients
        and optimizer state)."""
        return [float(v) for p in self.engine.module.parameters() for v in p.detach().flatten()]


def ours(optimizer: torch.optim.Optimizer) -> DistributedReduceLROnPlateau:
    return DistributedReduceLROnPlateau(optimizer, factor=FACTOR, patience=PATIENCE)


class RecordedPlateau(ReduceLROnPlateau):
    """torch's own ``ReduceLROnPlateau``, recording the arguments of every ``step`` call."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(optimizer, factor=FACTOR, patience=PATIENCE)
        self.calls: list[list[Any]] = []

    def step(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        self.calls.append([list(args), kwargs])
        super().step(*args, **kwargs)


def deepspeed_version() -> str:
    import deepspeed

    return str(deepspeed.__version__)


# ------------------------------------------------------------------ scenarios


def engine_steps_ours(stage: int, gradient_accumulation_steps: int = 1) -> dict[str, Any]:
    """Ours handed to ``deepspeed.initialize``: the engine's first scheduler call raises."""
    run = Training(stage, ours, gradient_accumulation_steps)
    raised = None
    micro_steps = 0
    for _ in range(ENGINE_STEPS * gradient_accumulation_steps):
        micro_steps += 1
        try:
            run.train_step()
        except Exception as err:  # noqa: BLE001 - what the engine let through, reported
            raised = {"type": type(err).__name__, "message": str(err)}
            break
    return {"deepspeed_version": deepspeed_version(), "raised": raised, "raised_at_micro_step": micro_steps,
            "optimizer_steps": run.engine.global_steps, "lr": run.engine.get_lr(),
            "engine_scheduler_is_ours": run.engine_scheduler is run.scheduler,
            "plateau_steps": run.scheduler.last_epoch}


def engine_steps_torch(stage: int) -> dict[str, Any]:
    """torch's class handed to ``deepspeed.initialize``: what the engine calls, and the
    learning rate after each optimizer step (no validation at all)."""
    run = Training(stage, RecordedPlateau)
    lrs = []
    for _ in range(ENGINE_STEPS):
        run.train_step()
        lrs.append(run.engine.get_lr()[0])
    return {"deepspeed_version": deepspeed_version(), "calls": run.scheduler.calls, "lrs": lrs,
            "train_batch_size": run.engine.train_batch_size(), "optimizer_steps": run.engine.global_steps}


def engine_lr_kwargs_with_gradient_accumulation() -> dict[str, Any]:
    """Ours handed to ``deepspeed.initialize`` and a metric passed to every
    ``engine.step(lr_kwargs=...)``, with 2 micro-batches per optimizer step: after each
    micro-batch, the scheduler's step count and the global value it last stepped on."""
    run = Training(0, ours, gradient_accumulation_steps=2)
    seen = []
    for micro_step in range(ENGINE_STEPS):
        metric = float(10 * micro_step + run.rank)  # a new value on each rank at every micro-batch
        run.train_step(lr_kwargs={"metrics": metric, "weight": run.rank + 1})
        seen.append({"plateau_steps": run.scheduler.last_epoch, "metric": run.scheduler.last_global_metric,
                     "lr": run.engine.get_lr()[0]})
    return {"seen": seen, "optimizer_steps": run.engine.global_steps}


def validation_steps(run: Training, scheduler: DistributedReduceLROnPlateau, epochs: range) -> dict[str, Any]:
    """The documented pattern: ``scheduler``, built on the torch optimizer handed to
    ``deepspeed.initialize`` but kept out of it, stepped on every rank after each validation
    with this rank's mean validation loss and its number of samples."""
    world = torch.distributed.get_world_size()
    lrs, engine_lrs, metrics, weights_after_epoch = [], [], [], []
    for epoch in epochs:
        for _ in range(STEPS_PER_EPOCH):
            run.train_step()
        loss, samples = local_val_loss(epoch, run.rank, world)
        scheduler.step(loss, weight=samples)
        lrs.append(run.optimizer.param_groups[0]["lr"])
        engine_lrs.append(run.engine.get_lr()[0])
        metrics.append(scheduler.last_global_metric)
        weights_after_epoch.append(run.weights())
    return {"lrs": lrs, "engine_lrs": engine_lrs, "metrics": metrics, "weights_after_epoch": weights_after_epoch,
            "initial_weights": run.initial_weights, "optimizer_steps": run.engine.global_steps,
            "engine_optimizer": type(run.engine_optimizer).__name__, "plateau_steps": scheduler.last_epoch,
            "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "_last_lr"},
            "deepspeed_version": deepspeed_version()}


def checkpoint_resume(stage: int, out: Path) -> dict[str, Any]:
    """Save with ``engine.save_checkpoint(client_state={"scheduler": ...})`` after
    :data:`SAVE_AFTER` epochs; a fresh model, optimizer, scheduler and engine load it on every rank
    and train on."""
    directory = out / f"checkpoint-stage{stage}"
    first = Training(stage)
    scheduler = ours(first.optimizer)
    saved = validation_steps(first, scheduler, range(SAVE_AFTER))
    first.engine.save_checkpoint(str(directory), tag="resume",
                                 client_state={"scheduler": scheduler.state_dict(), "epoch": SAVE_AFTER})
    second = Training(stage)
    scheduler = ours(second.optimizer)
    _, client_state = second.engine.load_checkpoint(str(directory), tag="resume")
    lr_after_load = second.engine.get_lr()[0]
    scheduler.load_state_dict(client_state["scheduler"])
    resumed = validation_steps(second, scheduler, range(client_state["epoch"], EPOCHS))
    return {"saved": saved, "resumed": resumed, "lr_after_load": lr_after_load,
            "loaded_scheduler": {k: v for k, v in client_state["scheduler"].items() if k != "_last_lr"}}


def zero_optimizer_is_no_torch_optimizer() -> dict[str, Any]:
    """Why the scheduler is built on the torch optimizer: under ZeRO the engine returns a
    wrapper that torch's schedulers refuse."""
    run = Training(2)
    try:
        ours(run.engine_optimizer)
    except TypeError as err:
        return {"engine_optimizer": type(run.engine_optimizer).__name__, "refused_with": str(err)}
    return {"engine_optimizer": type(run.engine_optimizer).__name__, "refused_with": None}


def lightning_fit() -> dict[str, Any]:
    """``Trainer(strategy="deepspeed")`` on the CPU, with our scheduler in ``configure_optimizers``:
    the error Lightning raises, if any (Lightning 2.6.6 accepts the strategy on CUDA only)."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)

        def training_step(self, batch: Any, index: int) -> torch.Tensor:
            return self.layer(batch[0]).mean()

        def validation_step(self, batch: Any, index: int) -> None:
            self.log("val_loss", self.layer(batch[0]).mean(), sync_dist=True)

        def configure_optimizers(self) -> dict[str, Any]:
            optimizer = torch.optim.SGD(self.parameters(), lr=LR)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": ours(optimizer), "monitor": "val_loss"}}

    loader = DataLoader(TensorDataset(torch.rand(8, 3)), batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy="deepspeed", max_epochs=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    model = Model()
    try:
        trainer.fit(model, loader, loader)
    except Exception as err:  # noqa: BLE001 - the finding, reported
        return {"lightning_version": pl.__version__, "raised": f"{type(err).__name__}: {err}"}
    return {"lightning_version": pl.__version__, "raised": None,
            "plateau_steps": model.lr_schedulers().last_epoch}  # type: ignore[union-attr]


def scenario(name: str, out: Path) -> dict[str, Any]:
    if name == "engine_steps_ours_gradient_accumulation":
        return engine_steps_ours(0, gradient_accumulation_steps=2)
    if name == "engine_lr_kwargs_with_gradient_accumulation":
        return engine_lr_kwargs_with_gradient_accumulation()
    if name == "zero_optimizer_is_no_torch_optimizer":
        return zero_optimizer_is_no_torch_optimizer()
    kind, stage = name.rsplit("_stage", 1)
    if kind == "engine_steps_ours":
        return engine_steps_ours(int(stage))
    if kind == "engine_steps_torch":
        return engine_steps_torch(int(stage))
    if kind == "validation_steps":
        run = Training(int(stage))
        return validation_steps(run, ours(run.optimizer), range(EPOCHS))
    if kind == "checkpoint_resume":
        return checkpoint_resume(int(stage), out)
    raise ValueError(f"unknown scenario {name!r}")


def main(argv: list[str]) -> int:
    mode, out = argv[0], Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    if mode == "lightning":
        (out / "rank0.json").write_text(json.dumps({"lightning_fit": lightning_fit()}, indent=1))
        return 0
    if mode != "ranks":
        raise SystemExit(f"unknown mode {mode!r}: use 'ranks' or 'lightning'")
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    results: dict[str, Any] = {}
    for name in SCENARIOS:
        try:
            results[name] = scenario(name, out)
        except Exception:  # noqa: BLE001 - recorded for the test to show; the other scenarios still run
            results[name] = {"error": traceback.format_exc()}
        (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
