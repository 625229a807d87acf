"""Several "hosts" on one machine: Linux network namespaces joined by a bridge.

Each node is a network namespace with one interface, ``dpnet0`` (the same name on every node,
as ``eth0`` would be on real hosts, so one ``GLOO_SOCKET_IFNAME``/``HOROVOD_GLOO_IFACE`` fits
all), holding one address of a private /24 that exists only inside these namespaces. The
nodes' interfaces are veth pairs whose other ends sit on a bridge in one more namespace, the
"switch"; no interface, route or firewall rule of the machine itself is created or changed,
and nothing leaves the namespaces. Processes started on a node also get their own hostname
(a UTS namespace), so that two nodes do not look like one host to a launcher, and, through the
``/etc/netns/<namespace>/`` files that ``ip netns exec`` mounts over ``/etc``, a ``hosts`` file
naming every node (as cluster DNS would) and a ``resolv.conf`` without a reachable server.

    with network(2) as net:                       # Unsupported unless root (see unavailable())
        procs = [net.popen(node, ["torchrun", ...], log=tmp / f"node{node.index}.log")
                 for node in net.nodes]
        net.link(net.nodes[1], up=False)          # node 1's cable pulled
        net.impair(net.nodes[1], loss=0.1)        # or 10 % of its packets lost
        finish(procs, timeout=120)                # a hang is killed, never waited for

Teardown always runs (``finally``, also on SIGTERM, and ``atexit``): every process inside the
namespaces is SIGKILLed by its pid, then the namespaces and their ``/etc/netns`` files are
deleted, which destroys their links. Namespaces
are named ``distplateau-<pid>-<n>-<role>``; :func:`network` first removes those left by a
process that no longer exists (a run killed with SIGKILL).

Used by ``tests/test_multinode.py`` (CI-sized) and ``tests/multinode.py`` (the full set,
``bash dev.sh multinode``).
"""

from __future__ import annotations

import atexit
import functools
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from harness.launch import kill_group

PREFIX = "distplateau-"
#: A private /24 that the harness checks is not on any interface of this machine.
SUBNET = "10.213.7"
IFACE = "dpnet0"
_NETNS_DIR = Path("/run/netns")
#: ``ip netns exec NAME`` mounts the files of ``/etc/netns/NAME/`` over those of ``/etc``.
_ETC_DIR = Path("/etc/netns")
_counter = itertools.count()


class Unsupported(RuntimeError):
    """The kernel or the tools here cannot emulate what was asked (says which)."""


@dataclass(frozen=True)
class Node:
    index: int
    netns: str  #: network namespace name, for ``ip netns exec``
    address: str  #: IPv4 address of ``iface``
    hostname: str  #: what ``hostname`` returns in the processes started here
    iface: str = IFACE


def _ip(*args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout, check=check)


@functools.cache
def unavailable() -> str | None:
    """Why namespaces cannot be used here (a sentence for ``pytest.skip``), or ``None``."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, not {sys.platform}"
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (iproute2 / util-linux)"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN); run as root"
    used = _ip("-4", "-o", "addr", "show", check=False).stdout
    if re.search(rf"\binet {re.escape(SUBNET)}\.", used):
        return f"{SUBNET}.0/24 is in use on this machine; the harness only uses a subnet nobody else does"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pids(netns: str) -> list[int]:
    out = _ip("netns", "pids", netns, check=False).stdout
    return [int(p) for p in out.split()]


def _kill_everything_in(netns: str, deadline_s: float = 10.0) -> list[int]:
    """SIGKILL every process in ``netns``, by pid; returns those still there after ``deadline_s``."""
    end = time.monotonic() + deadline_s
    left = _pids(netns)
    while left and time.monotonic() < end:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
        left = [p for p in _pids(netns) if _alive(p)]
    return left


def _delete(names: Sequence[str]) -> list[str]:
    """Kill the processes in and delete each namespace and its /etc/netns files; the names that
    could not be deleted."""
    failed = []
    for name in names:
        shutil.rmtree(_ETC_DIR / name, ignore_errors=True)
        if not (_NETNS_DIR / name).exists():
            continue
        _kill_everything_in(name)
        if _ip("netns", "del", name, check=False).returncode:
            failed.append(name)
    try:
        _ETC_DIR.rmdir()  # only if no other namespace has files there
    except OSError:
        pass
    return failed


def stale() -> list[str]:
    """Namespaces of this harness whose creating process is gone."""
    entries = {e for d in (_NETNS_DIR, _ETC_DIR) if d.is_dir() for e in os.listdir(d)}
    names = []
    for entry in sorted(entries):
        m = re.fullmatch(rf"{re.escape(PREFIX)}(\d+)-.*", entry)
        if m and not _alive(int(m.group(1))):
            names.append(entry)
    return names


def remove_stale() -> list[str]:
    """Delete :func:`stale` namespaces (and kill what still runs in them); returns their names."""
    names = stale()
    _delete(names)
    return names


class Network:
    """N nodes on one bridge. Built by :func:`network`; see the module docstring."""

    def __init__(self, n: int) -> None:
        run = f"{PREFIX}{os.getpid()}-{next(_counter)}"
        self.switch = f"{run}-switch"
        self.nodes = [Node(i, f"{run}-node{i}", f"{SUBNET}.{i + 1}", f"distplateau-node{i}") for i in range(n)]
        self._names = [self.switch] + [node.netns for node in self.nodes]
        self._procs: list[subprocess.Popen[bytes]] = []

    # ------------------------------------------------------------------ lifetime
    def _create(self) -> None:
        # Every node resolves every node's hostname to its address, as DNS would on a cluster
        # (Horovod's gloo, for one, looks its own hostname up, see docs/guides/multinode.md).
        hosts = "127.0.0.1 localhost\n" + "".join(f"{n.address} {n.hostname}\n" for n in self.nodes)
        # No DNS server is reachable from the nodes: fail lookups at once, instead of waiting
        # for the machine's nameserver to time out.
        resolv = "options timeout:1 attempts:1\nnameserver 127.0.0.1\n"
        for name in self._names:
            for attempt in range(3):  # another run may remove an empty /etc/netns meanwhile
                try:
                    (_ETC_DIR / name).mkdir(parents=True, exist_ok=True)
                    (_ETC_DIR / name / "hosts").write_text(hosts)
                    (_ETC_DIR / name / "resolv.conf").write_text(resolv)
                    break
                except FileNotFoundError:
                    if attempt == 2:
                        raise
            _ip("netns", "add", name)
            _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for node in self.nodes:
            port = self._port(node)
            # Both ends are created directly inside their namespaces: nothing appears on the host.
            _ip("link", "add", node.iface, "netns", node.netns, "type", "veth", "peer", "name", port,
                "netns", self.switch)
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", self.switch, "link", "set", port, "up")
            _ip("-n", node.netns, "addr", "add", f"{node.address}/24", "dev", node.iface)
            _ip("-n", node.netns, "link", "set", node.iface, "up")

    def close(self) -> None:
        """Kill every process started here or found in the namespaces, then delete them."""
        for proc in self._procs:
            kill_group(proc)
        failed = _delete(self._names)
        if failed:
            print(f"netns: could not delete {', '.join(failed)}", file=sys.stderr)

    def _port(self, node: Node) -> str:
        return f"port{node.index}"

    # ------------------------------------------------------------------ processes
    def popen(self, node: Node, argv: Sequence[str], *, log: Path, env: dict[str, str] | None = None,
              cwd: str | Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` on ``node`` (its own hostname, its own process group), stdout and
        stderr to ``log``. End it with :func:`kill_group` or :func:`finish`."""
        cmd = ["ip", "netns", "exec", node.netns, "unshare", "--uts", "sh", "-c",
               'hostname "$0" && exec "$@"', node.hostname, *argv]
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                    start_new_session=True)
        self._procs.append(proc)
        return proc

    def pids(self, node: Node) -> list[int]:
        """Every process running on ``node`` now."""
        return _pids(node.netns)

    def signal(self, node: Node, sig: int) -> list[int]:
        """Send ``sig`` to every process on ``node``; returns their pids."""
        pids = self.pids(node)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return pids

    def ssh_stand_in(self, directory: Path) -> Path:
        """Write ``directory/ssh``: what ``horovodrun -H <address>:<slots>,...`` runs to start
        ranks on another host, here a local command that runs on the node with that address.
        Put ``directory`` first on ``PATH`` of the launcher. Unlike a real ssh session it is a
        local pipe: it does not go over the nodes' links, so a link fault does not cut it."""
        cases = "\n".join(f"  {node.address}) ns={node.netns}; name={node.hostname} ;;" for node in self.nodes)
        script = directory / "ssh"
        script.write_text(f"""#!/bin/sh
# ssh stand-in written by tests/netns.py: `ssh [options] HOST [options] COMMAND...` runs COMMAND
# on the namespace node whose address is HOST, with that node's hostname.
host=
while [ $# -gt 0 ]; do
  case "$1" in
    -o|-p|-i|-l) shift 2 ;;
    -*) shift ;;
    *) if [ -z "$host" ]; then host=$1; shift; else break; fi ;;
  esac
done
case "$host" in
{cases}
  *) echo "ssh stand-in: no node has address $host" >&2; exit 255 ;;
esac
exec ip netns exec "$ns" unshare --uts sh -c 'hostname "$0" && exec sh -c "$1"' "$name" "$*"
""")
        script.chmod(0o755)
        return script

    # ------------------------------------------------------------------ faults
    def link(self, node: Node, *, up: bool) -> None:
        """Take ``node``'s interface down (its cable pulled) or bring it back up."""
        _ip("-n", node.netns, "link", "set", node.iface, "up" if up else "down")

    def impair(self, node: Node, *, loss: float = 0.0, rate_kbit: int | None = None,
               delay_ms: float = 0.0) -> str:
        """Lose ``loss`` (0-1) of the packets to and from ``node``, and/or limit its link to
        ``rate_kbit`` each way, and/or delay them by ``delay_ms``. Uses ``netem`` where the
        kernel has it; otherwise loss and rate are built from htb, a classic-BPF random
        classifier and a zero-length fifo, and a delay raises :class:`Unsupported`. Returns
        which of the two was used."""
        devices = [(node.netns, node.iface), (self.switch, self._port(node))]
        if _netem(self.switch):
            spec = []
            if delay_ms:
                spec += ["delay", f"{delay_ms}ms"]
            if loss:
                spec += ["loss", f"{100 * loss:g}%"]
            if rate_kbit:
                spec += ["rate", f"{rate_kbit}kbit"]
            for netns, dev in devices:
                _tc(netns, "qdisc", "replace", "dev", dev, "root", "netem", *spec)
            return "netem"
        if delay_ms:
            raise Unsupported("this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM is not set and it has no "
                              "modules to load), so a fixed packet delay cannot be emulated here")
        rate = f"{rate_kbit}kbit" if rate_kbit else "10gbit"
        for netns, dev in devices:
            _tc(netns, "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default", "1")
            _tc(netns, "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", rate)
            if loss:
                _tc(netns, "class", "add", "dev", dev, "parent", "1:", "classid", "1:2", "htb", "rate", "10gbit")
                _tc(netns, "qdisc", "add", "dev", dev, "parent", "1:2", "pfifo", "limit", "0")  # drops all
                # IPv4 only: ARP always gets through, as a lossy link's would after a retry.
                _tc(netns, "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1",
                    "bpf", "bytecode", _random_below(loss), "classid", "1:2")
        return "htb+bpf"

    def clear(self, node: Node) -> None:
        """Undo :meth:`impair` on ``node``."""
        for netns, dev in [(node.netns, node.iface), (self.switch, self._port(node))]:
            subprocess.run(["ip", "netns", "exec", netns, "tc", "qdisc", "del", "dev", dev, "root"],
                           capture_output=True, timeout=20)


def _tc(netns: str, *args: str) -> None:
    done = subprocess.run(["ip", "netns", "exec", netns, "tc", *args], capture_output=True, text=True, timeout=20)
    if done.returncode:
        raise Unsupported(f"`tc {' '.join(args)}` failed in {netns}: {done.stderr.strip()}")


_has_netem: list[bool] = []  # probed once per process


def _netem(netns: str) -> bool:
    if _has_netem:
        return _has_netem[0]
    add = subprocess.run(["ip", "netns", "exec", netns, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
                          "delay", "1ms"], capture_output=True, timeout=20)
    subprocess.run(["ip", "netns", "exec", netns, "tc", "qdisc", "del", "dev", "lo", "root"],
                   capture_output=True, timeout=20)
    _has_netem.append(add.returncode == 0)
    return _has_netem[0]


def netem_available() -> bool:
    """Whether this kernel has the ``netem`` qdisc (packet delay); probed in a throwaway namespace."""
    with network(1) as net:
        return _netem(net.switch)


def _random_below(p: float) -> str:
    """Classic BPF, as ``tc ... bpf bytecode`` takes it: match (return -1, the filter's class)
    with probability ``p``. ``ld rand`` is the ancillary load SKF_AD_OFF + SKF_AD_RANDOM."""
    threshold = min(int(p * 2**32), 2**32 - 1)
    load_random = f"32 0 0 {2**32 - 0x1000 + 56}"
    return f"4,{load_random},53 0 1 {threshold},6 0 0 0,6 0 0 {2**32 - 1}"


def finish(procs: Sequence[subprocess.Popen[bytes]], timeout: float) -> tuple[list[int | None], bool]:
    """Wait for every process at most ``timeout`` seconds in all, then kill the process groups
    of those still running. Returns the exit codes (``None`` for a killed one) and whether
    anything had to be killed."""
    end = time.monotonic() + timeout
    codes: list[int | None] = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(0.0, end - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for proc, code in zip(procs, codes):
        if code is None:
            kill_group(proc)
    return codes, any(code is None for code in codes)


_open: list[Network] = []


def _close_all() -> None:
    for net in list(_open):
        net.close()
        _open.remove(net)


atexit.register(_close_all)


@contextmanager
def network(nodes: int = 2) -> Iterator[Network]:
    """``nodes`` namespaces on one bridge, torn down on exit whatever happens (see the module
    docstring). Raises :class:`Unsupported` where :func:`unavailable` gives a reason."""
    reason = unavailable()
    if reason:
        raise Unsupported(reason)
    if nodes > 250:
        raise ValueError(f"at most 250 nodes fit in {SUBNET}.0/24, not {nodes}")
    remove_stale()
    net = Network(nodes)
    _open.append(net)
    previous = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so that `finally` runs
    try:
        net._create()
        yield net
    finally:
        net.close()
        if net in _open:
            _open.remove(net)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
