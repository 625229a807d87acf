"""Property-based equivalence on real ranks, and faults (c) and (e), batched per launch.

Hypothesis draws the schedules here; one launch per (backend, world size) replays all of them
and then injects every kind of bad input and every kind of altered state on one rank.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability import campaign
from tests.reliability.conftest import RESULTS, require

SEED = 20261125
#: (backend, world size, cases): a CI-sized campaign, about 2 minutes on 2 idle cores.
#: Horovod x3 and x4 wait through the default, bounded path (polled); x2 through Horovod's own
#: blocking wait (DISTPLATEAU_HOROVOD_TIMEOUT_S=0).
WORLDS = [("none", 1, 80), ("torch", 2, 60), ("torch", 3, 60), ("torch", 4, 50),
          ("horovod", 2, 40), ("horovod", 3, 40), ("horovod", 4, 30)]
IDS = [f"{b}-np{w}" for b, w, _ in WORLDS]
ENV = {("horovod", 2): campaign.HOROVOD_NO_LIMIT}


@pytest.fixture(scope="module", params=WORLDS, ids=IDS)
def launched(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> campaign.Result:
    """The whole campaign on one (backend, world size), once for all the tests of that pair."""
    backend, world, count = request.param
    require(backend)
    result = campaign.equivalence(backend, world, count, SEED, tmp_path_factory.mktemp(f"eq-{backend}{world}"),
                                  timeout=300, env=ENV.get((backend, world)))
    RESULTS.append(result)
    return result


@pytest.mark.timeout(420)
def test_every_rank_follows_torch_fed_the_reference_value_after_every_step(launched: campaign.Result) -> None:
    print(f"{launched.name}: {launched.cases} cases, {launched.steps} steps, {launched.mismatches} mismatches")
    assert not launched.problems, "\n".join(launched.problems[:10])
    assert launched.cases > 0 and launched.mismatches == 0


@pytest.mark.timeout(420)
def test_bad_input_on_one_rank_raises_the_same_error_on_every_rank(launched: campaign.Result) -> None:
    kinds = [p for p in launched.fault_problems if p.startswith("bad input")]
    assert not kinds, "\n".join(kinds)
    assert launched.faults >= 20, f"only {launched.faults} faults ran: {launched.problems[:3]}"


@pytest.mark.timeout(420)
@pytest.mark.parametrize("launched", [w for w in WORLDS if w[1] > 1], ids=[i for i in IDS if i != "none-np1"],
                         indirect=True)  # one rank has no other rank to disagree with
def test_state_altered_on_one_rank_makes_the_next_step_fail_on_every_rank(launched: campaign.Result) -> None:
    kinds = [p for p in launched.fault_problems if p.startswith("state altered")]
    assert not kinds, "\n".join(kinds)
    assert launched.faults >= 37, f"only {launched.faults} faults ran: {launched.problems[:3]}"


def test_case_files_are_reproducible_from_the_seed(tmp_path: Path) -> None:
    from tests.reliability.cases import draw_cases

    a, b = draw_cases(3, 5, SEED), draw_cases(3, 5, SEED)
    assert repr(a) == repr(b) and len(a) == 5
