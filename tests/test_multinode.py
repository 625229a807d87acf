"""Two "hosts" on network namespaces, 2 ranks each: the CI-sized part of ``tests/multinode.py``
(the full set, faults and Lightning included, is ``bash dev.sh multinode``).

Skipped where network namespaces cannot be created (not root). Every launch runs under a hard
timeout and every namespace, link and process is gone after each test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.launch import horovodrun_available

from . import multinode, netns

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module", autouse=True)
def namespaces() -> Iterator[None]:
    reason = netns.unavailable()
    if reason:
        pytest.skip(f"multi-node tests run on network namespaces: {reason}")
    yield
    ours = [name for name in os.listdir("/run/netns") if name.startswith(f"{netns.PREFIX}{os.getpid()}-")] \
        if os.path.isdir("/run/netns") else []
    assert not ours, f"namespaces left behind: {ours}"


def test_nodes_reach_each_other_and_their_addresses_exist_only_inside_the_namespaces(tmp_path: Path) -> None:
    probe = "import socket; print(socket.gethostname(), socket.gethostbyname(socket.gethostname()))"
    with netns.network(2) as net:
        a, b = net.nodes
        assert netns.SUBNET not in subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
        server = net.popen(b, [sys.executable, "-c", "import socket; s = socket.create_server(('', 7000)); "
                               "c, _ = s.accept(); c.sendall(c.recv(16))"], log=tmp_path / "server.log")
        client = net.popen(a, [sys.executable, "-c", f"{probe}; import socket, time\n"
                               "for _ in range(100):\n"
                               "    try: c = socket.create_connection(('" + b.address + "', 7000), timeout=1); break\n"
                               "    except OSError: time.sleep(0.05)\n"
                               "c.sendall(b'ping'); print(c.recv(16).decode())"], log=tmp_path / "client.log")
        codes, killed = netns.finish([client, server], 60)
        pids = net.pids(a) + net.pids(b)
    assert (codes, killed) == ([0, 0], False), (tmp_path / "client.log").read_text()
    assert (tmp_path / "client.log").read_text().split() == ["distplateau-node0", a.address, "ping"]
    assert pids == []
    assert not (Path("/run/netns") / a.netns).exists()


def test_every_contract_check_passes_on_2_nodes_of_2_torchrun_ranks(tmp_path: Path) -> None:
    row, results = multinode.contract_checks("torch", tmp_path)
    assert len(results) >= 20, "\n".join(row.problems)
    assert row.ok, "\n".join(row.problems)


def test_horovod_on_2_nodes_places_ranks_and_follows_the_reference_trajectory(tmp_path: Path) -> None:
    if not horovodrun_available():
        pytest.fail("Horovod is not installed: run `python -m distplateau.install_horovod`")
    assert multinode.mean_of_means_would_be_wrong()  # so the exact mean is really checked
    row = multinode.training("horovod", tmp_path)
    assert row.ok, "\n".join(row.problems)


def test_link_down_mid_step_raises_on_every_rank_within_the_timeout_and_a_restart_continues_exactly(
        tmp_path: Path) -> None:
    fault = multinode.faults(full=False)[0]
    row = multinode.measure_fault(fault, tmp_path)
    assert row.ok, "\n".join(row.problems)
    figures = row.figures
    assert figures["raised"] == [0, 1, 2, 3], figures
    assert figures["last_error_s"] < fault.torch_timeout_s + 10, figures
    assert all(m.startswith("TimeoutError: step() on rank N gave up after waiting N s (the process group's timeout)")
               for m in figures["messages"]), figures
    assert figures["restart_ok"] and figures["resumed_at"] == multinode.HOLD_EPOCH, figures


def test_horovod_strategy_node_rank_and_num_nodes_on_hosts_with_1_and_2_slots(tmp_path: Path) -> None:
    if not horovodrun_available():
        pytest.fail("Horovod is not installed: run `python -m distplateau.install_horovod`")
    row = multinode.lightning_horovod_uneven_slots("lightning.pytorch", tmp_path)
    assert row.ok, "\n".join([row.summary, *row.problems])
