"""Hugging Face Accelerate on two real processes (``accelerate launch``, CPU, gloo).

One launch runs every scenario of ``tests/accelerate_checks.py``; a second, one process, resumes
its ``save_state`` checkpoint. Each test compares what the processes observed in one scenario
with torch's ``ReduceLROnPlateau`` stepped once per evaluation on the exact global mean.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from distplateau._accelerate import PREPARED_MARK
from harness.launch import Launch, child_env, free_port, launch_log, rank_results, run

from .accelerate_checks import (
    CONFIGS,
    GLOBAL_MEANS,
    LR,
    SAVE_AFTER,
    SCENARIOS,
    SCHEDULER_KWARGS,
    SHARD_SIZES,
    VALIDATION_LOSSES,
    validation_losses,
)

pytestmark = pytest.mark.timeout(2 * 300 + 60)  # the fixtures' two launches, LAUNCH_TIMEOUT each

CHECKS = str(Path(__file__).with_name("accelerate_checks.py"))
LAUNCH_TIMEOUT = 300
PROCESSES = 2


def _launch(cmd: list[str], out: Path, processes: int) -> Launch:
    if importlib.util.find_spec("accelerate") is None:
        pytest.fail("Accelerate is not installed: pip install '.[accelerate]'")
    log = launch_log(run, cmd, timeout=LAUNCH_TIMEOUT, env=child_env())
    return Launch(rank_results(out, processes), log)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> Launch:
    """Every scenario, one ``accelerate launch`` of 2 CPU processes. ``--multi_gpu`` picks
    Accelerate's torchrun launcher; ``--cpu`` would pick its single-process one."""
    out = tmp_path_factory.mktemp("accelerate")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(PROCESSES),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), CHECKS, "ranks", str(out)]
    return _launch(cmd, out, PROCESSES)


@pytest.fixture(scope="module")
def one_process_resume(two_processes: Launch, tmp_path_factory: pytest.TempPathFactory) -> Launch:
    """The 2-process run's checkpoint, loaded by ``accelerator.load_state`` in one process."""
    saved = two_processes.results.get("save_and_load_state", [None])[0] or {}
    checkpoint = saved.get("checkpoint", "missing")
    out = tmp_path_factory.mktemp("accelerate-resume")
    return _launch([sys.executable, CHECKS, "resume", str(out), checkpoint], out, 1)


def reference(evaluations: range = range(len(GLOBAL_MEANS))) -> list[float]:
    """The learning rate after each evaluation of one process that steps torch's own scheduler
    once per evaluation on the mean over every rank's validation samples."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    scheduler = ReduceLROnPlateau(optimizer, **SCHEDULER_KWARGS)
    lrs = []
    for evaluation in range(evaluations.stop):
        samples = [v for rank in range(len(SHARD_SIZES)) for v in validation_losses(rank, evaluation)]
        scheduler.step(sum(samples) / len(samples))
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs[evaluations.start:]


def test_the_scripted_validation_losses_have_the_global_means_and_a_misleading_mean_of_means() -> None:
    """Keeps the scenarios meaningful: a mean of the per-rank means would cut the learning rate
    at another evaluation than the sample-weighted global mean."""
    for evaluation, mean in enumerate(GLOBAL_MEANS):
        samples = [v for rank in range(len(SHARD_SIZES)) for v in validation_losses(rank, evaluation)]
        assert sum(samples) / len(samples) == pytest.approx(mean, abs=1e-12)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    scheduler = ReduceLROnPlateau(optimizer, **SCHEDULER_KWARGS)
    lrs = []
    for evaluation in range(len(GLOBAL_MEANS)):
        shards = [validation_losses(rank, evaluation) for rank in range(len(SHARD_SIZES))]
        scheduler.step(sum(sum(shard) / len(shard) for shard in shards) / len(shards))
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs != reference()
    assert reference() == [0.1, 0.1, 0.1, 0.05, 0.05, 0.05]


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_finished_on_every_process(two_processes: Launch, name: str) -> None:
    assert len(two_processes.outcome(name)) == PROCESSES


@pytest.mark.parametrize("config", list(CONFIGS))
def test_prepared_scheduler_steps_once_per_evaluation_on_the_global_mean(two_processes: Launch, config: str) -> None:
    observed = two_processes.outcome(f"ours_{config}")
    evaluations = len(GLOBAL_MEANS)
    for rank, result in enumerate(observed):
        assert result["num_processes"] == PROCESSES
        assert result["prepared_type"] == "DistributedReduceLROnPlateau"
        # One step() per evaluation, each exactly one collective: last_epoch counts them.
        assert result["plateau_steps"] == evaluations, f"rank {rank}"
        assert result["lrs"] == reference(), f"rank {rank}"
        assert result["last_global_metric"] == pytest.approx(GLOBAL_MEANS[-1], abs=1e-12)
    assert observed[0]["state"] == observed[1]["state"]


def test_gradient_accumulation_scenario_evaluates_between_sync_points(two_processes: Launch) -> None:
    """Half the evaluations come while gradients are accumulating: there AcceleratedScheduler
    would skip the step."""
    for result in two_processes.outcome("ours_gradient_accumulation"):
        assert result["sync_gradients_at_evaluation"] == [False, True] * (len(GLOBAL_MEANS) // 2)


#: How many times AcceleratedScheduler.step() calls the scheduler's step() at each evaluation, as
#: read in accelerate/scheduler.py: num_processes times by default, once with split_batches or
#: without step_scheduler_with_optimizer, never between gradient-sync points (every other
#: evaluation with gradient_accumulation_steps=2, see the test above).
WRAPPER_CALLS = {
    "default": [PROCESSES] * len(GLOBAL_MEANS),
    "split_batches": [1] * len(GLOBAL_MEANS),
    "step_scheduler_with_optimizer_false": [1] * len(GLOBAL_MEANS),
    "gradient_accumulation": [0, PROCESSES] * (len(GLOBAL_MEANS) // 2),
}


def wrapped_torch_scheduler(rank: int, calls: list[int]) -> list[float]:
    """The learning rates of torch's scheduler on process ``rank``'s own validation loss,
    stepped ``calls[e]`` times at evaluation ``e``."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    scheduler = ReduceLROnPlateau(optimizer, **SCHEDULER_KWARGS)
    lrs = []
    for evaluation, repeat in enumerate(calls):
        losses = validation_losses(rank, evaluation)
        for _ in range(repeat):
            scheduler.step(sum(losses) / len(losses))
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("config", list(CONFIGS))
def test_torch_scheduler_through_prepare_steps_as_documented(two_processes: Launch, config: str) -> None:
    """What docs/guides/accelerate.md says torch's own ReduceLROnPlateau does once prepared: it
    is stepped WRAPPER_CALLS times per evaluation, each process on its own shard's loss, and the
    processes' learning rates diverge. If this fails, Accelerate changed: update the guide's table."""
    calls = WRAPPER_CALLS[config]
    observed = two_processes.outcome(f"naive_{config}")
    for rank, result in enumerate(observed):
        assert result["prepared_type"] == "AcceleratedScheduler"
        assert result["plateau_steps"] == sum(calls), (
            f"accelerate {_version(two_processes)}: a prepared torch ReduceLROnPlateau made "
            f"{result['plateau_steps']} steps for {len(calls)} evaluations under {config}, not {sum(calls)}"
        )
        assert result["lrs"] == wrapped_torch_scheduler(rank, calls), f"rank {rank}"
    assert observed[0]["lrs"] != observed[1]["lrs"], "the processes' learning rates were expected to diverge"


@pytest.mark.parametrize("name", ["save_and_load_state", "save_and_load_state_registered_for_checkpointing"])
def test_save_state_and_load_state_resume_as_the_uninterrupted_run(two_processes: Launch, name: str) -> None:
    """Through prepare(), and kept out of it with register_for_checkpointing (the way out that
    the runtime error names)."""
    for rank, result in enumerate(two_processes.outcome(name)):
        assert result["uninterrupted"]["lrs"] == reference(), f"rank {rank}"
        assert result["resumed"]["loaded_state"] == result["saved_state"], f"rank {rank}"
        assert result["saved_state"]["last_epoch"] == SAVE_AFTER
        assert result["resumed"]["lrs"] == reference()[SAVE_AFTER:], f"rank {rank}"
        assert result["resumed"]["state"] == result["uninterrupted"]["state"], f"rank {rank}"


def test_two_process_checkpoint_resumes_in_one_process(one_process_resume: Launch, two_processes: Launch) -> None:
    saved = two_processes.outcome("save_and_load_state")[0]
    (resumed,) = one_process_resume.outcome("resume_in_one_process")
    assert resumed["num_processes"] == 1
    assert resumed["loaded_state"] == saved["saved_state"]
    assert resumed["lrs"] == reference()[SAVE_AFTER:]
    assert resumed["state"] == saved["uninterrupted"]["state"]


def _version(launch: Launch) -> str:
    pinned = launch.results.get("prepare_returns_ours_unwrapped", [None])[0] or {}
    return str(pinned.get("accelerate_version", "unknown"))


def test_pin_prepare_returns_a_scheduler_marked_prepared_as_it_is(two_processes: Launch) -> None:
    """The Accelerate internal distplateau/_accelerate.py relies on."""
    for result in two_processes.outcome("prepare_returns_ours_unwrapped"):
        version = result["accelerate_version"]
        assert result["returned_unwrapped"], (
            f"accelerate {version} changed: Accelerator.prepare() wrapped a scheduler marked "
            f"{PREPARED_MARK}=True in {result['prepared_type']} instead of returning it as it is "
            "(Accelerator.prepare_scheduler). distplateau/_accelerate.py relies on that mark; "
            "DistributedReduceLROnPlateau.step() now raises under prepare() with this version."
        )
        assert result["registered_for_save_state"], (
            f"accelerate {version} changed: Accelerator.prepare() no longer appends a scheduler marked "
            f"{PREPARED_MARK}=True to accelerator._schedulers, so save_state()/load_state() would leave it out."
        )
        assert PREPARED_MARK not in result["state_dict_keys"], "the mark is deployment, not checkpointed state"


def test_pin_a_scheduler_wrapped_anyway_raises_on_every_rank_instead_of_repeating_steps(two_processes: Launch) -> None:
    for result in two_processes.outcome("accelerated_scheduler_wrapper_is_refused"):
        assert result["error_message"] is not None, (
            f"accelerate {_version(two_processes)} changed: AcceleratedScheduler.step() no longer calls "
            "the scheduler's step() itself, so distplateau/_accelerate.py:refuse_wrapper cannot see it."
        )
        assert "called by Accelerate's AcceleratedScheduler" in result["error_message"]
        assert "register_for_checkpointing" in result["error_message"]
        assert result["plateau_steps"] == 0


def test_prepared_validation_loader_repeats_samples_unless_even_batches_is_false(two_processes: Launch) -> None:
    exact = sum(VALIDATION_LOSSES) / len(VALIDATION_LOSSES)
    ranks = two_processes.outcome("prepared_validation_loader")
    padded = [rank["even_batches=True"] for rank in ranks]
    unpadded = [rank["even_batches=False"] for rank in ranks]
    seen = [sample for rank in padded for sample in rank["samples"]]
    assert len(seen) > len(VALIDATION_LOSSES) and sorted(set(seen)) == list(VALIDATION_LOSSES)  # repeats
    assert {rank["global_metric"] for rank in padded} == {sum(seen) / len(seen)} != {exact}
    seen = [sample for rank in unpadded for sample in rank["samples"]]
    assert sorted(seen) == list(VALIDATION_LOSSES)  # each sample once
    assert {rank["global_metric"] for rank in unpadded} == {exact}


def test_import_distplateau_does_not_import_accelerate() -> None:
    code = "import sys, distplateau; print(sorted(m for m in sys.modules if m.split('.')[0] == 'accelerate'))"
    result = run([sys.executable, "-c", code], 120, child_env())
    assert result.returncode == 0, result.stdout
    assert result.stdout.strip() == "[]"
