"""Hugging Face Accelerate scenarios on real processes, many per launch.

``accelerate launch --multi_gpu --num_processes 2 tests/accelerate_checks.py ranks OUT_DIR``
runs every scenario of :data:`SCENARIOS` on 2 processes (``Accelerator(cpu=True)``: gloo);
``python tests/accelerate_checks.py resume OUT_DIR CHECKPOINT`` resumes the 2-process run's
``accelerator.save_state`` checkpoint in one process. Each process writes
``OUT_DIR/rank{r}.json``: scenario name -> what it observed, or ``{"error": traceback}``.
``tests/test_accelerate.py`` compares that with torch's ``ReduceLROnPlateau`` stepped once per
evaluation on the exact global mean.

Every scenario is the code users write: ``accelerator.prepare(model, optimizer, scheduler)``,
:data:`TRAIN_BATCHES` training batches under ``accelerator.accumulate(model)``, then one
``scheduler.step(val_loss, weight=n)`` per evaluation. The validation losses are scripted
per sample (:func:`validation_losses`) on uneven shards so that the global mean is known
exactly and a mean of the per-rank means would take other decisions. Importing this module
does nothing: Accelerate is imported by :func:`main` only.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from distplateau import DistributedReduceLROnPlateau

#: Accelerator settings under test, by name: each one changes what AcceleratedScheduler does.
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "split_batches": {"split_batches": True},
    "step_scheduler_with_optimizer_false": {"step_scheduler_with_optimizer": False},
    "gradient_accumulation": {"gradient_accumulation_steps": 2},
}
#: What the test module parametrizes over; each name is one scenario of the 2-process launch.
SCENARIOS: tuple[str, ...] = (
    *(f"ours_{config}" for config in CONFIGS),
    *(f"naive_{config}" for config in CONFIGS),
    "save_and_load_state",
    "save_and_load_state_registered_for_checkpointing",
    "prepare_returns_ours_unwrapped",
    "accelerated_scheduler_wrapper_is_refused",
    "prepared_validation_loader",
)

LR = 0.1
SCHEDULER_KWARGS: dict[str, Any] = {"factor": 0.5, "patience": 1}
# 3 batches per evaluation with gradient_accumulation_steps=2: every other evaluation comes
# between two gradient-sync points, where AcceleratedScheduler skips the step.
TRAIN_BATCHES = 3
#: The global mean of the validation loss at each evaluation; its plateaus drive the schedule.
GLOBAL_MEANS = (1.0, 0.8, 0.85, 0.9, 0.7, 0.75)
# Per evaluation, how far the two ranks' local means move apart while the global mean stays
# put: the mean of the local means is GLOBAL_MEANS + DRIFT, whose plateaus fall elsewhere.
DRIFT = (0.0, 0.1, -0.1, 0.0, 0.1, 0.0)
SHARD_SIZES = (3, 5)  # uneven: rank 0 validates 3 samples, rank 1 five
SAVE_AFTER = 3  # save_and_load_state saves after this many evaluations


def validation_losses(rank: int, evaluation: int) -> list[float]:
    """Rank ``rank``'s per-sample validation losses at ``evaluation`` (0-based): rank 0's mean is
    ``g + 5 d`` and rank 1's ``g - 3 d``, so that the sample-weighted mean is exactly ``g``."""
    g, d = GLOBAL_MEANS[evaluation], DRIFT[evaluation]
    local_mean = g + 5 * d if rank == 0 else g - 3 * d
    spread = [0.1 * (i - (SHARD_SIZES[rank] - 1) / 2) for i in range(SHARD_SIZES[rank])]
    return [local_mean + s for s in spread]


def train_batch(rank: int, evaluation: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * rank + 10 * evaluation + batch)
    x = torch.rand(4, 3, generator=gen)
    return x, x @ torch.tensor([1.0, -2.0, 0.5]) + 0.25


def run(config: str, scheduler_class: type[ReduceLROnPlateau], evaluations: range, *, prepare_scheduler: bool = True,
        after_prepare: Callable[[Any, Any], None] | None = None,
        after_evaluation: Callable[[Any, int], None] | None = None) -> dict[str, Any]:
    """The natural training loop; returns what one process observed."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    settings = dict(CONFIGS[config])
    split_batches = settings.pop("split_batches", False)
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(split_batches=split_batches),
                              **settings)
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scheduler = scheduler_class(optimizer, **SCHEDULER_KWARGS)
    if prepare_scheduler:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    else:  # the way out that refuse_wrapper's error names
        model, optimizer = accelerator.prepare(model, optimizer)
        accelerator.register_for_checkpointing(scheduler)
    if after_prepare is not None:
        after_prepare(accelerator, scheduler)
    lrs, synced = [], []
    for evaluation in evaluations:
        for batch in range(TRAIN_BATCHES):
            with accelerator.accumulate(model):
                x, y = train_batch(rank, evaluation, batch)
                accelerator.backward(torch.nn.functional.mse_loss(model(x).squeeze(-1), y))
                optimizer.step()
                optimizer.zero_grad()
        # One process stands for the whole job: it validates every rank's shard.
        shards = [rank] if world > 1 else range(len(SHARD_SIZES))
        losses = torch.tensor([v for r in shards for v in validation_losses(r, evaluation)], dtype=torch.float64)
        if isinstance(scheduler, DistributedReduceLROnPlateau):
            scheduler.step(losses.mean(), weight=len(losses))
        else:
            scheduler.step(losses.mean())
        lrs.append(optimizer.param_groups[0]["lr"])
        synced.append(accelerator.sync_gradients)
        if after_evaluation is not None:
            after_evaluation(accelerator, evaluation)
    plateau = getattr(scheduler, "scheduler", scheduler)  # the scheduler inside AcceleratedScheduler
    return {"lrs": lrs, "plateau_steps": plateau.last_epoch,
            "sync_gradients_at_evaluation": synced, "prepared_type": type(scheduler).__name__,
            "num_processes": world, "last_global_metric": getattr(scheduler, "last_global_metric", None),
            "state": plateau.state_dict()}


def save_and_load_state(out: Path, prepare_scheduler: bool = True) -> dict[str, Any]:
    """Save after :data:`SAVE_AFTER` evaluations and go on (the uninterrupted run); then a fresh
    Accelerator, model, optimizer and scheduler load the checkpoint and do the remaining ones."""
    checkpoint = out / ("checkpoint" if prepare_scheduler else "checkpoint-registered")

    def save(accelerator: Any, evaluation: int) -> None:
        if evaluation == SAVE_AFTER - 1:
            accelerator.save_state(str(checkpoint))
            accelerator.wait_for_everyone()

    uninterrupted = run("default", DistributedReduceLROnPlateau, range(len(GLOBAL_MEANS)), after_evaluation=save,
                        prepare_scheduler=prepare_scheduler)
    # Accelerate writes the state with torch.save; ours holds plain values only.
    saved = torch.load(checkpoint / ("scheduler.bin" if prepare_scheduler else "custom_checkpoint_0.pkl"),
                       weights_only=True)
    resumed = resume(checkpoint, "default", prepare_scheduler)
    return {"uninterrupted": uninterrupted, "resumed": resumed, "saved_state": saved,
            "checkpoint": str(checkpoint)}


def resume(checkpoint: Path, config: str, prepare_scheduler: bool = True) -> dict[str, Any]:
    loaded: dict[str, Any] = {}

    def load(accelerator: Any, scheduler: Any) -> None:
        accelerator.load_state(str(checkpoint))
        loaded.update(scheduler.state_dict())

    result = run(config, DistributedReduceLROnPlateau, range(SAVE_AFTER, len(GLOBAL_MEANS)), after_prepare=load,
                 prepare_scheduler=prepare_scheduler)
    return {**result, "loaded_state": loaded}


def prepare_returns_ours_unwrapped() -> dict[str, Any]:
    """What distplateau/_accelerate.py relies on: prepare() hands our scheduler back as it is
    and still registers it for save_state()/load_state()."""
    import accelerate
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(torch.nn.Linear(3, 1).parameters(), lr=LR)
    scheduler = DistributedReduceLROnPlateau(optimizer, **SCHEDULER_KWARGS)
    prepared = accelerator.prepare(scheduler)
    return {"accelerate_version": accelerate.__version__, "returned_unwrapped": prepared is scheduler,
            "prepared_type": type(prepared).__name__,
            "registered_for_save_state": any(s is scheduler for s in accelerator._schedulers),
            "state_dict_keys": sorted(scheduler.state_dict())}


def accelerated_scheduler_wrapper_is_refused() -> dict[str, Any]:
    """Should Accelerate wrap our scheduler after all, its step() raises on every rank (before
    the collective) instead of stepping once per process."""
    from accelerate.scheduler import AcceleratedScheduler

    optimizer = torch.optim.SGD(torch.nn.Linear(3, 1).parameters(), lr=LR)
    scheduler = DistributedReduceLROnPlateau(optimizer, **SCHEDULER_KWARGS)
    wrapped = AcceleratedScheduler(scheduler, optimizer, step_with_optimizer=False)
    try:
        wrapped.step(1.0, weight=1)
    except RuntimeError as err:
        return {"error_message": str(err), "plateau_steps": scheduler.last_epoch}
    return {"error_message": None, "plateau_steps": scheduler.last_epoch}


VALIDATION_LOSSES = tuple(float(i) for i in range(7))  # 7 samples on 2 processes; exact mean 3.0


def prepared_validation_loader() -> dict[str, Any]:
    """Validation through ``accelerator.prepare(DataLoader)``, with Accelerate's default
    ``even_batches=True`` (shards padded with samples from the start) and with ``False``: what
    each process sees and the global metric ``step(mean, weight=count)`` steps on."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration
    from torch.utils.data import DataLoader

    observed = {}
    for even_batches in (True, False):
        accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(even_batches=even_batches))
        loader = accelerator.prepare(DataLoader(torch.tensor(VALIDATION_LOSSES, dtype=torch.float64), batch_size=2))
        optimizer = torch.optim.SGD(torch.nn.Linear(3, 1).parameters(), lr=LR)
        scheduler = accelerator.prepare(DistributedReduceLROnPlateau(optimizer, **SCHEDULER_KWARGS))
        samples = [float(loss) for batch in loader for loss in batch]
        scheduler.step(sum(samples) / len(samples), weight=len(samples))
        observed[f"even_batches={even_batches}"] = {"samples": samples,
                                                    "global_metric": scheduler.last_global_metric}
    return observed


def scenario(name: str, out: Path) -> dict[str, Any]:
    if name == "save_and_load_state":
        return save_and_load_state(out)
    if name == "save_and_load_state_registered_for_checkpointing":
        return save_and_load_state(out, prepare_scheduler=False)
    if name == "prepare_returns_ours_unwrapped":
        return prepare_returns_ours_unwrapped()
    if name == "accelerated_scheduler_wrapper_is_refused":
        return accelerated_scheduler_wrapper_is_refused()
    if name == "prepared_validation_loader":
        return prepared_validation_loader()
    kind, config = name.split("_", 1)
    scheduler_class = DistributedReduceLROnPlateau if kind == "ours" else ReduceLROnPlateau
    return run(config, scheduler_class, range(len(GLOBAL_MEANS)))


def main(argv: list[str]) -> int:
    mode, out = argv[0], Path(argv[1])
    from accelerate import PartialState

    out.mkdir(parents=True, exist_ok=True)
    rank = PartialState(cpu=True).process_index
    results: dict[str, Any] = {}
    if mode == "ranks":
        names: tuple[str, ...] = SCENARIOS
    elif mode == "resume":
        names = ("resume_in_one_process",)
    else:
        raise SystemExit(f"unknown mode {mode!r}: use 'ranks' or 'resume'")
    for name in names:
        try:
            if name == "resume_in_one_process":
                results[name] = resume(Path(argv[2]), "default")
            else:
                results[name] = scenario(name, out)
        except Exception:  # recorded for the test to show; the other scenarios still run
            results[name] = {"error": traceback.format_exc()}
        (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
