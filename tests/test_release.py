"""The wheel a user installs, checked from the wheel: ``python -m tests.release_check``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness.launch import ROOT

pytestmark = pytest.mark.timeout(600)


def test_the_wheel_installs_and_works_without_the_checkout() -> None:
    done = subprocess.run([sys.executable, "-m", "tests.release_check"], cwd=ROOT, capture_output=True, text=True,
                          timeout=540)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "release-check: distplateau" in done.stdout
