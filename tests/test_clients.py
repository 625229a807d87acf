"""The light real-client cases in CI: pytorch-ignite and skorch, each through its own training path
on 2 real ranks (torchrun), with torch's class and ours (``tests/clients/``).

The other libraries' cases need an environment each: ``bash dev.sh clients`` runs them all.
Skipped when the case's library is not installed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.clients.run import Case, run_case

LIGHT = {"ignite": "ignite", "skorch": "skorch"}  # case -> the module its library installs


@pytest.mark.timeout(1200)  # 2 to 4 launches, each under its case's own TIMEOUT
@pytest.mark.parametrize("name", sorted(LIGHT))
def test_light_client_case_baseline_ours_and_resume(name: str, tmp_path: Path) -> None:
    if importlib.util.find_spec(LIGHT[name]) is None:
        pytest.skip(f"{LIGHT[name]} is not installed: pip install '.[test]'")
    case = Case.load(name)
    log = tmp_path / "launches.log"
    row = run_case(case, sys.executable, tmp_path / "out", log)
    assert row.ok, "\n".join(row.problems) + f"\n{log.read_text()[-6000:]}"
