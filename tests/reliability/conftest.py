"""Shared launches for the reliability tests, and the counts they print at the end of the run."""

from __future__ import annotations

from typing import Any

import pytest

from harness.launch import horovodrun_available
from tests.reliability.campaign import Result
from tests.reliability.elastic import Elastic

#: Every Result a reliability test produced in this session, for the terminal summary.
RESULTS: list[Result] = []
#: Likewise for the elastic launches.
ELASTIC: list[Elastic] = []


def require(backend: str) -> None:
    if backend == "horovod" and not horovodrun_available():
        pytest.fail("Horovod is not installed: run `python -m distplateau.install_horovod`")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if ELASTIC:
        terminalreporter.write_sep("-", "elastic")
        for e in ELASTIC:
            terminalreporter.write_line(
                f"{e.name}: {e.epochs} epochs committed, resets survived {e.resets}, workers killed {e.killed}, "
                f"mismatches {e.mismatches}; recovery " + ", ".join(f"{label} {s:.2f}s" for label, s in e.recoveries))
    if not RESULTS:
        return
    cases = sum(r.cases for r in RESULTS)
    faults = sum(r.faults for r in RESULTS)
    mismatches = sum(r.mismatches for r in RESULTS)
    longest = max(r.longest_error_s for r in RESULTS)
    terminalreporter.write_sep("-", "reliability")
    terminalreporter.write_line(f"cases run: {cases}, faults injected: {faults}, mismatches: {mismatches}, "
                                f"longest time to error after a fault: {longest:.2f}s")
