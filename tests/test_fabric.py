"""The class swap in a Lightning Fabric loop, on real ranks, once per Fabric package
(``lightning.fabric`` and ``lightning_fabric``).

Three launches of ``tests/fabric_checks.py`` per package, each running many scenarios:
``strategy="ddp"`` on 2 ranks (it also saves a checkpoint at world size 2), one process (it
resumes that checkpoint and saves one at world size 1) and ``strategy="ddp_spawn"`` on 2 ranks
(it resumes the world-size-1 checkpoint). Every rank's learning rates are compared with
torch's own ``ReduceLROnPlateau`` stepped in one process on the exact global mean, computed
here from the scripted per-sample losses.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest

from harness.launch import Launch, child_env, free_port, launch_log, rank_results, run

from .fabric_checks import LAUNCHES, SCENARIOS
from .uneven_shards import EPOCHS, NAN_EPOCH, RESUME_AT, reference, same, schedule, shard_losses

pytestmark = pytest.mark.timeout(3 * 180 + 60)  # a package's three launches, each under LAUNCH_TIMEOUT

SCRIPT = str(Path(__file__).with_name("fabric_checks.py"))
LAUNCH_TIMEOUT = 180


@pytest.fixture(scope="module", params=[
    pytest.param(name, marks=pytest.mark.skipif(importlib.util.find_spec(name.split(".")[0]) is None,
                                                reason=f"{name} is not installed"))
    for name in ("lightning.fabric", "lightning_fabric")])
def fabric_package(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def launch(kind: str, out: Path, package: str, checkpoint: str = "") -> Launch:
    cmd = [sys.executable, SCRIPT, kind, str(out), package, *([checkpoint] if checkpoint else [])]
    log = launch_log(run, cmd, timeout=LAUNCH_TIMEOUT, env=child_env({"MASTER_PORT": str(free_port())}))
    return Launch(rank_results(out, 1 if kind == "single" else 2), log)


def saved_path(launch: Launch, name: str) -> str:
    """Where scenario ``name`` of ``launch`` saved its checkpoint ("" if it did not)."""
    return (launch.results.get(name, [None])[0] or {}).get("path", "")


@pytest.fixture(scope="module")
def launches(fabric_package: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Launch]:
    """The package's three launches, kind -> Launch, in the order their checkpoints need: 2 ranks
    (``ddp``) save for 1 process, which (``single``) saves for 2 ranks (``ddp_spawn``)."""
    def out(kind: str) -> Path:
        return tmp_path_factory.mktemp(f"fabric-{kind}-{fabric_package}")

    ddp = launch("ddp", out("ddp"), fabric_package)
    single = launch("single", out("single"), fabric_package, saved_path(ddp, "save_for_world_size_1"))
    ddp_spawn = launch("ddp_spawn", out("spawn"), fabric_package, saved_path(single, "save_for_world_size_2"))
    return {"ddp": ddp, "single": single, "ddp_spawn": ddp_spawn}


@pytest.fixture
def ddp(launches: dict[str, Launch]) -> Launch:
    return launches["ddp"]


def test_the_reference_needs_every_rank_weighted_and_the_nan_dropped() -> None:
    """The scripted losses tell the recipes apart: otherwise the tests below could not fail."""
    metrics, lrs = reference([2] * EPOCHS)
    locals_ = [[sum(losses) / len(losses) for losses in shard_losses(e, 2)] for e in range(EPOCHS)]
    assert lrs != schedule([rank0 for rank0, _ in locals_]) and lrs != schedule([rank1 for _, rank1 in locals_])
    assert lrs != schedule([(rank0 + rank1) / 2 for rank0, rank1 in locals_])
    assert lrs != schedule([math.nan if e == NAN_EPOCH else m for e, m in enumerate(metrics)])


@pytest.mark.parametrize("kind", [k for k, names in LAUNCHES.items() if "class_swap_follows_global_mean" in names])
def test_class_swap_gives_every_rank_the_schedule_of_the_global_mean(launches: dict[str, Launch], kind: str) -> None:
    metrics, lrs = reference([2] * EPOCHS)
    for rank in launches[kind].outcome("class_swap_follows_global_mean"):
        assert rank["backend"] == "TorchGather"  # Fabric's default process group, found by backend="auto"
        assert rank["lrs"] == lrs
        assert same(rank["metrics"], metrics)


def test_scheduler_built_on_the_optimizer_before_fabric_setup_drives_it(ddp: Launch) -> None:
    for rank in ddp.outcome("scheduler_built_before_setup"):
        assert rank["lrs"] == reference([2] * EPOCHS)[1]


def test_plain_scheduler_on_the_local_metric_lets_ranks_and_weights_diverge(ddp: Launch) -> None:
    ranks = ddp.outcome("plain_scheduler_on_local_metric")
    for r, rank in enumerate(ranks):
        assert rank["lrs"] == schedule([sum(s) / len(s) for s in (shard_losses(e, 2)[r] for e in range(EPOCHS))])
    assert ranks[0]["lrs"] != ranks[1]["lrs"]
    assert ranks[0]["weights"] != ranks[1]["weights"]  # DDP averages gradients, each rank applies its own lr


def test_all_reduce_mean_then_plain_scheduler_follows_the_mean_of_rank_means(ddp: Launch) -> None:
    mean_of_means = [sum(sum(s) / len(s) for s in shard_losses(e, 2)) / 2 for e in range(EPOCHS)]
    for rank in ddp.outcome("all_reduce_mean_then_plain"):
        assert same(rank["metrics"], mean_of_means)  # NaN on every rank at NAN_EPOCH
        assert rank["lrs"] == schedule(mean_of_means) != reference([2] * EPOCHS)[1]


def test_all_reduce_sum_and_count_is_the_global_mean_until_a_nan_poisons_it(ddp: Launch) -> None:
    metrics = reference([2] * EPOCHS)[0]
    poisoned = [math.nan if e == NAN_EPOCH else m for e, m in enumerate(metrics)]
    for rank in ddp.outcome("all_reduce_sum_and_count_then_plain"):
        assert same(rank["metrics"], poisoned)
        assert rank["lrs"] == schedule(poisoned) != reference([2] * EPOCHS)[1]


def test_setup_dataloaders_repeats_a_validation_sample_and_sharding_by_index_does_not(ddp: Launch) -> None:
    ranks = ddp.outcome("padded_sampler_repeats_samples")
    padded = sorted(i for rank in ranks for i in rank["setup_dataloaders"]["indices"])
    sharded = sorted(i for rank in ranks for i in rank["shard_by_index"]["indices"])
    assert padded == [0, 0, 1, 2, 3, 4, 5, 6] and sharded == list(range(7))
    true_mean = (1 + 2 + 3 + 4 + 5 + 6 + 100) / 7
    for rank in ranks:
        assert rank["shard_by_index"]["global_metric"] == pytest.approx(true_mean, rel=1e-12)
        assert rank["setup_dataloaders"]["global_metric"] == pytest.approx((true_mean * 7 + 1) / 8, rel=1e-12)


def test_resume_at_the_same_world_size_continues_the_schedule_and_the_training(ddp: Launch) -> None:
    uninterrupted = ddp.outcome("class_swap_follows_global_mean")
    metrics, lrs = reference([2] * EPOCHS)
    for r, rank in enumerate(ddp.outcome("resume_same_world_size")):
        assert rank["lrs"] == lrs[RESUME_AT:]
        assert same(rank["metrics"], metrics[RESUME_AT:])
        assert rank["weights"] == uninterrupted[r]["weights"]
        assert rank["scheduler"] == uninterrupted[r]["scheduler"]


def test_checkpoint_of_2_ranks_resumes_in_1_process(launches: dict[str, Launch]) -> None:
    ddp, single = launches["ddp"], launches["single"]
    worlds = [2] * RESUME_AT + [1] * (EPOCHS - RESUME_AT)
    metrics, lrs = reference(worlds)
    for rank in ddp.outcome("save_for_world_size_1"):
        assert rank["lrs"] == lrs[:RESUME_AT]
    (resumed,) = single.outcome("resume_from_world_size_2")
    assert resumed["lrs"] == lrs[RESUME_AT:]
    assert same(resumed["metrics"], metrics[RESUME_AT:])  # NaN at NAN_EPOCH: the one process's whole shard


def test_checkpoint_of_1_process_resumes_on_2_ranks(launches: dict[str, Launch]) -> None:
    single, ddp_spawn = launches["single"], launches["ddp_spawn"]
    worlds = [1] * RESUME_AT + [2] * (EPOCHS - RESUME_AT)
    metrics, lrs = reference(worlds)
    (saved,) = single.outcome("save_for_world_size_2")
    assert saved["lrs"] == lrs[:RESUME_AT]
    for rank in ddp_spawn.outcome("resume_from_world_size_1"):
        assert rank["lrs"] == lrs[RESUME_AT:]
        assert same(rank["metrics"], metrics[RESUME_AT:])


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_finished_without_error_on_every_rank(name: str, launches: dict[str, Launch]) -> None:
    for kind, names in LAUNCHES.items():
        if name in names:
            launches[kind].outcome(name)


@pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="lightning is not installed")
def test_example_resumed_from_its_checkpoint_prints_what_an_uninterrupted_run_prints(tmp_path: Path) -> None:
    example = str(Path(__file__).resolve().parent.parent / "examples" / "fabric_ddp.py")

    def epochs(until: int, checkpoint: Path) -> list[tuple[str, ...]]:
        proc = run([sys.executable, example, "--epochs", str(until), "--checkpoint", str(checkpoint)],
                   LAUNCH_TIMEOUT, child_env({"MASTER_PORT": str(free_port())}))
        assert proc.returncode == 0, proc.stdout[-6000:]
        # (epoch, rank, global val loss, lr); the two ranks' lines may interleave in the pipe
        return sorted(re.findall(r"rank (\d) epoch (\d+): global val loss ([0-9.]+), lr ([0-9.e-]+)", proc.stdout),
                      key=lambda line: (int(line[1]), line[0]))

    whole = epochs(8, tmp_path / "whole.ckpt")
    resumed = epochs(4, tmp_path / "resumed.ckpt") + epochs(8, tmp_path / "resumed.ckpt")
    assert [(int(epoch), rank) for rank, epoch, _, _ in whole] == [(e, r) for e in range(8) for r in "01"]
    assert resumed == whole
    per_epoch: dict[str, set[tuple[str, str]]] = {}
    for _, epoch, loss, lr in whole:
        per_epoch.setdefault(epoch, set()).add((loss, lr))
    assert all(len(seen) == 1 for seen in per_epoch.values())  # both ranks: the same global loss and lr
    assert len({lr for *_, lr in whole}) > 1  # the schedule reduced the learning rate, so resuming it is tested
