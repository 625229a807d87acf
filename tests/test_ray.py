"""The class swap in a Ray Train ``TorchTrainer`` on 2 CPU workers.

One launch of ``tests/ray_checks.py`` runs every scenario (one local Ray instance, four
``TorchTrainer`` fits); each test compares what the workers saw with torch's own
``ReduceLROnPlateau`` stepped in one process on the exact global mean.

Ray Train is not in the main environment (``ray[train]`` brings its own torch, pandas and
pyarrow: 1.5 GB; a launch takes minutes on 2 cores): ``bash dev.sh ray`` builds ``.venv-ray``
and runs this module there. Elsewhere the tests skip, unless ``DISTPLATEAU_RAY_PYTHON`` names a
Python that has ``ray[train]``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.launch import Launch, child_env, launch_log, run

from .ray_checks import CRASH_AT, SCENARIOS, WORKERS
from .uneven_shards import EPOCHS, RESUME_AT, reference

pytestmark = pytest.mark.timeout(600)

SCRIPT = str(Path(__file__).with_name("ray_checks.py"))
LAUNCH_TIMEOUT = 540
RAY_PYTHON = os.environ.get("DISTPLATEAU_RAY_PYTHON", sys.executable)


def has_ray(python: str) -> bool:
    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('ray') is None)"
    return subprocess.run([python, "-c", code], timeout=60).returncode == 0


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the launch writes: ``driver.json`` and one folder of worker files per scenario."""
    return tmp_path_factory.mktemp("ray")


@pytest.fixture(scope="module")
def launch(out: Path) -> Launch:
    """The driver's outcome of every scenario (a list of one), and the launch's output."""
    if not has_ray(RAY_PYTHON):
        pytest.skip(f"ray[train] is not installed for {RAY_PYTHON}: run `bash dev.sh ray`")
    log = launch_log(run, [RAY_PYTHON, SCRIPT, str(out)], timeout=LAUNCH_TIMEOUT, env=child_env())
    driver = json.loads((out / "driver.json").read_text()) if (out / "driver.json").exists() else {}
    return Launch({name: [seen] for name, seen in driver.items()}, log)


def outcome(launch: Launch, name: str) -> dict[str, Any]:
    """What the driver saw in scenario ``name``; fails on a missing scenario or an error."""
    (seen,) = launch.outcome(name)
    return dict(seen)


def attempts(out: Path, name: str) -> list[list[dict[str, Any]]]:
    """Per worker, what each of its attempts saw, in the order of their first epoch."""
    return [sorted((json.loads(path.read_text()) for path in (out / name).glob(f"rank{rank}-from*.json")),
                   key=lambda attempt: attempt["start"]) for rank in range(WORKERS)]


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_finished_without_error(launch: Launch, name: str) -> None:
    outcome(launch, name)


def test_import_distplateau_imports_no_ray(launch: Launch) -> None:
    assert outcome(launch, "import_distplateau_imports_no_ray") == {"ray_imported_before_ray_init": False}


def test_class_swap_gives_every_worker_the_schedule_of_the_global_mean(launch: Launch, out: Path) -> None:
    assert outcome(launch, "class_swap_follows_global_mean")["checkpoint_epoch"] == EPOCHS
    metrics, lrs = reference([WORKERS] * EPOCHS)
    for (attempt,) in attempts(out, "class_swap_follows_global_mean"):
        assert attempt["backend"] == "TorchGather"  # Ray Train's process group, found by backend="auto"
        assert attempt["lrs"] == lrs
        assert attempt["metrics"] == metrics  # the NaN epoch included: rank 1's NaN is dropped


def test_new_run_of_the_same_name_resumes_from_the_reported_checkpoint(launch: Launch, out: Path) -> None:
    seen = outcome(launch, "resume_from_checkpoint")
    assert (seen["first_checkpoint_epoch"], seen["checkpoint_epoch"]) == (RESUME_AT, EPOCHS)
    metrics, lrs = reference([WORKERS] * EPOCHS)
    for first, resumed in attempts(out, "resume_from_checkpoint"):
        assert (first["start"], first["lrs"]) == (0, lrs[:RESUME_AT])
        assert resumed["start"] == RESUME_AT
        assert (resumed["lrs"], resumed["metrics"]) == (lrs[RESUME_AT:], metrics[RESUME_AT:])


def test_worker_failure_restores_from_the_latest_checkpoint_on_the_same_schedule(launch: Launch, out: Path) -> None:
    seen = outcome(launch, "worker_failure_restores_from_checkpoint")
    assert seen["crashed"] and seen["checkpoint_epoch"] == EPOCHS
    lrs = reference([WORKERS] * EPOCHS)[1]
    for before, after in attempts(out, "worker_failure_restores_from_checkpoint"):
        assert before["start"] == 0 and before["lrs"] == lrs[:len(before["lrs"])]
        # Ray restores the latest checkpoint its controller had registered when the worker died:
        # the one of the last epoch or an earlier one, never a later one.
        assert 0 < after["start"] <= CRASH_AT and after["start"] <= len(before["lrs"])
        assert after["lrs"] == lrs[after["start"]:]
