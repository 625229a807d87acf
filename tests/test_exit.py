"""A script whose last collective is ``step()`` exits cleanly on torch.distributed gloo.

torch 2.13's gloo worker thread drops its reference to a finished collective (and so to
the tensors) after ``wait()`` has returned, and needs the GIL to do so. If the main thread
is already shutting the interpreter down, the worker dies in ``std::terminate`` and the
process aborts ("terminate called without an active exception", exit status -6), with or
without ``destroy_process_group()``, whether the scheduler is still alive at exit or not.
Before the fix this happened to about a third of the ranks in ``exit_worker.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.launch import run_torch

WORKER = str(Path(__file__).with_name("exit_worker.py"))


# Each ending twice: a launch is 4 chances at the race, 8 per ending make losing it near-certain
# without the fix (2 of these 4 launches failed with it removed).
@pytest.mark.timeout(180)
@pytest.mark.parametrize("ending", ["kept", "kept", "dropped", "dropped"])
def test_ranks_exit_cleanly_when_step_was_the_last_collective(ending: str) -> None:
    done = run_torch(4, [WORKER, ending], timeout=120)
    assert done.returncode == 0 and "terminate called" not in done.stdout, done.stdout[-3000:]
