"""Every contract check of tests/distributed_checks.py, on real ranks of both backends.

One launch per (backend, world size) runs all checks; each check is then its own test here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.launch import Launch, horovodrun_available, launch_log, run_horovod, run_torch
from tests.distributed_checks import CHECKS

SCRIPT = str(Path(__file__).with_name("distributed_checks.py"))
LAUNCH_TIMEOUT = 240
WORLDS = [("torch", 2), ("torch", 3), ("torch", 4), ("horovod", 2), ("horovod", 3)]


@pytest.fixture(scope="module", params=WORLDS, ids=[f"{b}-np{n}" for b, n in WORLDS])
def launch(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Launch:
    """Every check on ``n`` ranks of ``backend``, once for all the tests of that pair."""
    backend, n = request.param
    if backend == "horovod" and not horovodrun_available():
        pytest.fail("Horovod is not installed: run `python -m distplateau.install_horovod`")
    out = tmp_path_factory.mktemp(f"{backend}{n}") / "results.json"
    log = launch_log(run_horovod if backend == "horovod" else run_torch, n, [SCRIPT, backend, str(out)],
                     timeout=LAUNCH_TIMEOUT)
    return Launch(json.loads(out.read_text())["results"] if out.exists() else {}, log)


@pytest.mark.parametrize("name", list(CHECKS))
def test_contract_on_real_ranks(launch: Launch, name: str) -> None:
    errors = [f"rank {r}:\n{e}" for r, e in enumerate(launch.outcome(name)) if e]
    assert not errors, "\n".join(errors)
