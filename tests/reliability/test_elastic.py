"""Elastic training on real processes (see ``tests/reliability/elastic.py``): Horovod elastic
through 2 -> 1 -> 2 ranks and two SIGKILLs (one while the other rank waits in ``step()``),
torchrun restarts after a SIGKILL and a resume at another world size. Every committed epoch must
match torch's own ``ReduceLROnPlateau`` fed the same metrics without interruption; ``bash dev.sh
reliability`` runs longer plans.
"""

from __future__ import annotations

import pytest

from tests.reliability import elastic
from tests.reliability.conftest import ELASTIC, require


@pytest.mark.timeout(240)
def test_horovod_elastic_keeps_the_live_scheduler_in_step_through_resets_and_a_sigkill(tmp_path) -> None:
    require("horovod")
    result = elastic.horovod(tmp_path, elastic.CI_PLAN, timeout=180)
    ELASTIC.append(result)
    assert not result.problems, "\n".join(result.problems[:10])
    # The host killed last may come back during the last epochs, on a slow machine.
    assert result.world_sizes in ([2, 1, 2, 1, 2, 1], [2, 1, 2, 1, 2, 1, 2]), result.world_sizes
    assert result.killed == 2 and result.mismatches == 0
    assert [error for error, _ in result.step_errors] == ["HorovodInternalError"], result.step_errors


@pytest.mark.timeout(240)
def test_torchrun_restarts_and_a_resume_at_another_world_size_continue_the_schedule_exactly(tmp_path) -> None:
    result = elastic.torchrun(tmp_path, elastic.CI_TORCHRUN, timeout=100)
    ELASTIC.append(result)
    assert not result.problems, "\n".join(result.problems[:10])
    assert result.killed == 2 and result.resets == 2 and result.epochs == 10 and result.mismatches == 0
