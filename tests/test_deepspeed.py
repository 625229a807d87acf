"""DeepSpeed on two real CPU processes (``DS_ACCELERATOR=cpu``, gloo), ZeRO stage 0 and 2.

One launch of ``tests/deepspeed_checks.py`` runs every scenario: the scheduler handed to
``deepspeed.initialize`` (ours: a clear error on every rank; torch's: stepped on the batch size,
pinned), the documented pattern (kept out of ``initialize``, stepped after each validation) against
torch's own ``ReduceLROnPlateau`` in one process on the exact global mean, and a checkpoint resume.
A second, one-process launch tries Lightning's ``strategy="deepspeed"`` on the CPU.

The test sets ``DS_ACCELERATOR=cpu`` for its processes, whatever the shell says. DeepSpeed
compiles its shared-memory communication op the first time a process group starts on a machine
(about 100 s on 2 cores, then cached in ``~/.cache/torch_extensions``); ``bash dev.sh setup``
builds it ahead, so that the launch itself takes 15-20 s (the Lightning one 12-18 s).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from distplateau.scheduler import _no_metric_message
from harness.launch import Launch, child_env, launch_log, rank_results, run, run_torch

from .deepspeed_checks import ENGINE_STEPS, MICRO_BATCH, SAVE_AFTER, SCENARIOS, STEPS_PER_EPOCH, batch
from .uneven_shards import EPOCHS, LR, reference, same, schedule

LAUNCH_TIMEOUT = 240  # 15-20 s measured; a machine without `dev.sh setup` first compiles ~100 s more
PROCESSES = 2

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                       reason="DeepSpeed is not installed: pip install '.[deepspeed]'"),
    pytest.mark.timeout(2 * LAUNCH_TIMEOUT + 60),  # the module's two launches
]

CHECKS = str(Path(__file__).with_name("deepspeed_checks.py"))
ENV = {"DS_ACCELERATOR": "cpu"}  # DeepSpeed's CPU accelerator: gloo, whatever GPU the machine has


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> Launch:
    out = tmp_path_factory.mktemp("deepspeed")
    log = launch_log(run_torch, PROCESSES, [CHECKS, "ranks", str(out)], timeout=LAUNCH_TIMEOUT, env=ENV)
    return Launch(rank_results(out, PROCESSES), log)


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_finished_without_error_on_every_rank(two_processes: Launch, name: str) -> None:
    assert len(two_processes.outcome(name)) == PROCESSES


# ------------------------------------------------------------------ the scheduler in deepspeed.initialize


@pytest.mark.parametrize("name,accumulation", [("engine_steps_ours_stage0", 1), ("engine_steps_ours_stage2", 1),
                                               ("engine_steps_ours_gradient_accumulation", 2)])
def test_engine_stepping_ours_raises_on_every_rank_at_the_first_optimizer_step(
        two_processes: Launch, name: str, accumulation: int) -> None:
    """The engine calls ``step()`` with no metric after the first optimizer step (the
    ``accumulation``-th micro-batch); the error is no TypeError, so the engine lets it through
    instead of stepping on its batch size, and nothing changed."""
    for rank, seen in enumerate(two_processes.outcome(name)):
        assert seen["engine_scheduler_is_ours"]
        assert seen["raised"] == {"type": "RuntimeError", "message": _no_metric_message(rank)}, (
            f"deepspeed {seen['deepspeed_version']}, rank {rank}")
        assert seen["raised_at_micro_step"] == accumulation
        assert seen["optimizer_steps"] == 0  # the engine counts the step after the scheduler call
        assert seen["lr"] == [LR] and seen["plateau_steps"] == 0


#: What DeepSpeed's engine (runtime/engine.py, _take_model_step, read in 0.19.8) does to a
#: scheduler after each optimizer step: step(**lr_kwargs), i.e. step(), and on TypeError
#: step(train_batch_size()); train_batch_size = MICRO_BATCH per process x 2 processes here.
ENGINE_CALLS = [[[], {}], [[MICRO_BATCH * PROCESSES], {}]] * ENGINE_STEPS


@pytest.mark.parametrize("name", ["engine_steps_torch_stage0", "engine_steps_torch_stage2"])
def test_pin_the_engine_steps_torchs_plateau_scheduler_on_the_batch_size(two_processes: Launch, name: str) -> None:
    """docs/guides/deepspeed.md quotes these numbers: with no validation at all, the learning
    rate is cut 3 times in 8 optimizer steps. If this fails, DeepSpeed changed: update the guide."""
    for rank, seen in enumerate(two_processes.outcome(name)):
        version = seen["deepspeed_version"]
        assert seen["train_batch_size"] == MICRO_BATCH * PROCESSES and seen["optimizer_steps"] == ENGINE_STEPS
        assert seen["calls"] == ENGINE_CALLS, (
            f"deepspeed {version} changed how its engine steps a scheduler handed to deepspeed.initialize: "
            f"{seen['calls']} in {ENGINE_STEPS} optimizer steps on rank {rank}, not step() then "
            f"step({MICRO_BATCH * PROCESSES}) each time; update docs/guides/deepspeed.md")
        assert seen["lrs"] == schedule([float(MICRO_BATCH * PROCESSES)] * ENGINE_STEPS), f"deepspeed {version}"
        assert seen["lrs"][-1] == LR / 8


def test_metric_in_every_engine_step_lr_kwargs_is_one_plateau_step_per_optimizer_step(two_processes: Launch) -> None:
    """``engine.step(lr_kwargs={"metrics": m, "weight": n})`` on every micro-batch, 2 micro-batches
    per optimizer step: the scheduler steps at each optimizer step, on that micro-batch's values
    (rank 0: 10 i with weight 1, rank 1: 10 i + 1 with weight 2); the other micro-batches' values
    are dropped."""
    expected_steps = [(i + 1) // 2 for i in range(ENGINE_STEPS)]
    boundaries = [i for i in range(ENGINE_STEPS) if i % 2 == 1]
    metrics = [(10 * i * 1 + (10 * i + 1) * 2) / 3 for i in boundaries]
    lrs = schedule(metrics)
    ranks = two_processes.outcome("engine_lr_kwargs_with_gradient_accumulation")
    for seen in ranks:
        assert seen["optimizer_steps"] == ENGINE_STEPS // 2
        assert [s["plateau_steps"] for s in seen["seen"]] == expected_steps
        assert [s["metric"] for i, s in enumerate(seen["seen"]) if i in boundaries] == pytest.approx(metrics, rel=1e-15)
        assert [s["lr"] for i, s in enumerate(seen["seen"]) if i in boundaries] == lrs
    assert ranks[0]["seen"] == ranks[1]["seen"]


# ------------------------------------------------------------------ the documented pattern


@pytest.mark.parametrize("stage,engine_optimizer", [(0, "SGD"), (2, "DeepSpeedZeroOptimizer")])
def test_stepped_after_each_validation_it_follows_torch_on_the_exact_global_mean(
        two_processes: Launch, stage: int, engine_optimizer: str) -> None:
    metrics, lrs = reference([PROCESSES] * EPOCHS)
    assert len(set(lrs)) == 3  # the scripted losses cut the learning rate twice
    ranks = two_processes.outcome(f"validation_steps_stage{stage}")
    for seen in ranks:
        assert seen["engine_optimizer"] == engine_optimizer
        assert seen["plateau_steps"] == EPOCHS and seen["optimizer_steps"] == EPOCHS * STEPS_PER_EPOCH
        assert same(seen["metrics"], metrics)
        assert seen["lrs"] == lrs
        assert seen["engine_lrs"] == lrs  # engine.get_lr(): the engine's optimizer sees each cut
    assert ranks[0]["scheduler"] == ranks[1]["scheduler"]
    assert ranks[0]["weights_after_epoch"] == ranks[1]["weights_after_epoch"]


def expected_weights(initial: list[float], lrs: list[float]) -> list[list[float]]:
    """The parameters after each epoch if every optimizer step of epoch ``e`` used the learning
    rate set after validation ``e - 1`` (``LR`` before the first): SGD on ``model(x).mean()``,
    whose gradient is constant, averaged over the processes' batches."""
    batches = [batch(rank).double() for rank in range(PROCESSES)]
    gradient = [float(sum(b[:, column].mean() for b in batches) / PROCESSES) for column in range(3)] + [1.0]
    weights, after = list(initial), []
    for lr in [LR, *lrs[:-1]]:
        weights = [w - STEPS_PER_EPOCH * lr * g for w, g in zip(weights, gradient)]
        after.append(weights)
    return after


@pytest.mark.parametrize("stage", [0, 2])
def test_the_engine_trains_with_the_learning_rate_the_scheduler_set(two_processes: Launch, stage: int) -> None:
    lrs = reference([PROCESSES] * EPOCHS)[1]
    for seen in two_processes.outcome(f"validation_steps_stage{stage}"):
        expected = expected_weights(seen["initial_weights"], lrs)
        for epoch, (weights, want) in enumerate(zip(seen["weights_after_epoch"], expected)):
            assert weights == pytest.approx(want, rel=1e-5, abs=1e-6), f"epoch {epoch}"
        never_cut = expected_weights(seen["initial_weights"], [LR] * EPOCHS)[-1]
        assert seen["weights_after_epoch"][-1] != pytest.approx(never_cut, rel=1e-3)  # the test can tell


@pytest.mark.parametrize("stage", [0, 2])
def test_save_checkpoint_client_state_resumes_as_the_uninterrupted_run(two_processes: Launch, stage: int) -> None:
    lrs = reference([PROCESSES] * EPOCHS)[1]
    uninterrupted = two_processes.outcome(f"validation_steps_stage{stage}")
    for rank, seen in enumerate(two_processes.outcome(f"checkpoint_resume_stage{stage}")):
        assert seen["saved"]["lrs"] == lrs[:SAVE_AFTER]
        # engine.load_checkpoint restores the optimizer's learning rate (0.05 after the first cut)
        assert seen["lr_after_load"] == lrs[SAVE_AFTER - 1] != LR
        assert seen["loaded_scheduler"] == seen["saved"]["scheduler"]
        assert seen["resumed"]["lrs"] == lrs[SAVE_AFTER:]
        assert seen["resumed"]["weights_after_epoch"] == uninterrupted[rank]["weights_after_epoch"][SAVE_AFTER:]
        assert seen["resumed"]["scheduler"] == uninterrupted[rank]["scheduler"]


def test_a_zero_engines_optimizer_is_no_torch_optimizer_to_build_the_scheduler_on(two_processes: Launch) -> None:
    for seen in two_processes.outcome("zero_optimizer_is_no_torch_optimizer"):
        assert seen == {"engine_optimizer": "DeepSpeedZeroOptimizer",
                        "refused_with": "DeepSpeedZeroOptimizer is not an Optimizer"}


# ------------------------------------------------------------------ Lightning strategy="deepspeed"


@pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="lightning is not installed")
def test_pin_lightning_refuses_strategy_deepspeed_on_the_cpu(tmp_path: Path) -> None:
    """docs/guides/deepspeed.md says Lightning's DeepSpeedStrategy runs on CUDA only, so that
    its one plateau step per epoch is read in the source, not run here. One process suffices:
    the check is in the strategy's ``setup_environment`` (2 processes fail the same way). If this
    fails, add the test: one plateau step per epoch on 2 CPU processes, as under DDP."""
    log = launch_log(run, [sys.executable, CHECKS, "lightning", str(tmp_path)], timeout=LAUNCH_TIMEOUT,
                     env=child_env(ENV))
    (seen,) = Launch(rank_results(tmp_path, 1), log).outcome("lightning_fit")
    assert seen["raised"] == ("RuntimeError: The DeepSpeed strategy is only supported on CUDA GPUs but "
                             "`CPUAccelerator` is used."), (
        f"lightning {seen['lightning_version']} changed what strategy='deepspeed' does on the CPU: {seen}")

