"""Every contract check of tests/distributed_checks.py, on real ranks of both backends.

One launch per (backend, world size) runs all checks; each check is then its own test here.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from harness.launch import horovodrun_available, run_horovod, run_torch

CHECKS = Path(__file__).with_name("distributed_checks.py")
LAUNCH_TIMEOUT = 240
NAMES = [line.split("def ", 1)[1].split("(")[0]
         for line, prev in zip(CHECKS.read_text().splitlines()[1:], CHECKS.read_text().splitlines())
         if prev == "@check"]
WORLDS = [("torch", 2), ("torch", 3), ("torch", 4), ("horovod", 2), ("horovod", 3)]


@pytest.fixture(scope="module")
def launches(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], Any]:
    return {}


def _launch(cache: dict[tuple[str, int], Any], backend: str, n: int, tmp: Path) -> dict[str, Any]:
    if (backend, n) not in cache:
        out = tmp / f"{backend}-{n}.json"
        args = [str(CHECKS), backend, str(out)]
        try:
            proc = (run_horovod if backend == "horovod" else run_torch)(n, args, LAUNCH_TIMEOUT)
            log = proc.stdout
        except subprocess.TimeoutExpired as err:
            log = f"TIMED OUT after {LAUNCH_TIMEOUT}s\n{err.output}"
        results = json.loads(out.read_text())["results"] if out.exists() else {}
        cache[(backend, n)] = (results, log)
    return cache[(backend, n)]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("backend,n", WORLDS, ids=[f"{b}-np{n}" for b, n in WORLDS])
def test_contract_on_real_ranks(backend: str, n: int, name: str, launches: dict, tmp_path_factory) -> None:
    if backend == "horovod" and not horovodrun_available():
        pytest.fail("Horovod is not installed: run `python -m distplateau.install_horovod`")
    results, log = _launch(launches, backend, n, tmp_path_factory.mktemp(f"{backend}{n}"))
    if name not in results:
        pytest.fail(f"check {name} did not finish (hang or crash); launch output:\n{log[-6000:]}")
    errors = [f"rank {r}:\n{e}" for r, e in enumerate(results[name]) if e]
    assert not errors, "\n".join(errors)
