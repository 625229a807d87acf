"""Multi-node runs on network namespaces: scenarios, network faults, and their summary table.

    python -m tests.multinode                  # everything, ~15 min on 2 cores (bash dev.sh multinode)
    python -m tests.multinode --only fault     # scenarios whose name contains "fault"
    python -m tests.multinode --json rows.json

Every scenario runs 2 nodes x 2 ranks on the namespaces of ``tests/netns.py`` (root only), each
launch under a hard timeout, and tears everything down afterwards. ``tests/test_multinode.py``
runs the CI-sized part through the same functions.

Launchers, as a user runs them on two hosts:

- torch.distributed: ``torchrun --nnodes 2 --nproc-per-node 2 --node-rank N --master-addr
  <node 0> --master-port P`` on each node (static rendezvous), ``GLOO_SOCKET_IFNAME=dpnet0``;
  also once with the c10d rendezvous backend;
- Horovod: ``horovodrun -np 4 -H <node 0>:2,<node 1>:2 --gloo --network-interface dpnet0`` on
  node 0, which starts node 1's ranks over ssh -- here a stand-in ``ssh`` that runs the command
  in node 1's namespace (``Network.ssh_stand_in``); also once without horovodrun, Horovod's
  rendezvous server started by hand and each rank given horovodrun's environment
  (:func:`start_horovod_direct`);
- Lightning: ``Trainer(strategy="ddp", num_nodes=2, devices=2)`` under the same torchrun, and
  ``Trainer(strategy="horovod")`` under the same horovodrun.

A fault scenario holds the ranks of node 1 just before their ``step()`` of epoch 3 (the other
ranks are then waiting inside it), injects the fault, and measures on every surviving rank
whether and when it raised, and with what; then it restarts the job from the last checkpoint
on a repaired network and checks that the learning-rate trajectory continues exactly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from harness.launch import child_env, horovodrun_available, kill_group
from tests import multinode_worker as worker
from tests.netns import PREFIX, Network, Node, Unsupported, finish, netem_available, network, unavailable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "multinode_worker.py"
LIGHTNING_WORKER = HERE / "multinode_lightning_worker.py"
CHECKS = HERE / "multinode_checks_worker.py"  # tests/distributed_checks.py, ending with a barrier
MASTER_PORT = 29500  # each namespace has its own ports: no clash with anything on the machine
EPOCHS = 8
HOLD_EPOCH = 3  # the fault hits the step of this epoch
LAUNCH_TIMEOUT = 240.0


@dataclass
class Row:
    """One line of the summary table."""

    name: str
    ok: bool
    summary: str = ""
    problems: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0


# ------------------------------------------------------------------ launching


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The ranks' environment: the repository importable, one thread per rank, gloo on the nodes'
    interface."""
    return child_env({"GLOO_SOCKET_IFNAME": "dpnet0", **(extra or {})})


def start_torchrun(net: Network, nodes: Sequence[Node], nproc: int, argv: Sequence[str], logs: Path,
                   extra_env: dict[str, str] | None = None, c10d: bool = False) -> list[subprocess.Popen[bytes]]:
    """``torchrun`` on each of ``nodes``: static rendezvous at the first one's address, or with
    ``c10d`` the c10d rendezvous backend hosted there (which node becomes group rank 0 is then
    torchrun's choice)."""
    procs = []
    for node_rank, node in enumerate(nodes):
        if c10d:
            rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{nodes[0].address}:{MASTER_PORT}",
                          "--rdzv-id", "distplateau"]
        else:
            rendezvous = ["--node-rank", str(node_rank), "--master-addr", nodes[0].address,
                          "--master-port", str(MASTER_PORT)]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(nodes)), "--nproc-per-node",
               str(nproc), *rendezvous, "--max-restarts", "0", *argv]
        procs.append(net.popen(node, cmd, log=logs / f"node{node.index}.log", env=env(extra_env), cwd=ROOT))
    return procs


def start_horovodrun(net: Network, slots: Sequence[tuple[Node, int]], argv: Sequence[str], logs: Path,
                     extra_env: dict[str, str] | None = None,
                     gloo_timeout_s: int | None = 60) -> list[subprocess.Popen[bytes]]:
    """``horovodrun`` on the first node, starting the others' ranks through the ssh stand-in.
    ``gloo_timeout_s``: ``--gloo-timeout-seconds`` (``None``: horovodrun's default, 30 s)."""
    bin_dir = logs / "bin"
    bin_dir.mkdir(exist_ok=True)
    net.ssh_stand_in(bin_dir)
    path = os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    hosts = ",".join(f"{node.address}:{n}" for node, n in slots)
    cmd = [os.path.join(os.path.dirname(sys.executable), "horovodrun"), "-np", str(sum(n for _, n in slots)),
           "-H", hosts, "--gloo", "--disable-cache",
           # with every host local horovodrun insists on the loopback interface
           *(["--network-interface", "dpnet0"] if len(slots) > 1 else []),
           *(["--gloo-timeout-seconds", str(gloo_timeout_s)] if gloo_timeout_s else []), sys.executable, *argv]
    return [net.popen(slots[0][0], cmd, log=logs / "horovodrun.log", env=env({"PATH": path, **(extra_env or {})}),
                      cwd=ROOT)]


def serve_rendezvous() -> None:
    """``python -c "from tests.multinode import serve_rendezvous; serve_rendezvous()" HOSTS SIZE PORT_FILE``:
    Horovod's gloo rendezvous server, what horovodrun runs for its ranks; writes its port to
    ``PORT_FILE`` and serves until killed."""
    from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts
    from horovod.runner.http.http_server import RendezvousServer

    hosts, size, port_file = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    server = RendezvousServer()
    port = server.start()
    server.init(get_host_assignments(parse_hosts(hosts), size))
    port_file.with_suffix(".tmp").write_text(str(port))
    os.replace(port_file.with_suffix(".tmp"), port_file)
    while True:
        time.sleep(60)


def start_horovod_direct(net: Network, slots: Sequence[tuple[Node, int]], argv: Sequence[str], logs: Path,
                         extra_env: dict[str, str] | None = None) -> list[subprocess.Popen[bytes]]:
    """Horovod without horovodrun (and without ssh): Horovod's rendezvous server on the first
    node, and every rank started on its node with the environment horovodrun would give it.
    Returns the ranks; the server ends with the network."""
    from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts

    hosts = ",".join(f"{node.address}:{n}" for node, n in slots)
    size = sum(n for _, n in slots)
    port_file = logs / "rendezvous-port"
    net.popen(slots[0][0], [sys.executable, "-c", "from tests.multinode import serve_rendezvous; serve_rendezvous()",
                            hosts, str(size), str(port_file)], log=logs / "rendezvous.log", env=env(), cwd=ROOT)
    end = time.monotonic() + 60
    while not port_file.exists() and time.monotonic() < end:
        time.sleep(0.05)
    if not port_file.exists():
        raise RuntimeError(f"the rendezvous server did not start:\n{log_tail(logs)}")
    by_address = {node.address: node for node, _ in slots}
    procs = []
    for slot in get_host_assignments(parse_hosts(hosts), size):
        rank_env = {
            "HOROVOD_GLOO_RENDEZVOUS_ADDR": slots[0][0].address, "HOROVOD_GLOO_RENDEZVOUS_PORT": port_file.read_text(),
            "HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo", "HOROVOD_GLOO_IFACE": "dpnet0",
            "HOROVOD_HOSTNAME": slot.hostname, "HOROVOD_RANK": str(slot.rank), "HOROVOD_SIZE": str(slot.size),
            "HOROVOD_LOCAL_RANK": str(slot.local_rank), "HOROVOD_LOCAL_SIZE": str(slot.local_size),
            "HOROVOD_CROSS_RANK": str(slot.cross_rank), "HOROVOD_CROSS_SIZE": str(slot.cross_size),
            **(extra_env or {})}
        procs.append(net.popen(by_address[slot.hostname], [sys.executable, *argv], log=logs / f"rank{slot.rank}.log",
                               env=env(rank_env), cwd=ROOT))
    return procs


def start(net: Network, launcher: str, slots: Sequence[tuple[Node, int]], argv: Sequence[str], logs: Path,
          extra_env: dict[str, str] | None = None, gloo_timeout_s: int | None = 60) -> list[subprocess.Popen[bytes]]:
    """``argv`` on ``slots`` (node, ranks on it) with ``"torch"`` (torchrun per node, the same
    number of ranks on each; ``"torch-c10d"``: with the c10d rendezvous), ``"horovod"`` (one
    horovodrun) or ``"horovod-direct"`` (:func:`start_horovod_direct`)."""
    if launcher in ("torch", "torch-c10d"):
        assert len({n for _, n in slots}) == 1, "torchrun starts the same number of ranks on every node"
        return start_torchrun(net, [node for node, _ in slots], slots[0][1], argv, logs, extra_env,
                              c10d=launcher == "torch-c10d")
    if launcher == "horovod-direct":
        return start_horovod_direct(net, slots, argv, logs, extra_env)
    return start_horovodrun(net, slots, argv, logs, extra_env, gloo_timeout_s)


def log_tail(logs: Path, chars: int = 6000) -> str:
    text = "".join(f"--- {p.name} ---\n{p.read_text(errors='replace')}" for p in sorted(logs.glob("*.log")))
    return text[-chars:]


def ranks(out: Path) -> dict[int, dict[str, Any]]:
    found = {}
    for path in out.glob("rank*.json"):
        found[int(path.stem[4:])] = json.loads(path.read_text())
    return found


# ------------------------------------------------------------------ checks


def check_training(records: dict[int, dict[str, Any]], world: int, nodes: int, epochs: int = EPOCHS,
                   first_records: dict[int, dict[str, Any]] | None = None, node_order: bool = True) -> list[str]:
    """Every rank ran where it should and followed the reference trajectory exactly; with
    ``first_records`` (an interrupted run) the epochs before the resume come from there.
    ``node_order=False``: node ``k`` need not hold ranks ``k * per_node, ...``, only one node
    each block of ranks."""
    problems = []
    if sorted(records) != list(range(world)):
        return [f"ranks that wrote a record: {sorted(records)}, expected 0-{world - 1}"]
    per_node = world // nodes
    expected = worker.reference(epochs, world)
    hosts = [records[block * per_node]["hostname"] for block in range(nodes)]
    if len(set(hosts)) != nodes:
        problems.append(f"the blocks of {per_node} ranks ran on {hosts}, expected {nodes} different nodes")
    for rank, rec in sorted(records.items()):
        node = rank // per_node if node_order else int(rec["hostname"].removeprefix("distplateau-node"))
        if rec["hostname"] != f"distplateau-node{node}" or rec["hostname"] != hosts[rank // per_node]:
            problems.append(f"rank {rank} ran on {rec['hostname']}, expected distplateau-node{node}")
        if rec["local_rank"] != rank % per_node or rec["local_size"] != per_node:
            problems.append(f"rank {rank}: local rank {rec['local_rank']} of {rec['local_size']}, "
                            f"expected {rank % per_node} of {per_node}")
        if "node" in rec and rec["node"] != rank // per_node:
            problems.append(f"rank {rank}: GROUP_RANK {rec['node']}, expected {node}")
        if "cross_rank" in rec and (rec["cross_rank"], rec["cross_size"]) != (node, nodes):
            problems.append(f"rank {rank}: Horovod cross rank {rec['cross_rank']} of {rec['cross_size']}, "
                            f"expected {node} of {nodes}")
        if rec.get("error"):
            problems.append(f"rank {rank} raised {rec['error']['type']}: {rec['error']['message'][:300]}")
            continue
        seen = list(rec["epochs"])
        if first_records is not None:
            before = [e for e in first_records.get(rank, {}).get("epochs", []) if e["epoch"] < rec["first_epoch"]]
            seen = before + seen
        got = [{k: e[k] for k in ("epoch", "lr", "global", "state")} for e in seen]
        if got != expected:
            bad = next((g, w) for g, w in zip(got + [None] * epochs, expected) if g != w)
            problems.append(f"rank {rank}: trajectory differs from the reference at {bad[1]['epoch']}: "
                            f"got {bad[0]}, expected {bad[1]}")
        if not rec.get("weights_same_everywhere"):
            problems.append(f"rank {rank}: model weights differ across ranks")
    weights = {repr(rec.get("weights")) for rec in records.values()}
    if len(weights) != 1:
        problems.append(f"{len(weights)} different final weights across ranks")
    return problems


def mean_of_means_would_be_wrong() -> bool:
    """The scripted shards are uneven enough that the ranks' plain mean of their means is not
    the global mean the checks expect."""
    means = [worker.shard_metric(0, r, 4)[0] for r in range(4)]
    return not math.isclose(math.fsum(means) / 4, worker.global_metric(0, 4), rel_tol=1e-9)


# ------------------------------------------------------------------ scenarios


def training(launcher: str, tmp: Path, *, bench: int = 0, nodes: int = 2) -> Row:
    """The plain loop on ``nodes`` x ``4 / nodes`` ranks, launched with ``launcher`` (see
    :func:`start`): placement, exact weighted mean on uneven shards, the reference trajectory
    and identical weights on every rank. ``nodes=1`` is the same 4 ranks on one node, for the
    step cost across nodes; ``bench`` times that many more steps."""
    name = f"training, {launcher}, {nodes} node{'s' * (nodes > 1)} x {4 // nodes} ranks"
    if launcher == "horovod-direct":
        name += " (own rendezvous server, no horovodrun)"
    if launcher == "torch-c10d":
        name += " (c10d rendezvous)"
    t0 = time.monotonic()
    out = tmp / f"training-{launcher}-{nodes}"
    out.mkdir(parents=True)
    backend = "horovod" if launcher.startswith("horovod") else "torch"
    argv = [str(WORKER), backend, str(out), "--epochs", str(EPOCHS)] + (["--bench", str(bench)] if bench else [])
    with network(2) as net:
        procs = start(net, launcher, [(node, 4 // nodes) for node in net.nodes[:nodes]], argv, out)
        codes, killed = finish(procs, LAUNCH_TIMEOUT)
    records = ranks(out)
    problems = check_training(records, 4, nodes, node_order=launcher != "torch-c10d")
    if killed:
        problems.insert(0, f"launch killed after {LAUNCH_TIMEOUT:.0f}s (hang)")
    elif any(codes):
        problems.insert(0, f"launcher exit codes {codes}")
    if problems:
        problems.append(log_tail(out))
    figures: dict[str, Any] = {}
    if bench and records:
        figures["step_us_median"] = max(r.get("bench_us", {}).get("median", math.nan) for r in records.values())
        figures["step_us_p90"] = max(r.get("bench_us", {}).get("p90", math.nan) for r in records.values())
    summary = "placement, exact mean on uneven shards, reference LR trajectory, identical weights"
    return Row(name, not problems, summary, problems, figures, time.monotonic() - t0)


def contract_checks(backend: str, tmp: Path) -> tuple[Row, dict[str, list[str | None]]]:
    """Every check of ``tests/distributed_checks.py`` on 2 nodes x 2 ranks. Returns the row and
    the per-check results (check name -> per-rank errors)."""
    t0 = time.monotonic()
    out = tmp / f"checks-{backend}"
    out.mkdir(parents=True)
    result = out / "results.json"
    argv = [str(CHECKS), backend, str(result)]
    with network(2) as net:
        procs = start(net, backend, [(node, 2) for node in net.nodes], argv, out)
        codes, killed = finish(procs, LAUNCH_TIMEOUT)
    results = json.loads(result.read_text())["results"] if result.exists() else {}
    failed = sorted(name for name, errors in results.items() if any(errors))
    problems = [f"{name}: {next(e for e in results[name] if e)[-800:]}" for name in failed]
    if killed or any(codes) or not results:
        problems.insert(0, f"launch {'killed (hang)' if killed else f'exit codes {codes}'}; {len(results)} checks ran")
        problems.append(log_tail(out))
    name = f"contract checks, {backend}, 2 nodes x 2 ranks"
    row = Row(name, not problems, f"{len(results) - len(failed)}/{len(results)} checks pass", problems,
              {"checks": len(results)}, time.monotonic() - t0)
    return row, results


# ------------------------------------------------------------------ Lightning


def _lightning_checks(records: dict[int, dict[str, Any]], world: int, per_node: int, strategy: str) -> list[str]:
    from tests import multinode_lightning_worker as lw

    problems = []
    if sorted(records) != list(range(world)):
        return [f"ranks that wrote a record: {sorted(records)}, expected 0-{world - 1}"]
    for rank, rec in sorted(records.items()):
        if rec.get("error"):
            problems.append(f"rank {rank}: {rec['error'][-1500:]}")
            continue
        node = rank // per_node
        where = (rec["hostname"], rec["node_rank"], rec["local_rank"], rec["world_size"])
        if where != (f"distplateau-node{node}", node, rank % per_node, world):
            problems.append(f"rank {rank}: (hostname, node_rank, local_rank, world_size) = {where}, expected "
                            f"{(f'distplateau-node{node}', node, rank % per_node, world)}")
        if strategy == "ddp" and rec["cluster_environment"] != "TorchElasticEnvironment":
            problems.append(f"rank {rank}: cluster environment {rec['cluster_environment']}")
        if strategy == "horovod" and not rec["strategy"].endswith("HorovodStrategy"):
            problems.append(f"rank {rank}: strategy {rec['strategy']}")
    if problems:
        return problems
    first = records[0]
    for rank, rec in records.items():
        for key in ("lrs", "globals", "state", "weights", "restored"):
            if rec[key] != first[key]:
                problems.append(f"rank {rank}: {key} {rec[key]} differs from rank 0's {first[key]}")
    epochs = len(first["globals"])
    if first["globals"] != lw.GLOBAL[-epochs:]:
        problems.append(f"global metrics {first['globals']}, expected the exact means {lw.GLOBAL[-epochs:]}")
    if first["lrs"] != lw.expected_lrs()[-epochs:]:
        problems.append(f"learning rates {first['lrs']}, expected {lw.expected_lrs()[-epochs:]}")
    return problems


def lightning(strategy: str, package: str, tmp: Path) -> Row:
    """A Lightning fit on 2 nodes x 2 ranks, then its epoch-2 checkpoint resumed on 1 node x 2
    ranks: placement, exact mean on uneven shards, the reference learning rates, identical
    weights, and the resumed run ending where the uninterrupted one did."""
    name = f"Lightning {strategy}, {package}, 2 nodes x 2 ranks, resumed on 1 node x 2"
    t0 = time.monotonic()
    a, b = tmp / "two-nodes", tmp / "one-node"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    extra = {"DISTPLATEAU_LIGHTNING_PACKAGE": package}
    problems: list[str] = []
    with network(2) as net:
        per_node = ["--num-nodes", "2", "--devices", "2"] if strategy == "ddp" else []
        procs = start(net, "torch" if strategy == "ddp" else "horovod", [(node, 2) for node in net.nodes],
                      [str(LIGHTNING_WORKER), strategy, str(a), *per_node], a, extra)
        codes, killed = finish(procs, LAUNCH_TIMEOUT)
        if killed or any(codes):
            problems.append(f"2-node fit: exit codes {codes}, killed: {killed}")
        problems += [f"2-node fit: {p}" for p in _lightning_checks(ranks(a), 4, 2, strategy)]
        ckpt = a / "ckpt" / "epoch=2.ckpt"
        one = ["--num-nodes", "1", "--devices", "2"] if strategy == "ddp" else []
        procs = start(net, "torch" if strategy == "ddp" else "horovod", [(net.nodes[0], 2)],
                      [str(LIGHTNING_WORKER), strategy, str(b), *one, "--ckpt", str(ckpt)], b, extra)
        codes, killed = finish(procs, LAUNCH_TIMEOUT)
    if killed or any(codes):
        problems.append(f"1-node resume: exit codes {codes}, killed: {killed}")
    resumed = ranks(b)
    problems += [f"1-node resume: {p}" for p in _lightning_checks(resumed, 2, 2, strategy)]
    uninterrupted = ranks(a).get(0, {}).get("state")
    if resumed.get(0, {}).get("state") != uninterrupted:
        problems.append(f"1-node resume ends in {resumed.get(0, {}).get('state')}, the uninterrupted 2-node run "
                        f"in {uninterrupted}")
    if problems:
        problems.append(log_tail(a) + log_tail(b))
    summary = "node/local ranks, exact mean on uneven shards, reference LRs, same weights; resume 2 -> 1 node exact"
    return Row(name, not problems, summary, problems, {}, time.monotonic() - t0)


def lightning_horovod_uneven_slots(package: str, tmp: Path) -> Row:
    """``strategy="horovod"`` on 1 + 2 slots (``-H a:1,b:2``): each rank's ``trainer.node_rank``
    names its node and ``trainer.num_nodes`` is 2 (before issue 20: rank 2 said node 0, and
    every rank said 1 node)."""
    name = f"Lightning horovod, {package}, node_rank and num_nodes on 1 + 2 slots"
    t0 = time.monotonic()
    with network(2) as net:
        procs = start(net, "horovod", [(net.nodes[0], 1), (net.nodes[1], 2)],
                      [str(LIGHTNING_WORKER), "horovod", str(tmp), "--epochs", "1"], tmp,
                      {"DISTPLATEAU_LIGHTNING_PACKAGE": package})
        codes, killed = finish(procs, LAUNCH_TIMEOUT)
    records = ranks(tmp)
    seen = {r: (rec.get("hostname"), rec.get("node_rank"), rec.get("local_rank"), rec.get("num_nodes"))
            for r, rec in sorted(records.items())}
    want = {0: ("distplateau-node0", 0, 0, 2), 1: ("distplateau-node1", 1, 0, 2), 2: ("distplateau-node1", 1, 1, 2)}
    figures = {"seen": seen}
    if killed or any(codes) or len(records) != 3:
        return Row(name, False, "the fit failed", [f"exit codes {codes}, killed: {killed}\n{log_tail(tmp)}"],
                   figures, time.monotonic() - t0)
    if seen != want:
        return Row(name, False, "node_rank or num_nodes wrong", [
            f"(hostname, node_rank, local_rank, num_nodes) per rank: {seen}, expected {want}"], figures,
            time.monotonic() - t0)
    return Row(name, True, "node_rank and num_nodes right on every rank (0; 1, 1 of 2 nodes)", [], figures,
               time.monotonic() - t0)


# ------------------------------------------------------------------ faults


@dataclass
class Fault:
    """A fault on node 1 while the ranks of node 0 wait inside ``step()``."""

    name: str
    kind: str  # link-down, link-flap, loss, rate, delay, freeze, freeze-thaw
    backend: str
    torch_timeout_s: float = 10.0
    horovod_timeout_s: float | None = 10.0  # DISTPLATEAU_HOROVOD_TIMEOUT_S; None: unset (the default, 30 min)
    # horovodrun runs with its default --gloo-timeout-seconds (30 s), what a user gets
    amount: float = 0.0  # loss fraction, kbit/s, delay ms, or seconds of a flap / freeze
    expect_error: bool = True
    cap_s: float = 90.0  # longest wait after the fault before the launch is killed as hung


def _inject(net: Network, fault: Fault) -> Callable[[], object]:
    """Apply ``fault`` to node 1 now; returns what repairs the network afterwards."""
    node = net.nodes[1]
    if fault.kind in ("link-down", "link-flap"):
        net.link(node, up=False)
        if fault.kind == "link-flap":
            time.sleep(fault.amount)
            net.link(node, up=True)
        return lambda: net.link(node, up=True)
    if fault.kind in ("loss", "rate", "delay"):
        kwargs = {"loss": {"loss": fault.amount}, "rate": {"rate_kbit": int(fault.amount)},
                  "delay": {"delay_ms": fault.amount}}[fault.kind]
        net.impair(node, **kwargs)  # type: ignore[arg-type]
        return lambda: net.clear(node)
    if fault.kind in ("freeze", "freeze-thaw"):
        net.signal(node, signal.SIGSTOP)
        if fault.kind == "freeze-thaw":
            time.sleep(fault.amount)
            net.signal(node, signal.SIGCONT)
        return lambda: net.signal(node, signal.SIGKILL)
    raise ValueError(f"unknown fault kind {fault.kind!r}")


def _launch(net: Network, fault: Fault, out: Path, extra: Sequence[str]) -> list[subprocess.Popen[bytes]]:
    argv = [str(WORKER), fault.backend, str(out), "--epochs", str(EPOCHS),
            "--timeout", str(fault.torch_timeout_s), *extra]
    extra_env = {} if fault.backend == "torch" or fault.horovod_timeout_s is None else {
        "DISTPLATEAU_HOROVOD_TIMEOUT_S": f"{fault.horovod_timeout_s:g}"}
    return start(net, fault.backend, [(node, 2) for node in net.nodes], argv, out, extra_env, gloo_timeout_s=None)


def measure_fault(fault: Fault, tmp: Path) -> Row:
    """Run the plain loop on 2 nodes x 2 ranks, inject ``fault`` into node 1 while node 0's
    ranks wait in ``step()``, measure every surviving rank's outcome, then restart from the
    checkpoint if the run did not finish (see the module docstring)."""
    t0 = time.monotonic()
    if fault.kind == "delay" and not netem_available():
        return Row(fault.name, True, "not measurable here: this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM)",
                   [], {"fault": asdict(fault), "unsupported": "netem"}, time.monotonic() - t0)
    out = tmp / re.sub(r"[^a-z0-9]+", "-", fault.name.lower()).strip("-")  # ":" would split PATH
    out.mkdir(parents=True)
    problems: list[str] = []
    figures: dict[str, Any] = {}
    held = [out / "held-2", out / "held-3"]  # node 1's ranks
    hold = ["--hold-host", "distplateau-node1", "--hold-epoch", str(HOLD_EPOCH), "--hold-s", "2"]
    with network(2) as net:
        procs = _launch(net, fault, out, hold)
        end = time.monotonic() + LAUNCH_TIMEOUT
        while not all(p.exists() for p in held) and time.monotonic() < end:
            if all(p.poll() is not None for p in procs):
                break
            time.sleep(0.05)
        if not all(p.exists() for p in held):
            for proc in procs:
                kill_group(proc)
            return Row(fault.name, False, "the run never reached the fault", [log_tail(out)], figures,
                       time.monotonic() - t0)
        time.sleep(0.5)  # node 0's ranks are now inside step(), waiting for node 1's
        t_fault = time.time()
        try:
            repair = _inject(net, fault)
        except Unsupported as err:
            for proc in procs:
                kill_group(proc)
            return Row(fault.name, True, f"not measurable here: {err}", [],
                       {"fault": asdict(fault), "unsupported": str(err)}, time.monotonic() - t0)
        survivors = [r for r in range(4) if not (fault.kind == "freeze" and r >= 2)]

        def outcome(rank: int) -> bool:
            path = out / f"rank{rank}.json"
            try:
                rec = json.loads(path.read_text()) if path.exists() else {}
            except ValueError:  # being replaced right now
                return False
            return bool(rec.get("error") or rec.get("done"))

        # A frozen node never ends by itself: then we wait for node 0's launcher, or for 45 s
        # after every surviving rank has raised (longer than Horovod's 30 s gloo timeout).
        deadline = time.monotonic() + fault.cap_s
        ended: dict[int, float] = {}
        all_raised_at = None
        while time.monotonic() < deadline and len(ended) < len(procs):
            for i, proc in enumerate(procs):
                if i not in ended and proc.poll() is not None:
                    ended[i] = time.time()
            if fault.kind == "freeze":
                if 0 in ended:
                    break
                if all_raised_at is None and all(outcome(r) for r in survivors):
                    all_raised_at = time.monotonic()
                if all_raised_at is not None and time.monotonic() - all_raised_at > 45:
                    break
            time.sleep(0.1)
        killed = len(ended) < len(procs)  # the rest is killed below
        codes = [p.poll() for p in procs]
        repair()
        for proc in procs:
            kill_group(proc)
        first = ranks(out)
        raised = {r: first[r]["error"] for r in survivors if first.get(r, {}).get("error")}
        figures.update(fault=asdict(fault), killed=killed, codes=codes, raised=sorted(raised), survivors=survivors)
        if 0 in ended:
            figures["launcher_end_s"] = round(ended[0] - t_fault, 3)  # node 0's torchrun / horovodrun
        if raised:
            delays = [e["t"] - t_fault for e in raised.values()]
            figures.update(first_error_s=round(min(delays), 3), last_error_s=round(max(delays), 3),
                           messages=sorted({_message(e) for e in raised.values()}))
        finished = [r for r in survivors if first.get(r, {}).get("done")]
        after = [e["step_s"] for r in survivors for e in first.get(r, {}).get("epochs", []) if e["epoch"] > HOLD_EPOCH]
        before = [e["step_s"] for r in survivors for e in first.get(r, {}).get("epochs", []) if e["epoch"] < HOLD_EPOCH]
        if after:
            figures["step_s_after_median"] = round(sorted(after)[len(after) // 2], 4)
        if before:
            figures["step_s_before_median"] = round(sorted(before)[len(before) // 2], 4)
        if fault.expect_error:
            hung = [r for r in survivors if r not in raised and r not in finished]
            if hung:
                problems.append(f"ranks {hung} neither raised nor finished within {fault.cap_s:.0f}s (hang)")
        elif raised or killed:
            problems.append(f"expected the run to carry on; raised on ranks {sorted(raised)}, killed: {killed}")
        if not fault.expect_error:
            problems += check_training({r: first[r] for r in first}, 4, 2)
        # Restart from the last checkpoint on the repaired network, as an operator would.
        if raised or killed or len(finished) < len(survivors):
            for stale in out.glob("rank*.json"):
                stale.rename(stale.with_name("first-" + stale.name))
            t_restart = time.monotonic()
            restart = _launch(net, fault, out, ["--resume"])
            codes2, killed2 = finish(restart, LAUNCH_TIMEOUT)
            second = ranks(out)
            restarted = check_training(second, 4, 2, first_records={r: first.get(r, {}) for r in range(4)})
            figures.update(restart_ok=not restarted and not killed2 and not any(codes2),
                           restart_s=round(time.monotonic() - t_restart, 1),
                           resumed_at=min((r.get("first_epoch", -1) for r in second.values()), default=None))
            if restarted or killed2 or any(codes2):
                problems.append(f"restart from the checkpoint: exit codes {codes2}, killed {killed2}")
                problems += restarted
    if problems:
        problems.append(log_tail(out))
    return Row(fault.name, not problems, _fault_summary(fault, figures), problems, figures, time.monotonic() - t0)


def _message(error: dict[str, Any]) -> str:
    """An exception's first line without what differs between ranks (rank numbers, how long it
    waited, gloo's source path), so that the same error on several ranks reads once."""
    text = error["message"].splitlines()[0] if error["message"] else ""
    text = re.sub(r"^\[[^\]]*\] ", "", text)
    text = re.sub(r"\brank \d+", "rank N", text)
    text = re.sub(r"\bwaiting \d+\.\ds", "waiting N s", text)
    return f"{error['type']}: {text[:140]}"


def _fault_summary(fault: Fault, f: dict[str, Any]) -> str:
    if "first_error_s" in f:
        text = (f"{len(f['raised'])}/{len(f['survivors'])} surviving ranks raised after "
                f"{f['first_error_s']:.1f}-{f['last_error_s']:.1f} s: {'; '.join(f['messages'])[:200]}")
    elif f.get("killed"):
        text = f"no rank raised: hung until killed at {fault.cap_s:.0f} s"
    else:
        text = "every rank carried on"
        if "step_s_after_median" in f:
            text += f" (median step after the fault {1000 * f['step_s_after_median']:.0f} ms)"
    if "restart_ok" in f:
        text += f"; restart from epoch {f['resumed_at']}: {'exact' if f['restart_ok'] else 'FAILED'}"
    return text


def faults(full: bool) -> list[Fault]:
    """The fault matrix; ``full=False`` is the CI-sized part (one link-down)."""
    ci = [Fault("fault: link down, torch, timeout 10 s", "link-down", "torch", torch_timeout_s=10)]
    if not full:
        return ci
    return ci + [
        Fault("fault: link down, torch, timeout 20 s", "link-down", "torch", torch_timeout_s=20),
        Fault("fault: link down, horovod, DISTPLATEAU_HOROVOD_TIMEOUT_S=10", "link-down", "horovod"),
        Fault("fault: link down, horovod, no timeout", "link-down", "horovod", horovod_timeout_s=None, cap_s=120),
        Fault("fault: link down 3 s then up, torch, timeout 10 s", "link-flap", "torch", amount=3,
              expect_error=False),
        Fault("fault: link down 3 s then up, horovod, DISTPLATEAU_HOROVOD_TIMEOUT_S=10", "link-flap", "horovod",
              amount=3, expect_error=False),
        Fault("fault: 10% packet loss, torch", "loss", "torch", amount=0.1, expect_error=False),
        Fault("fault: 30% packet loss, torch", "loss", "torch", amount=0.3, expect_error=False),
        Fault("fault: 30% packet loss, horovod", "loss", "horovod", amount=0.3, expect_error=False),
        Fault("fault: link limited to 256 kbit/s, torch", "rate", "torch", amount=256, expect_error=False),
        Fault("fault: link limited to 256 kbit/s, horovod", "rate", "horovod", amount=256, expect_error=False),
        Fault("fault: 200 ms delay, torch", "delay", "torch", amount=200, expect_error=False),
        Fault("fault: node frozen (SIGSTOP), torch, timeout 10 s", "freeze", "torch"),
        Fault("fault: node frozen (SIGSTOP), horovod, DISTPLATEAU_HOROVOD_TIMEOUT_S=10", "freeze", "horovod"),
        Fault("fault: node frozen (SIGSTOP), horovod, no timeout", "freeze", "horovod", horovod_timeout_s=None,
              cap_s=120),
        Fault("fault: node frozen 5 s then SIGCONT, torch, timeout 10 s", "freeze-thaw", "torch", amount=5,
              expect_error=False),
    ]


# ------------------------------------------------------------------ the full run


def scenarios(full: bool = True, packages: Sequence[str] = ("lightning.pytorch", "pytorch_lightning"),
              ) -> list[tuple[str, Callable[[Path], Row]]]:
    """(name, run) for every scenario; each run takes a fresh temporary directory."""
    out: list[tuple[str, Callable[[Path], Row]]] = [
        ("contract checks, torch", lambda tmp: contract_checks("torch", tmp)[0]),
        ("contract checks, horovod", lambda tmp: contract_checks("horovod", tmp)[0]),
        ("training, torch, 2 nodes", partial(training, "torch", bench=300)),
        ("training, torch, 1 node", partial(training, "torch", bench=300, nodes=1)),
        ("training, horovod, 2 nodes", partial(training, "horovod", bench=300)),
        ("training, horovod, 1 node", partial(training, "horovod", bench=300, nodes=1)),
        ("training, torch-c10d, 2 nodes", partial(training, "torch-c10d")),
        ("training, horovod-direct, 2 nodes", partial(training, "horovod-direct")),
    ]
    for package in packages:
        for strategy in ("ddp", "horovod"):
            out.append((f"Lightning {strategy}, {package}", partial(lightning, strategy, package)))
        out.append((f"Lightning horovod node_rank and num_nodes, {package}",
                    partial(lightning_horovod_uneven_slots, package)))
    out += [(f.name, partial(measure_fault, f)) for f in faults(full)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run only the scenarios whose name contains this")
    parser.add_argument("--packages", default="lightning.pytorch,pytorch_lightning",
                        help="Lightning packages for the Lightning scenarios, comma-separated")
    parser.add_argument("--json", type=Path, help="write every row here")
    args = parser.parse_args(argv)
    reason = unavailable()
    if reason:
        print(f"multinode: cannot run here: {reason}", file=sys.stderr)
        return 2
    if not horovodrun_available():
        print("Horovod is not installed: run `python -m distplateau.install_horovod`", file=sys.stderr)
        return 2
    print(f"netem: {'available' if netem_available() else 'not in this kernel (loss/rate via htb+bpf, no delay)'}")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="distplateau-multinode-") as d:
        for name, run in scenarios(packages=[p for p in args.packages.split(",") if p]):
            if args.only not in name:
                continue
            tmp = Path(d) / str(len(rows))
            tmp.mkdir()
            row = run(tmp)
            rows.append(row)
            print(f"{'ok    ' if row.ok else 'FAILED'} {row.wall_s:6.1f}s  {row.name}: {row.summary}", flush=True)
            for problem in row.problems[:6]:
                print("        " + problem[:3000].replace("\n", "\n        "), flush=True)
    print()
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1, default=repr))
    leftovers = [n for n in os.listdir("/run/netns") if n.startswith(f"{PREFIX}{os.getpid()}-")] \
        if os.path.isdir("/run/netns") else []
    if leftovers:
        print(f"namespaces left behind: {leftovers}", file=sys.stderr)
        return 1
    return 0 if all(r.ok for r in rows) else 1


def table(rows: Sequence[Row]) -> str:
    """The summary: one table of scenarios, one of faults, and the step cost across nodes."""
    lines = ["| scenario | result | wall |", "| --- | --- | ---: |"]
    for row in rows:
        if "fault" not in row.figures:
            lines.append(f"| {row.name} | {'' if row.ok else '**FAILED** '}{row.summary} | {row.wall_s:.0f} s |")
    faulted = [row for row in rows if "fault" in row.figures]
    if faulted:
        lines += ["", "| fault on node 1 (2 nodes x 2 ranks) | surviving ranks raised | after (s) | error | "
                      "node 0's launcher exited (s) | restart from the checkpoint |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for row in faulted:
            lines.append(_fault_line(row))
    cost = {row.name: row.figures["step_us_median"] for row in rows if "step_us_median" in row.figures}
    for backend in ("torch", "horovod"):
        one = cost.get(f"training, {backend}, 1 node x 4 ranks")
        two = cost.get(f"training, {backend}, 2 nodes x 2 ranks")
        if one and two:
            lines.append(f"\nstep() of 4 {backend} ranks, median of 300 (slowest rank): 1 node x 4 {one:.0f} us, "
                         f"2 nodes x 2 {two:.0f} us ({two / one:.2f}x)")
    return "\n".join(lines)


def _fault_line(row: Row) -> str:
    f = row.figures
    name = row.name.removeprefix("fault: ")
    if "unsupported" in f:
        return f"| {name} | not measurable here: no netem in this kernel | | | | |"
    raised = f"{len(f['raised'])}/{len(f['survivors'])}" if f.get("raised") else (
        "none (hung)" if f.get("killed") and not f.get("launcher_end_s") else "none: carried on")
    after = f"{f['first_error_s']:.1f}-{f['last_error_s']:.1f}" if "first_error_s" in f else ""
    if not f.get("raised") and "step_s_after_median" in f:
        after = f"(step {1000 * f['step_s_before_median']:.0f} -> {1000 * f['step_s_after_median']:.0f} ms)"
    error = "; ".join(f.get("messages", []))
    ended = f"{f['launcher_end_s']:.1f}" if "launcher_end_s" in f else "no (killed)"
    restart = "" if "restart_ok" not in f else (
        f"from epoch {f['resumed_at']}: {'exact' if f['restart_ok'] else '**FAILED**'}")
    if not row.ok:
        restart += " **FAILED**"
    return f"| {name} | {raised} | {after} | {error} | {ended} | {restart} |"


if __name__ == "__main__":
    sys.exit(main())
