"""GPUs: CUDA-tensor metrics on every backend, NCCL and mixed process groups, Lightning on GPUs.

Every test here needs a CUDA device, and skips with the reason where there is none (or
fewer GPUs than its launch needs): ``pytest -m cuda -rs``. One launch of
``tests/cuda_checks.py`` per mode (see ``MODES`` there) runs every scenario; each test then
compares what the ranks observed. The Lightning tests launch ``tests/lightning_checks.py``
with ``DISTPLATEAU_LIGHTNING_ACCELERATOR=gpu`` and reuse the checks of
``tests/test_lightning_ranks.py`` on that launch.
"""

from __future__ import annotations

import inspect
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from harness.launch import (
    Launch,
    child_env,
    horovodrun_available,
    launch_log,
    rank_results,
    run,
    run_horovod,
    run_torch,
)

from . import test_lightning_ranks as lightning
from .cuda_checks import FACTOR, MODES, PATIENCE, SCENARIOS, SHARDS
from .lightning_checks import BASE

pytestmark = [pytest.mark.cuda, pytest.mark.timeout(1200)]

CHECKS = str(Path(__file__).with_name("cuda_checks.py"))
LIGHTNING_CHECKS = str(Path(__file__).with_name("lightning_checks.py"))
LAUNCH_TIMEOUT = 300
# Modes whose gather runs on the GPU: NCCL is the group's only backend.
GATHER_ON_GPU = {"nccl", "default", "bound"}
LIGHTNING_GPU = {"DISTPLATEAU_LIGHTNING_ACCELERATOR": "gpu"}


def need_gpus(n: int) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: torch.cuda.is_available() is False")
    if torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} GPUs, found {torch.cuda.device_count()}")


@pytest.fixture(scope="module", params=list(MODES))
def ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Launch]:
    """One launch of every scenario of tests/cuda_checks.py in one mode, and the mode."""
    mode = request.param
    world = MODES[mode].world
    need_gpus(MODES[mode].gpus)
    init_arguments = inspect.signature(torch.distributed.init_process_group).parameters
    if MODES[mode].bind_device and "device_id" not in init_arguments:
        pytest.skip(f"torch {torch.__version__} has no init_process_group(device_id=...)")
    out = tmp_path_factory.mktemp(f"cuda-{mode}")
    args = [CHECKS, mode, str(out)]
    if mode == "horovod":
        if not horovodrun_available():
            pytest.skip("Horovod is not installed")
        import horovod.torch as hvd

        if not hvd.cuda_built():
            pytest.skip("this Horovod build has no CUDA support (horovod.torch.cuda_built() is False)")
        log = launch_log(run_horovod, world, args, timeout=LAUNCH_TIMEOUT)
    elif mode == "none":
        log = launch_log(run, [sys.executable, *args], timeout=LAUNCH_TIMEOUT, env=child_env())
    else:
        log = launch_log(run_torch, world, args, timeout=LAUNCH_TIMEOUT)
    return mode, Launch(rank_results(out, world), log)


def reference(world: int) -> tuple[list[float], list[float]]:
    """The global metric of each row of SHARDS on ``world`` ranks (the weighted mean of the
    finite metrics, NaN if none is), and the learning rates torch's single-process
    ReduceLROnPlateau takes on them."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    scheduler = ReduceLROnPlateau(optimizer, factor=FACTOR, patience=PATIENCE)
    global_metrics, lrs = [], []
    for row in SHARDS:
        finite = [(metric, weight) for metric, weight in row[:world] if math.isfinite(metric)]
        total = sum(weight for _, weight in finite)
        value = sum(metric * weight for metric, weight in finite) / total if finite else math.nan
        scheduler.step(value)
        global_metrics.append(value)
        lrs.append(optimizer.param_groups[0]["lr"])
    return global_metrics, lrs


def same_floats(a: list[float], b: list[float]) -> bool:
    """Equal element by element, NaN equal to NaN."""
    return len(a) == len(b) and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))


# ------------------------------------------------------------------ (a), (b): metrics and weights as CUDA tensors


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_finishes_without_error_on_every_rank(ranks: tuple[str, Launch], name: str) -> None:
    mode, launch = ranks
    assert len(lightning.scenario(launch, name)) == MODES[mode].world


def test_cuda_metric_and_weight_step_exactly_like_floats(ranks: tuple[str, Launch]) -> None:
    mode, launch = ranks
    for rank, seen in enumerate(lightning.scenario(launch, "shards_stepped_as_cuda_tensors_and_as_floats")):
        cuda, floats = seen["cuda"], seen["float"]
        assert cuda["lrs"] == floats["lrs"], f"{mode}, rank {rank}"
        assert same_floats(cuda["globals"], floats["globals"]), f"{mode}, rank {rank}"
        assert cuda["state"] == floats["state"], f"{mode}, rank {rank}"


def test_every_rank_follows_the_single_process_reference_on_the_global_weighted_mean(
        ranks: tuple[str, Launch]) -> None:
    mode, launch = ranks
    seen = [r["cuda"] for r in lightning.scenario(launch, "shards_stepped_as_cuda_tensors_and_as_floats")]
    global_metrics, lrs = reference(len(seen))
    assert len(set(lrs)) > 1, "SHARDS must make the reference reduce the learning rate"
    if len(seen) > 1:
        rank0_alone = reference(1)[1]
        assert rank0_alone != lrs, "SHARDS must tell a gathered step from a local one"
        assert any(math.isnan(row[1][0]) for row in SHARDS), "SHARDS must have a NaN on rank 1"
    for rank, trajectory in enumerate(seen):
        assert same_floats(trajectory["globals"], global_metrics), f"{mode}, rank {rank}"
        assert trajectory["lrs"] == lrs, f"{mode}, rank {rank}"
        assert trajectory["state"] == seen[0]["state"], f"{mode}: rank {rank}'s state differs from rank 0's"


# ------------------------------------------------------------------ (e), (c): host-device round trips, mixed groups


def test_a_step_waits_for_the_gpu_only_to_read_its_inputs_and_a_gathered_table(
        ranks: tuple[str, Launch], record_property: Any) -> None:
    mode, launch = ranks
    for rank, seen in enumerate(lightning.scenario(launch, "syncs_per_step")):
        syncs = seen["syncs"]
        record_property(f"{mode}-rank{rank}-step-us", seen["step_us"])
        print(f"{mode} rank {rank} on {seen['device']}: syncs {syncs}, step time (us) {seen['step_us']}")
        assert syncs["one_item"] == 1, f"the sync counter does not count ({mode}): {syncs}"
        if mode == "mixed":
            # get_backend() names the whole "cpu:gloo,cuda:nccl" group, not "nccl": TorchGather
            # gathers on the group's CPU backend, which is why two ranks may share one GPU here.
            assert seen["process_group"] == "cpu:gloo,cuda:nccl"
        # A gather on the GPU uploads the record (a synchronising copy from pageable memory)
        # and reads the table back; a CPU gather needs neither.
        gather = 2 if mode in GATHER_ON_GPU else 0
        # Each CUDA tensor among the inputs is read once, by .item() in make_record.
        assert syncs["floats"] == gather, f"{mode}, rank {rank}: {syncs}"
        assert syncs["cuda_metric"] == 1 + gather, f"{mode}, rank {rank}: {syncs}"
        assert syncs["cuda_metric_and_weight"] == 2 + gather, f"{mode}, rank {rank}: {syncs}"


# ------------------------------------------------------------------ (d): Lightning on GPUs


@pytest.fixture(scope="module")
def lightning_one_gpu(lightning_package: str, tmp_path_factory: pytest.TempPathFactory) -> Launch:
    """Lightning with ``accelerator="gpu", devices=1``: one process, and the checkpoint the
    2-GPU run resumes from."""
    need_gpus(1)
    out = tmp_path_factory.mktemp(f"lightning-gpu1-{lightning_package}")
    env = child_env({"DISTPLATEAU_LIGHTNING_PACKAGE": lightning_package, **LIGHTNING_GPU})
    log = launch_log(run, [sys.executable, LIGHTNING_CHECKS, "single", str(out)], timeout=LAUNCH_TIMEOUT, env=env)
    return Launch(rank_results(out, 1), log)


@pytest.fixture(scope="module")
def lightning_two_gpus(lightning_package: str, lightning_one_gpu: Launch,
                       tmp_path_factory: pytest.TempPathFactory) -> Launch:
    """Lightning with ``strategy="ddp", accelerator="gpu", devices=2``: every DDP scenario of
    tests/lightning_checks.py."""
    need_gpus(2)
    checkpoint = (lightning_one_gpu.results.get("world_size_1_checkpoint", [None])[0] or {}).get("path", "")
    out = tmp_path_factory.mktemp(f"lightning-gpu2-{lightning_package}")
    env = child_env({"DISTPLATEAU_LIGHTNING_PACKAGE": lightning_package, **LIGHTNING_GPU})
    args = [sys.executable, LIGHTNING_CHECKS, "ddp", str(out), checkpoint]
    log = launch_log(run, args, timeout=LAUNCH_TIMEOUT, env=env)
    return Launch(rank_results(out, 2), log)


def test_lightning_on_one_gpu_steps_on_the_validation_mean(lightning_one_gpu: Launch) -> None:
    (seen,) = lightning.scenario(lightning_one_gpu, "world_size_1_checkpoint")
    assert seen["device"] == "cuda:0"
    assert seen["lrs"] == lightning.torch_schedule([BASE] * 3)


def test_lightning_ddp_on_two_gpus_gathers_over_nccl(lightning_two_gpus: Launch) -> None:
    rank0, rank1 = lightning.scenario(lightning_two_gpus, "class_swap_follows_global_schedule")
    assert (rank0["device"], rank1["device"]) == ("cuda:0", "cuda:1")
    assert rank0["process_group"] == rank1["process_group"] == "nccl"


def test_lightning_ddp_on_two_gpus_class_swap(lightning_two_gpus: Launch, lightning_package: str) -> None:
    lightning.test_class_swap_gives_every_rank_the_schedule_of_the_global_mean(lightning_two_gpus, lightning_package)


def test_lightning_ddp_on_two_gpus_sample_counts(lightning_two_gpus: Launch) -> None:
    lightning.test_validation_sample_counts_make_the_exact_global_mean_on_uneven_shards(lightning_two_gpus)


def test_lightning_ddp_on_two_gpus_padded_shards(lightning_two_gpus: Launch) -> None:
    lightning.test_padded_validation_shards_give_the_mean_over_the_dataset(lightning_two_gpus)


def test_lightning_ddp_on_two_gpus_early_stopping(lightning_two_gpus: Launch) -> None:
    lightning.test_early_stopping_stops_every_rank_at_the_same_epoch(lightning_two_gpus)


def test_lightning_ddp_on_two_gpus_warmup(lightning_two_gpus: Launch) -> None:
    lightning.test_warmup_then_plateau_follows_the_single_process_reference(lightning_two_gpus)


def test_lightning_ddp_on_two_gpus_strict_false(lightning_two_gpus: Launch) -> None:
    lightning.test_strict_false_metric_on_some_ranks_steps_every_rank_on_the_others(lightning_two_gpus)
    lightning.test_strict_false_metric_missing_on_every_rank_skips_the_step_everywhere(lightning_two_gpus)


def test_lightning_ddp_on_two_gpus_strict_true_raises_everywhere(lightning_two_gpus: Launch) -> None:
    lightning.test_strict_true_metric_on_some_ranks_raises_on_every_rank_instead_of_hanging(lightning_two_gpus)


def test_lightning_ddp_on_two_gpus_monitor_on_scheduler(lightning_two_gpus: Launch) -> None:
    lightning.test_monitor_given_to_the_scheduler_is_enough_for_lightning(lightning_two_gpus)


@pytest.mark.parametrize("name", ["resume_same_world_size", "resume_from_other_world_size"])
def test_lightning_ddp_on_two_gpus_resume(lightning_two_gpus: Launch, name: str) -> None:
    lightning.test_resume_restores_scheduler_state_on_every_rank_and_continues_as_uninterrupted(
        lightning_two_gpus, name)
