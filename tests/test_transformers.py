"""Hugging Face Transformers ``Trainer`` on two real CPU processes (gloo).

One launch runs every scenario of ``tests/transformers_checks.py``. Trainer steps the
scheduler passed in ``optimizers=(optimizer, scheduler)`` once per evaluation on the logged
``eval_loss``; each test compares what the processes observed with the exact mean over the
evaluation samples and with torch's ``ReduceLROnPlateau`` stepped in one process on the logged
values. Skipped when transformers is not installed.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from harness.launch import Launch, child_env, launch_log, rank_results, run, run_torch

from .transformers_checks import (
    EPOCHS,
    EVAL_TARGETS,
    LR,
    PADDING_CONFIGS,
    PADDING_WEIGHT,
    PROCESSES,
    RESUME_AFTER,
    SCENARIOS,
    SCHEDULER_KWARGS,
    STEPS_PER_EPOCH,
)

LAUNCH_TIMEOUT = 300
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                       reason="transformers is not installed: pip install '.[transformers]'"),
    pytest.mark.timeout(LAUNCH_TIMEOUT + 60),
]

CHECKS = str(Path(__file__).with_name("transformers_checks.py"))


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> Launch:
    """Every scenario, in one launch of 2 processes with torchrun's environment variables."""
    out = tmp_path_factory.mktemp("transformers")
    log = launch_log(run_torch, PROCESSES, [CHECKS, str(out)], timeout=LAUNCH_TIMEOUT)
    return Launch(rank_results(out, PROCESSES), log)


def sample_losses(w: float) -> list[float]:
    """Each evaluation sample's loss for weight ``w``, from the float32 values the model sees."""
    targets = torch.tensor(EVAL_TARGETS, dtype=torch.float32).tolist()
    return [(w - y) ** 2 for y in targets]


def exact_mean(w: float) -> float:
    losses = sample_losses(w)
    return sum(losses) / len(losses)


def torch_scheduler_lrs(metrics: list[float]) -> list[float]:
    """The learning rate after each step of torch's scheduler, one process, on ``metrics``."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    scheduler = ReduceLROnPlateau(optimizer, **SCHEDULER_KWARGS)
    lrs = []
    for metric in metrics:
        scheduler.step(metric)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_finished_on_every_process(two_processes: Launch, name: str) -> None:
    assert len(two_processes.outcome(name)) == PROCESSES


def test_trainer_steps_the_scheduler_once_per_evaluation(two_processes: Launch) -> None:
    for rank, run_ in enumerate(two_processes.outcome("uninterrupted")):
        assert run_["world_size"] == PROCESSES
        assert run_["scheduler_type"] == "DistributedReduceLROnPlateau"
        assert [e["epoch"] for e in run_["evaluations"]] == [float(e) for e in range(1, EPOCHS + 1)], f"rank {rank}"
        # last_epoch counts the parent's step() calls: one more after each evaluation, never two.
        assert [r["plateau_steps"] for r in run_["records"]] == list(range(1, EPOCHS + 1)), f"rank {rank}"
        assert run_["plateau_steps"] == EPOCHS


def test_each_step_is_on_that_evaluations_logged_eval_loss(two_processes: Launch) -> None:
    """Trainer hands every process the same, already global value; the mean over processes of
    identical values is that value, bit for bit."""
    for rank, run_ in enumerate(two_processes.outcome("uninterrupted")):
        logged = [e["eval_loss"] for e in run_["evaluations"]]
        assert [r["last_global_metric"] for r in run_["records"]] == logged, f"rank {rank}"
        assert [r["step"] for r in run_["records"]] == [e["step"] for e in run_["evaluations"]]


def test_logged_eval_loss_is_the_exact_mean_over_the_seven_samples(two_processes: Launch) -> None:
    """With per_device_eval_batch_size=1 the padded sample (process 1 repeats sample 0) is
    dropped by gather_for_metrics: eval_loss is the mean over the 7 samples, to float32 precision."""
    observed = two_processes.outcome("uninterrupted")
    for rank, run_ in enumerate(observed):
        for record, evaluation in zip(run_["records"], run_["evaluations"], strict=True):
            assert evaluation["eval_loss"] == pytest.approx(exact_mean(record["w"]), rel=1e-6), f"rank {rank}"
    assert observed[0]["evaluations"] == observed[1]["evaluations"]


def test_learning_rates_are_torchs_scheduler_on_the_logged_values_on_every_process(two_processes: Launch) -> None:
    observed = two_processes.outcome("uninterrupted")
    reference = torch_scheduler_lrs([e["eval_loss"] for e in observed[0]["evaluations"]])
    assert len(set(reference)) >= 3, f"the scenario should cut the learning rate at least twice: {reference}"
    for rank, run_ in enumerate(observed):
        assert [r["lr"] for r in run_["records"]] == reference, f"rank {rank}"
    assert [r["state"] for r in observed[0]["records"]] == [r["state"] for r in observed[1]["records"]]


def test_resume_from_checkpoint_continues_exactly(two_processes: Launch) -> None:
    uninterrupted = two_processes.outcome("uninterrupted")
    for rank, resumed in enumerate(two_processes.outcome("resumed")):
        expected = uninterrupted[rank]["records"]
        assert resumed["saved_state"] == expected[RESUME_AFTER - 1]["state"], f"rank {rank}"
        # Step for step: learning rate, scheduler state, the value stepped on, the model's weight.
        assert resumed["records"] == expected[RESUME_AFTER:], f"rank {rank}"
        assert resumed["evaluations"] == uninterrupted[rank]["evaluations"], f"rank {rank}"
        assert resumed["plateau_steps"] == EPOCHS


#: The padding configurations in which no evaluation batch mixes a real sample with a repeat:
#: the evaluation set's size is a multiple of the batch size, or the shards are not padded.
EXACT_CONFIGS = ("batch_1", "batch_7", "batch_2_even_batches_false")


def trainer_eval_loss(batches: list[list[list[float]]], batch_size: int) -> float:
    """What Trainer.evaluation_loop computes from the batches each process evaluated: each
    batch's mean loss repeated batch_size times and gathered across processes batch by batch,
    the last gather cut to len(dataset) % (batch_size * processes) by gather_for_metrics; then
    the mean of all that."""
    assert len({len(per_process) for per_process in batches}) == 1, "every process gathers once per batch"
    rows = []
    for step in range(len(batches[0])):
        row = []
        for per_process in batches:
            losses = [(PADDING_WEIGHT - y) ** 2 for y in per_process[step]]
            row += [sum(losses) / len(losses)] * batch_size
        rows.append(row)
    remainder = len(EVAL_TARGETS) % (batch_size * len(batches))
    if remainder:
        rows[-1] = rows[-1][:remainder]
    gathered = [value for row in rows for value in row]
    return sum(gathered) / len(gathered)


@pytest.mark.parametrize("config", list(PADDING_CONFIGS))
def test_eval_loss_with_padded_evaluation_batches(two_processes: Launch, config: str) -> None:
    """eval_loss is the exact mean over the samples only when no evaluation batch mixes a real
    sample with a repeat (EXACT_CONFIGS). At w=0.5 the exact mean is 0.35/7 = 0.05; with batch
    size 2 the padded batch (samples 6 and 0) counts as one sample: 0.29/7; with the default
    batch size 8 only process 0's batch (all 7 samples and sample 0 again) is kept: 0.39/8."""
    observed = [rank[config] for rank in two_processes.outcome("eval_loss_padding")]
    batch_size = PADDING_CONFIGS[config].get("per_device_eval_batch_size", 8)
    batches = [rank["batches"] for rank in observed]
    seen = [y for per_process in batches for batch in per_process for y in batch]
    targets = torch.tensor(EVAL_TARGETS, dtype=torch.float32).tolist()
    assert sorted(set(seen)) == targets  # every sample evaluated ...
    even_batches = PADDING_CONFIGS[config].get("accelerator_config", {}).get("even_batches", True)
    assert (len(seen) > len(targets)) == even_batches  # ... and some twice when the shards are padded
    logged = {rank["eval_loss"] for rank in observed}
    assert len(logged) == 1, "every process logs the same eval_loss"
    eval_loss = logged.pop()
    assert eval_loss == pytest.approx(trainer_eval_loss(batches, batch_size), rel=1e-6)
    if config in EXACT_CONFIGS:
        assert eval_loss == pytest.approx(exact_mean(PADDING_WEIGHT), rel=1e-6)
    else:
        assert not math.isclose(eval_loss, exact_mean(PADDING_WEIGHT), rel_tol=1e-3)


def test_default_training_arguments_fail_at_the_first_evaluation_after_an_epoch(two_processes: Launch) -> None:
    """What the check saves users from (if this fails, Trainer changed: update the guide)."""
    for result in two_processes.outcome("default_arguments"):
        assert (result["error_type"], result["error_message"]) == (
            "AttributeError", "'NoneType' object has no attribute 'startswith'")
        assert result["global_step"] == STEPS_PER_EPOCH and result["evaluations"] == 1
        assert result["plateau_steps"] == 0


def test_without_evaluation_trainer_never_steps_the_scheduler(two_processes: Launch) -> None:
    for result in two_processes.outcome("no_evaluation"):
        assert result["error_type"] is None
        assert result["global_step"] == 2 * STEPS_PER_EPOCH
        assert result["plateau_steps"] == 0 and result["evaluations"] == 0


@pytest.mark.parametrize(("name", "phrase"), [
    ("default_arguments_checked", "Pass metric_for_best_model='loss'"),
    ("greater_is_better_contradicts_mode_checked", "pass mode='max' to DistributedReduceLROnPlateau"),
    ("no_evaluation_checked", "Pass eval_strategy='epoch'"),
])
def test_check_raises_on_every_process_before_the_first_step(two_processes: Launch, name: str, phrase: str) -> None:
    observed = two_processes.outcome(name)
    for result in observed:
        assert result["error_type"] == "ValueError"
        assert phrase in result["error_message"]
        assert result["global_step"] == 0 and result["evaluations"] == 0 and result["plateau_steps"] == 0
    assert len({result["error_message"] for result in observed}) == 1


@pytest.mark.parametrize(("arguments", "mode"), [
    ({"metric_for_best_model": "loss"}, "min"),  # greater_is_better derived: False
    ({"metric_for_best_model": "accuracy"}, "max"),  # greater_is_better derived: True
    ({"metric_for_best_model": "eval_accuracy", "greater_is_better": False}, "min"),
])
def test_check_accepts_arguments_that_agree_with_the_scheduler(arguments: dict[str, Any], mode: str) -> None:
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from distplateau import DistributedReduceLROnPlateau
    from distplateau.transformers import PlateauArgumentsCheck

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    args = TrainingArguments("unused", eval_strategy="epoch", report_to="none", **arguments)
    for scheduler in (DistributedReduceLROnPlateau(optimizer, mode=mode), ReduceLROnPlateau(optimizer, mode=mode)):
        PlateauArgumentsCheck().on_train_begin(args, TrainerState(), TrainerControl(), lr_scheduler=scheduler)


def test_check_ignores_other_schedulers() -> None:
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from distplateau.transformers import PlateauArgumentsCheck

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer)
    args = TrainingArguments("unused", report_to="none")  # metric_for_best_model=None, eval_strategy="no"
    PlateauArgumentsCheck().on_train_begin(args, TrainerState(), TrainerControl(), lr_scheduler=scheduler)


def test_import_distplateau_does_not_import_transformers() -> None:
    code = "import sys, distplateau; print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))"
    result = run([sys.executable, "-c", code], 120, child_env())
    assert result.returncode == 0, result.stdout
    assert result.stdout.strip() == "[]"
