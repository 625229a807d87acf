"""Launch a script on N real ranks, under horovodrun or as torch.distributed gloo processes,
with a hard timeout so that a hang fails the test instead of stalling CI."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


Completed = subprocess.CompletedProcess[str]


def horovodrun_path() -> str | None:
    return shutil.which("horovodrun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])


def horovodrun_available() -> bool:
    try:
        import horovod.torch  # noqa: F401
    except ImportError:
        return False
    return horovodrun_path() is not None


def run_horovod(np_: int, args: list[str], timeout: float, env: dict[str, str] | None = None) -> Completed:
    exe = horovodrun_path()
    assert exe, "horovodrun not found: run `python -m distplateau.install_horovod`"
    cmd = [exe, "-np", str(np_), "-H", f"localhost:{np_}", "--gloo", "--gloo-timeout-seconds", "60",
           sys.executable, *args]
    return run(cmd, timeout, child_env(env))


def run_torch(world: int, args: list[str], timeout: float, env: dict[str, str] | None = None) -> Completed:
    """World-size processes with the env:// rendezvous variables, on a free port."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        e = child_env({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, **(env or {})})
        procs.append(subprocess.Popen([sys.executable, *args], env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    deadline = time.monotonic() + timeout  # one timeout for the whole launch, not per process
    outputs, codes = [], []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(0.0, deadline - time.monotonic()))
            outputs.append(out)
            codes.append(p.returncode)
    except subprocess.TimeoutExpired:
        for p in procs:
            kill_group(p)
        outs = [p.communicate()[0] for p in procs]
        raise subprocess.TimeoutExpired(args, timeout, output="\n".join(o or "" for o in outs)) from None
    text = "".join(f"--- rank {r} ---\n{o}" for r, o in enumerate(outputs))
    return subprocess.CompletedProcess(args, max(codes, key=abs), text, "")


def kill_group(p: subprocess.Popen[Any]) -> None:
    """SIGKILL ``p``'s process group (started with ``start_new_session``) and reap it."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def run(cmd: list[str], timeout: float, env: dict[str, str]) -> Completed:
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(p)
        out = p.communicate()[0]
        raise subprocess.TimeoutExpired(cmd, timeout, output=out) from None
    return subprocess.CompletedProcess(cmd, p.returncode, out, "")
