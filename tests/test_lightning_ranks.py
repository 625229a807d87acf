"""Lightning fits on two real ranks: Lightning's own DDP (CPU, gloo, ``devices=2``) and
distplateau's ``HorovodStrategy`` under ``horovodrun -np 2 --gloo``, once per Lightning
package (``lightning.pytorch`` and ``pytorch_lightning``, see tests/conftest.py).

One launch per strategy and package (the module-scoped ``launch`` fixture) runs every scenario
of ``tests/lightning_checks.py``; each test here then compares what the ranks observed in one
scenario. Tests of one strategy only are marked ``@ddp_only`` / ``@horovod_only``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from harness.launch import Launch, child_env, horovodrun_available, launch_log, rank_results, run, run_horovod
from tests.lightning_checks import BASE, DRIFT, OFFSETS, SMOOTHED_VALUES, TRAIN_VALUES, VALUES
from tests.plateau_references import SchnetpackReduceLROnPlateau

from .conftest import DISTPLATEAU_MODULE

pytestmark = pytest.mark.timeout(1200)  # a module fixture runs up to three launches of LAUNCH_TIMEOUT each

SCRIPT = str(Path(__file__).with_name("lightning_checks.py"))
LAUNCH_TIMEOUT = 300


@pytest.fixture(scope="module")
def world1_checkpoint(lightning_package: str, tmp_path_factory: pytest.TempPathFactory) -> Launch:
    """A 1-process run that writes a checkpoint, for resuming at a different world size."""
    tmp = tmp_path_factory.mktemp(f"lightning-single-{lightning_package}")
    env = child_env({"DISTPLATEAU_LIGHTNING_PACKAGE": lightning_package})
    log = launch_log(run, [sys.executable, SCRIPT, "single", str(tmp)], timeout=LAUNCH_TIMEOUT, env=env)
    return Launch(rank_results(tmp, 1), log)


def _checkpoint(single: Launch) -> str:
    return (single.results.get("world_size_1_checkpoint", [None])[0] or {}).get("path", "")


@pytest.fixture(scope="module", params=["ddp", "horovod"])
def launch(request: pytest.FixtureRequest, lightning_package: str, world1_checkpoint: Launch,
           tmp_path_factory: pytest.TempPathFactory) -> Launch:
    """Every scenario of one strategy on 2 ranks, once for all the tests of that strategy and package."""
    strategy = request.param
    tmp = tmp_path_factory.mktemp(f"lightning-{strategy}-{lightning_package}")
    package = {"DISTPLATEAU_LIGHTNING_PACKAGE": lightning_package}
    args = [SCRIPT, strategy, str(tmp / strategy), _checkpoint(world1_checkpoint)]
    if strategy == "horovod":
        if not horovodrun_available():
            pytest.fail("Horovod is not installed: run `python -m distplateau.install_horovod`")
        log = launch_log(run_horovod, 2, args, timeout=LAUNCH_TIMEOUT, env=package)
        return Launch(rank_results(tmp / strategy, 2), log)
    env = child_env(package)
    log = launch_log(run, [sys.executable, *args], timeout=LAUNCH_TIMEOUT, env=env)
    results = rank_results(tmp / strategy, 2)
    # ... and back: the 2-rank run's checkpoint resumed by one process.
    ckpt2 = str(tmp / strategy / "ckpt-same" / "epoch=2.ckpt")
    back = run([sys.executable, SCRIPT, "single", str(tmp / "back"), ckpt2], LAUNCH_TIMEOUT, env)
    results["resume_from_world_size_2"] = rank_results(tmp / "back", 1).get("resume_from_other_world_size", [None])
    return Launch(results, world1_checkpoint.log + log + back.stdout)


#: For the tests of one strategy only.
ddp_only = pytest.mark.parametrize("launch", ["ddp"], indirect=True)
horovod_only = pytest.mark.parametrize("launch", ["horovod"], indirect=True)


def torch_schedule(metrics: list[float]) -> list[float]:
    """The learning rates a single-process torch ReduceLROnPlateau takes on ``metrics``."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = ReduceLROnPlateau(opt, factor=0.5, patience=1)
    lrs = []
    for m in metrics:
        sched.step(m)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


# ------------------------------------------------------------------ item 1: the class swap under DDP


@ddp_only
def test_plain_torch_scheduler_lets_the_ranks_learning_rates_diverge(launch: Launch) -> None:
    rank0, rank1 = launch.outcome("plain_torch_scheduler_diverges")
    assert rank0["lrs"] == torch_schedule([BASE + d for d in DRIFT])  # rank 0 sees its own, worsening loss
    assert rank1["lrs"] == torch_schedule([BASE - d for d in DRIFT])  # rank 1 sees an improving one
    assert rank0["lrs"] != rank1["lrs"]


def test_class_swap_gives_every_rank_the_schedule_of_the_global_mean(launch: Launch, lightning_package: str) -> None:
    rank0, rank1 = launch.outcome("class_swap_follows_global_schedule")
    assert rank0["globals"] == rank1["globals"] == [BASE] * len(DRIFT)
    assert rank0["lrs"] == rank1["lrs"] == torch_schedule([BASE] * len(DRIFT))
    assert rank0["state"] == rank1["state"]
    assert rank0["weights"] == rank1["weights"]
    # the Trainer and the callback its entry point attached come from the package under test
    module = DISTPLATEAU_MODULE[lightning_package]
    assert rank0["lightning"].split()[0] == lightning_package
    assert f"{module}.DistributedPlateauCallback" in rank0["callbacks"]
    assert rank0["strategy"].startswith(("distplateau", lightning_package.split(".")[0]))


# ------------------------------------------------------------------ item 3: weights


def test_validation_sample_counts_make_the_exact_global_mean_on_uneven_shards(launch: Launch) -> None:
    rank0, rank1 = launch.outcome("sample_counts_weight_uneven_shards")
    # rank 0 validates [1, 2, 3] (mean 2), rank 1 [10]: (1 + 2 + 3 + 10) / 4 = 4, not (2 + 10) / 2
    assert rank0["globals"] == rank1["globals"] == [4.0, 4.0]
    assert (rank0["default_weight"], rank1["default_weight"]) == (3, 1)


def test_padded_validation_shards_give_the_mean_over_the_dataset(launch: Launch) -> None:
    rank0, rank1 = launch.outcome("padded_sampler_gives_the_mean_over_the_dataset")
    assert rank0["sampler"] == "DistributedSampler"  # added by Lightning
    assert (rank0["default_weight"], rank1["default_weight"]) == (4, 3)  # 7 samples, none repeated
    assert rank0["globals"] == rank1["globals"] == [pytest.approx(rank0["expected"], rel=1e-12)] * 2


def test_early_stopping_stops_every_rank_at_the_same_epoch(launch: Launch) -> None:
    rank0, rank1 = launch.outcome("stops_together")
    # best at epoch 0, no improvement at epochs 1 and 2: stop after epoch 2 of 6, on both ranks
    assert rank0["should_stop"] and rank1["should_stop"]
    assert rank0["epochs_run"] == rank1["epochs_run"] == 3
    assert rank0["lrs"] == rank1["lrs"] == torch_schedule([BASE] * 3)
    assert rank0["state"] == rank1["state"]


def test_warmup_then_plateau_follows_the_single_process_reference(launch: Launch) -> None:
    rank0, rank1 = launch.outcome("warmup_then_plateau")
    ramp = [0.1 * (0.5 + 0.5 * 1 / 2), 0.1]  # after the plateau steps of epochs 0 and 1
    assert rank0["lrs"] == rank1["lrs"]
    assert rank0["lrs"][:2] == pytest.approx(ramp, rel=1e-12)
    assert rank0["lrs"][2:] == torch_schedule([BASE] * (len(DRIFT) - 2))
    assert rank0["state"] == rank1["state"]


# ------------------------------------------------------------------ item 6: strict=False


def test_strict_false_metric_on_some_ranks_steps_every_rank_on_the_others(launch: Launch) -> None:
    rank0, rank1 = launch.outcome("strict_false_metric_on_rank0_only")
    expected = [BASE + d for d in DRIFT[:4]]  # rank 0's local means only: rank 1 contributes weight 0
    assert rank0["globals"] == rank1["globals"] == expected
    assert rank0["lrs"] == rank1["lrs"] == torch_schedule(expected)
    assert rank0["state"] == rank1["state"]


def test_strict_false_metric_missing_on_every_rank_skips_the_step_everywhere(launch: Launch) -> None:
    rank0, rank1 = launch.outcome("strict_false_metric_missing_everywhere_skips")
    assert rank0["globals"][0] is None  # epoch 0: no validation yet, no step
    assert rank0["state"] == rank1["state"]
    assert rank0["state"]["last_epoch"] == 2  # epochs 1 and 3 validate; epoch 2 has no new value: no step


def test_strict_true_metric_on_some_ranks_raises_on_every_rank_instead_of_hanging(launch: Launch) -> None:
    for seen in launch.outcome("strict_true_metric_on_rank0_only_raises"):
        assert seen["raised"] == "MisconfigurationException"
        assert "missing on rank 1" in seen["message"]


# ------------------------------------------------------------------ which boundaries are plateau steps


def test_epochs_without_validation_are_not_plateau_steps_on_any_rank(launch: Launch) -> None:
    rank0, rank1 = launch.outcome("no_step_without_a_new_value")
    # check_val_every_n_epoch=2, patience=0, a global loss of 9, 7, 5 at epochs 1, 3, 5: three
    # steps, all improvements; a step on the stale value at epochs 2 and 4 would have cut twice
    assert rank0["lrs"] == rank1["lrs"] == [0.1] * len(DRIFT)
    assert rank0["state"] == rank1["state"]
    assert (rank0["state"]["last_epoch"], rank0["state"]["best"], rank0["state"]["num_bad_epochs"]) == (3, 5.0, 0)


def test_interval_validation_steps_after_each_validation_run_on_its_exact_global_value(launch: Launch) -> None:
    rank0, rank1 = (seen["uninterrupted"] for seen in launch.outcome("step_after_every_validation_and_resume"))
    assert [s[0] for s in rank0["steps"]] == [s[0] for s in rank1["steps"]] == list(range(1, len(VALUES) + 1))
    # each rank steps on its own local mean with its own sample count (4 and 3 of 7 unpadded samples) ...
    local = {0: sum(OFFSETS[0::2]) / 4, 1: sum(OFFSETS[1::2]) / 3}
    for rank, seen in enumerate((rank0, rank1)):
        assert [(s[1], s[2]) for s in seen["steps"]] == [(v + local[rank], 4 - rank) for v in VALUES]
    # ... and every rank follows one process stepping torch's class on each run's exact global value
    assert [s[3] for s in rank0["steps"]] == [s[3] for s in rank1["steps"]] == VALUES
    assert [s[4] for s in rank0["steps"]] == [s[4] for s in rank1["steps"]] == torch_schedule(VALUES)
    assert rank0["state"] == rank1["state"] and rank0["state"]["last_epoch"] == len(VALUES)


@pytest.mark.parametrize("step", [6, 8])  # saved mid-epoch, and at the end of an epoch
def test_interval_validation_resumed_from_a_checkpoint_continues_as_uninterrupted(launch: Launch, step: int) -> None:
    seen = launch.outcome("step_after_every_validation_and_resume")
    assert seen[0]["files"] == [f"step={k}.ckpt" for k in sorted(range(1, len(VALUES) + 1), key=str)]
    for rank in seen:
        uninterrupted, resumed = rank["uninterrupted"], rank[f"from_{step}"]
        assert resumed["steps"] == uninterrupted["steps"][step:]
        assert resumed["state"] == uninterrupted["state"]
    assert seen[0][f"from_{step}"]["restored"] == seen[1][f"from_{step}"]["restored"]
    assert seen[0][f"from_{step}"]["restored"]["last_epoch"] == step


def test_a_plateau_step_under_lightning_is_one_collective_and_a_stale_boundary_none(launch: Launch) -> None:
    for rank in launch.outcome("one_collective_per_plateau_step"):
        for case in ("everywhere", "rank0_only"):  # rank0_only: who has the metric travels in the step's record
            # 4 epochs validating at epochs 1 and 3: two plateau steps, two all-gathers in the whole fit
            assert rank[case]["state"]["last_epoch"] == 2
            assert rank[case]["gathers"] == 2, case


# ------------------------------------------------------------------ smoothing_factor and accumulation_size


def schnetpack_schedule(metrics: list[float], **kwargs: float) -> list[tuple[float, float]]:
    """(learning rate, average) after each step of schnetpack's class in one process."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = SchnetpackReduceLROnPlateau(opt, factor=0.5, **kwargs)
    steps = []
    for m in metrics:
        sched.step(m)
        steps.append((opt.param_groups[0]["lr"], sched.ema_loss))
    return steps


def test_smoothing_after_every_validation_is_schnetpacks_average_of_each_global_value(launch: Launch) -> None:
    rank0, rank1 = launch.outcome("smoothing_after_every_validation")
    assert [s[3] for s in rank0["steps"]] == [s[3] for s in rank1["steps"]] == VALUES  # each run's global value
    expected = schnetpack_schedule(VALUES, patience=1, smoothing_factor=0.5)
    assert [(s[4], s[5]) for s in rank0["steps"]] == [(s[4], s[5]) for s in rank1["steps"]] == expected
    assert rank0["state"] == rank1["state"]


def test_smoothing_skips_epochs_without_validation_and_resumes_a_pending_step_exactly(launch: Launch) -> None:
    rank0, rank1 = launch.outcome("smoothing_resumed_with_and_without_a_pending_step")
    for seen in (rank0, rank1):
        run = seen["uninterrupted"]
        # steps at epochs 1, 3 and 5 only; 2.25 is no better than 2.0, but the average is: no cut,
        # where the values themselves would have cut at epoch 5 (patience 0)
        assert run["state"]["last_epoch"] == 3 and run["lrs"] == [0.1] * len(DRIFT)
        assert run["state"]["last_smoothed_metric"] == 2.375 == schnetpack_schedule(
            SMOOTHED_VALUES, patience=0, smoothing_factor=0.5)[-1][1]
        assert schnetpack_schedule(SMOOTHED_VALUES, patience=0)[-1][0] == 0.05  # smoothing_factor 0
        for epoch, pending in ((1, True), (2, False)):  # epoch 1's step was pending in its checkpoint
            resumed = seen[f"from_{epoch}"]
            assert resumed["pending"] == pending
            assert resumed["state"] == run["state"]
    assert rank0["uninterrupted"]["state"] == rank1["uninterrupted"]["state"]


def test_a_window_of_training_steps_gathers_once_and_weighs_each_ranks_step_alike(launch: Launch) -> None:
    rank0, rank1 = launch.outcome("window_of_training_steps")
    means = [sum(TRAIN_VALUES[i:i + 4]) / 4 for i in range(0, len(TRAIN_VALUES), 4)]
    expected = schnetpack_schedule(means, patience=0, smoothing_factor=0.5)
    for offset, seen in ((0.5, rank0), (-0.5, rank1)):
        steps = seen["steps"]
        assert [s[0] for s in steps] == list(range(1, len(TRAIN_VALUES) + 1))
        # every optimizer step adds this rank's training loss with weight 1 (not its validation samples, 4 or 3)
        assert [(s[1], s[2]) for s in steps] == [(v + offset, None) for v in TRAIN_VALUES]
        assert [s[3] for s in steps] == [(k + 1) % 4 for k in range(len(TRAIN_VALUES))]
        window_ends = steps[3::4]
        assert [s[4] for s in window_ends] == means  # the exact global mean of each window of 4 steps
        assert [(s[6], s[5]) for s in window_ends] == expected
        assert seen["gathers"] == 3  # one all-gather per window in the whole fit
    assert rank0["state"] == rank1["state"] and rank0["state"]["lr"] == 0.05


def test_the_loggers_get_the_global_value_of_every_plateau_step_and_each_cut_one_log_line(launch: Launch) -> None:
    rank0, rank1 = launch.outcome("global_value_in_the_loggers")
    epochs = rank0["epochs_run"]
    assert epochs == rank1["epochs_run"] == 5  # stop_patience=4: best at epoch 0, stop after epoch 4
    rows = rank0["rows"]
    own = [(row["step"], float(row["val_loss"])) for row in rows if "val_loss" in row]
    shared = [(row["step"], float(row["val_loss/global"])) for row in rows if "val_loss/global" in row]
    # rank 0's own val_loss (logged without sync_dist) drifts; the global value is the exact mean
    assert [v for _, v in own] == [BASE + d for d in DRIFT[:epochs]]
    assert [v for _, v in shared] == [BASE] * epochs
    assert [s for s, _ in shared] == [s for s, _ in own]  # once per plateau step, on the user's step axis
    logged = [row for row in rows if "val_loss/global" in row]
    assert [float(row["val_loss/smoothed"]) for row in logged] == [BASE] * epochs
    assert [float(row["val_loss/best"]) for row in logged] == [BASE] * epochs
    assert [int(row["val_loss/bad_steps"]) for row in logged] == [0, 1, 0, 1, 0]  # reset by each cut
    assert [int(row["val_loss/steps_since_best"]) for row in logged] == [0, 1, 2, 3, 4]
    # the replay of the logged column takes the run's learning rates, step for step, from the CSV
    # file and from the TensorBoard event files (the same steps and values)
    assert rank0["replayed"] == rank0["lrs"] == rank1["lrs"] == [0.1, 0.1, 0.05, 0.05, 0.025]
    assert rank0["tensorboard_series"] == rank0["csv_series"]
    assert rank0["replayed_tensorboard"] == rank0["lrs"]
    # one INFO line per cut and one for the stop, on rank 0 only, with the numbers that explain it
    assert rank1["lines"] == []
    assert rank0["lines"] == [
        "distplateau: step 3: reducing the learning rate: global metric 2.0 (smoothed 2.0), best 2.0, "
        "2 bad steps > patience 1; group 0: 0.1 -> 0.05",
        "distplateau: step 5: reducing the learning rate: global metric 2.0 (smoothed 2.0), best 2.0, "
        "2 bad steps > patience 1; group 0: 0.05 -> 0.025",
        "distplateau: step 5: stop_patience reached: global metric 2.0 (smoothed 2.0), best 2.0, "
        "4 steps without a new best >= stop_patience 4; should_stop is True on every rank",
    ]


# ------------------------------------------------------------------ item 4: monitor on the scheduler


@ddp_only
def test_monitor_given_to_the_scheduler_is_enough_for_lightning(launch: Launch) -> None:
    rank0, rank1 = launch.outcome("monitor_on_scheduler_is_enough")
    assert rank0["monitor"] == rank1["monitor"] == "val_loss"
    assert rank0["state"] == rank1["state"]
    assert rank0["state"]["last_epoch"] == 3


# ------------------------------------------------------------------ item 5: resume


@pytest.mark.parametrize("name", ["resume_same_world_size", "resume_from_other_world_size"])
def test_resume_restores_scheduler_state_on_every_rank_and_continues_as_uninterrupted(launch: Launch,
                                                                                     name: str) -> None:
    uninterrupted = launch.outcome("class_swap_follows_global_schedule")[0]["state"]
    rank0, rank1 = launch.outcome(name)  # from a 2-rank / a 1-process checkpoint, on 2 ranks
    assert rank0["saved"]["last_epoch"] == 2  # saved before epoch 2's plateau step
    assert rank0["restored"] == rank1["restored"] == rank0["saved"]
    assert rank0["state"] == rank1["state"] == uninterrupted


@ddp_only
def test_resume_of_a_2_rank_checkpoint_in_one_process_continues_as_uninterrupted(launch: Launch) -> None:
    uninterrupted = launch.outcome("class_swap_follows_global_schedule")[0]["state"]
    back = launch.results["resume_from_world_size_2"][0]
    assert back is not None and "error" not in back, f"1-process resume failed:\n{back or launch.log[-6000:]}"
    assert back["restored"] == back["saved"]
    assert back["state"] == uninterrupted


# ------------------------------------------------------------------ item 2: the Horovod strategy


@horovod_only
def test_horovod_strategy_broadcasts_rank0_and_averages_gradients(launch: Launch, lightning_package: str) -> None:
    rank0, rank1 = launch.outcome("horovod_matches_full_batch_reference")
    # rank 1 starts from other weights and another lr; after the fit both equal a plain-torch
    # run from rank 0's start that averages the two ranks' batch gradients at every step
    assert rank0["max_diff_to_reference"] == rank1["max_diff_to_reference"] == 0.0
    assert (rank0["rank"], rank1["rank"], rank0["world"]) == (0, 1, 2)
    assert rank0["backend"] == "HorovodGather"
    assert rank0["strategy"] == f"{DISTPLATEAU_MODULE[lightning_package]}.HorovodStrategy"
    shards = rank0["shards"]  # (world, steps, batch): a distributed sampler splits each epoch
    for epoch in range(2):
        seen = [i for rank in shards for step in rank[2 * epoch:2 * epoch + 2] for i in step]
        assert sorted(seen) == list(range(16))
    for seen in (rank0, rank1):
        assert (seen["reduce_sum"], seen["reduce_mean"]) == (3.0, 1.5)
        assert seen["all_gather"] == [[0, 10], [1, 11]]
        assert seen["broadcast"] == {"from": 1} and seen["barrier"]


@horovod_only
def test_horovod_strategy_averages_accumulated_gradients(launch: Launch) -> None:
    rank0, rank1 = launch.outcome("horovod_accumulates_gradients")  # accumulate_grad_batches=2
    assert rank0["max_diff_to_reference"] == rank1["max_diff_to_reference"] == 0.0


@horovod_only
def test_horovod_strategy_lets_the_same_model_be_fitted_again(launch: Launch) -> None:
    rank0, rank1 = launch.outcome("horovod_fits_the_same_model_twice")
    assert rank0["weights"] == rank1["weights"]


@horovod_only
def test_horovod_checkpoints_are_written_by_rank0_only(launch: Launch) -> None:
    rank0, rank1 = launch.outcome("horovod_checkpoints_written_by_rank0_only")
    assert rank0["writes"] == ["epoch=0.ckpt", "epoch=1.ckpt"]
    assert rank1["writes"] == []
    assert rank0["files"] == ["epoch=0.ckpt", "epoch=1.ckpt"]


# ------------------------------------------------------------------ item 7: the examples, run as documented


EXAMPLES = {"lightning_ddp.py": "lightning.pytorch", "lightning_horovod.py": "pytorch_lightning"}  # what each imports


@pytest.mark.parametrize("example", list(EXAMPLES))
def test_example_runs_as_documented_and_keeps_every_rank_on_one_learning_rate(example: str) -> None:
    if EXAMPLES[example] not in os.environ.get("DISTPLATEAU_LIGHTNING_PACKAGES", EXAMPLES[example]).split(","):
        pytest.skip(f"{example} imports {EXAMPLES[example]}, not selected in DISTPLATEAU_LIGHTNING_PACKAGES")
    path = str(Path(__file__).resolve().parent.parent / "examples" / example)
    if example == "lightning_horovod.py":
        if not horovodrun_available():
            pytest.fail("Horovod is not installed: run `python -m distplateau.install_horovod`")
        out = run_horovod(2, [path, "--epochs", "5"], LAUNCH_TIMEOUT).stdout
    else:
        out = run([sys.executable, path, "--epochs", "5"], LAUNCH_TIMEOUT, child_env()).stdout
    lines = [line.split("per rank", 1)[1].split() for line in out.splitlines() if "learning rate per rank" in line]
    assert len(lines) == 5, out[-4000:]
    assert all(len(set(lrs)) == 1 and len(lrs) == 2 for lrs in lines), out[-4000:]
