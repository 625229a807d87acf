"""Hugging Face Transformers ``Trainer`` on two real processes, many scenarios per launch.

``python tests/transformers_checks.py OUT_DIR``, started on 2 processes with torchrun's
environment variables (``harness.launch.run_torch``), runs every scenario of :data:`SCENARIOS`;
each process writes ``OUT_DIR/rank{r}.json``: scenario name -> what it observed, or
``{"error": traceback}``. ``tests/test_transformers.py`` compares that with torch's
``ReduceLROnPlateau`` stepped in one process on the logged ``eval_loss`` values, and with the
exact mean over the evaluation samples computed from the model's weight.

Every run is the code users write: ``Trainer(model, args, optimizers=(optimizer,
DistributedReduceLROnPlateau(optimizer, ...)))`` with ``eval_strategy="epoch"``; Trainer steps
the scheduler itself. The model has one weight ``w``; the training targets pull it towards
:data:`TRAIN_MEAN` while the evaluation targets centre on :data:`EVAL_MEAN`, so the evaluation
loss falls, then rises as ``w`` overshoots, and the plateau logic cuts the learning rate
several times. The :data:`EVAL_SIZE` evaluation samples do not split evenly over 2 processes.
Importing this module does nothing: transformers is imported by :func:`main` only.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from distplateau import DistributedReduceLROnPlateau

#: What the test module parametrizes over, in the order they run.
SCENARIOS: tuple[str, ...] = (
    "uninterrupted",
    "resumed",
    "eval_loss_padding",
    "default_arguments",
    "default_arguments_checked",
    "greater_is_better_contradicts_mode_checked",
    "no_evaluation",
    "no_evaluation_checked",
)

LR = 0.1
SCHEDULER_KWARGS: dict[str, Any] = {"mode": "min", "factor": 0.5, "patience": 1}
EPOCHS = 8
RESUME_AFTER = 3  # "resumed" continues from the checkpoint saved after this many epochs
PROCESSES = 2
TRAIN_BATCH = 2  # per process
TRAIN_TARGETS = tuple(0.9 + 0.025 * i for i in range(8))
STEPS_PER_EPOCH = len(TRAIN_TARGETS) // (TRAIN_BATCH * PROCESSES)
TRAIN_MEAN = sum(TRAIN_TARGETS) / len(TRAIN_TARGETS)
EVAL_SIZE = 7  # not divisible by the 2 processes
EVAL_TARGETS = tuple(0.3 + 0.1 * i for i in range(EVAL_SIZE))  # distinct: a repeated sample shows in the mean
EVAL_MEAN = sum(EVAL_TARGETS) / EVAL_SIZE
#: eval_loss_padding: per_device_eval_batch_size and Accelerate's even_batches, by name. Left out:
#: even_batches=False where the processes would run different numbers of evaluation batches
#: (batch size 1, 7 or 8 here), since Trainer gathers every batch's loss.
PADDING_CONFIGS: dict[str, dict[str, Any]] = {
    "batch_1": {"per_device_eval_batch_size": 1},
    "batch_2": {"per_device_eval_batch_size": 2},
    "batch_7": {"per_device_eval_batch_size": 7},
    "batch_8_default": {},
    "batch_2_even_batches_false": {"per_device_eval_batch_size": 2,
                                   "accelerator_config": {"even_batches": False}},
}
PADDING_WEIGHT = 0.5  # the model's weight during eval_loss_padding


class OneWeight(torch.nn.Module):
    """A model Trainer accepts: ``forward(x, labels)`` returns ``{"loss": mean squared error}``.
    In evaluation it also notes the labels of each batch it sees (which samples this process
    evaluated, repeats included)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.evaluated: list[list[float]] = []

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.training:
            self.evaluated.append(labels.tolist())
        return {"loss": ((self.w * x - labels) ** 2).mean()}


def dataset(targets: tuple[float, ...]) -> list[dict[str, torch.Tensor]]:
    return [{"x": torch.tensor(1.0), "labels": torch.tensor(y)} for y in targets]


def make_trainer(out: Path, *, check: bool = True, **arguments: Any) -> Any:
    """A Trainer as users build it, with our scheduler in ``optimizers``; ``arguments`` override
    the :class:`TrainingArguments` below (``None`` removes one, back to its default)."""
    from transformers import Trainer, TrainingArguments

    from distplateau.transformers import PlateauArgumentsCheck

    settings: dict[str, Any] = {
        "output_dir": str(out), "num_train_epochs": EPOCHS, "per_device_train_batch_size": TRAIN_BATCH,
        "per_device_eval_batch_size": 1, "eval_strategy": "epoch", "save_strategy": "no",
        "metric_for_best_model": "loss", "logging_strategy": "epoch", "report_to": "none",
        "disable_tqdm": True, "use_cpu": True, "seed": 0, "ddp_find_unused_parameters": False,
    }
    settings.update(arguments)
    settings = {key: value for key, value in settings.items() if value is not None}
    model = OneWeight()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scheduler = DistributedReduceLROnPlateau(optimizer, **SCHEDULER_KWARGS)
    return Trainer(model=model, args=TrainingArguments(**settings), train_dataset=dataset(TRAIN_TARGETS),
                   eval_dataset=dataset(EVAL_TARGETS), optimizers=(optimizer, scheduler),
                   callbacks=[PlateauArgumentsCheck()] if check else [])


def after_each_save(trainer: Any) -> list[dict[str, Any]]:
    """Record the scheduler after each plateau step: Trainer saves (``save_strategy="epoch"``)
    right after it steps the scheduler on the evaluation's metric (``_maybe_log_save_evaluate``)."""
    from transformers import TrainerCallback

    records: list[dict[str, Any]] = []
    scheduler = trainer.lr_scheduler

    class Record(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            records.append({"epoch": state.epoch, "step": state.global_step,
                            "lr": scheduler.optimizer.param_groups[0]["lr"],
                            "last_global_metric": scheduler.last_global_metric,
                            "plateau_steps": scheduler.last_epoch, "state": scheduler.state_dict(),
                            "w": kwargs["model"].w.item()})

    trainer.add_callback(Record())
    return records


def evaluations(trainer: Any) -> list[dict[str, Any]]:
    """The evaluation entries of ``trainer.state.log_history``."""
    return [{"epoch": e["epoch"], "step": e["step"], "eval_loss": e["eval_loss"]}
            for e in trainer.state.log_history if "eval_loss" in e]


def train_and_record(trainer: Any, resume_from: Path | None = None) -> dict[str, Any]:
    records = after_each_save(trainer)
    start = time.monotonic()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return {"records": records, "evaluations": evaluations(trainer), "train_s": time.monotonic() - start,
            "plateau_steps": trainer.lr_scheduler.last_epoch,
            "scheduler_type": type(trainer.lr_scheduler).__name__,
            "world_size": trainer.args.world_size}


def uninterrupted(out: Path) -> dict[str, Any]:
    return train_and_record(make_trainer(out / "uninterrupted", save_strategy="epoch"))


def resumed(out: Path) -> dict[str, Any]:
    """A fresh Trainer, model, optimizer and scheduler resume from the uninterrupted run's
    checkpoint saved after :data:`RESUME_AFTER` epochs."""
    checkpoint = out / "uninterrupted" / f"checkpoint-{RESUME_AFTER * STEPS_PER_EPOCH}"
    saved = torch.load(checkpoint / "scheduler.pt", weights_only=True)  # plain values only
    result = train_and_record(make_trainer(out / "resumed", save_strategy="epoch"), resume_from=checkpoint)
    return {**result, "saved_state": saved}


def eval_loss_padding(out: Path) -> dict[str, Any]:
    """``trainer.evaluate()`` with a fixed weight, per :data:`PADDING_CONFIGS`: the logged
    ``eval_loss`` and the labels of the batches this process evaluated."""
    observed = {}
    for name, arguments in PADDING_CONFIGS.items():
        trainer = make_trainer(out / f"padding-{name}", **{"per_device_eval_batch_size": None, **arguments})
        with torch.no_grad():
            trainer.model.w.fill_(PADDING_WEIGHT)
        metrics = trainer.evaluate()
        observed[name] = {"eval_loss": metrics["eval_loss"], "batches": trainer.model.evaluated,
                          "w": trainer.model.w.item()}
    return observed


def failing_run(trainer: Any) -> dict[str, Any]:
    """Train until it fails: the error, and how far training got."""
    error: Exception | None = None
    try:
        trainer.train()
    except Exception as err:  # what the test looks at
        error = err
    return {"error_type": type(error).__name__ if error else None, "error_message": str(error) if error else None,
            "global_step": trainer.state.global_step, "plateau_steps": trainer.lr_scheduler.last_epoch,
            "evaluations": len(evaluations(trainer))}


def scenario(name: str, out: Path) -> dict[str, Any]:
    if name == "uninterrupted":
        return uninterrupted(out)
    if name == "resumed":
        return resumed(out)
    if name == "eval_loss_padding":
        return eval_loss_padding(out)
    checked = name.endswith("_checked")
    if name.startswith("default_arguments"):  # TrainingArguments' defaults: metric_for_best_model=None
        return failing_run(make_trainer(out / name, check=checked, num_train_epochs=2, metric_for_best_model=None))
    if name == "greater_is_better_contradicts_mode_checked":  # greater_is_better derived: True
        return failing_run(make_trainer(out / name, metric_for_best_model="accuracy"))
    if name.startswith("no_evaluation"):  # TrainingArguments' default eval_strategy="no"
        return failing_run(make_trainer(out / name, check=checked, num_train_epochs=2, eval_strategy=None))
    raise ValueError(f"unknown scenario {name!r}")


def main(argv: list[str]) -> int:
    import transformers

    transformers.logging.set_verbosity_error()
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ["RANK"])
    results: dict[str, Any] = {"versions": {"transformers": transformers.__version__}}
    for name in SCENARIOS:
        start = time.monotonic()
        try:
            results[name] = scenario(name, out)
        except Exception:  # recorded for the test to show; the other scenarios still run
            results[name] = {"error": traceback.format_exc()}
        results[name]["wall_s"] = time.monotonic() - start
        (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
