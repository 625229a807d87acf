"""Launch a script on N real ranks, under horovodrun or as torch.distributed gloo processes,
with a hard timeout so that a hang fails the test instead of stalling CI.

A test module that runs many checks in one launch starts it in a module-scoped fixture and
returns a :class:`Launch`; each test then asks it for one check's outcome::

    @pytest.fixture(scope="module", params=[2, 3], ids=["np2", "np3"])
    def launch(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Launch:
        out = tmp_path_factory.mktemp("checks")
        log = launch_log(run_torch, request.param, [SCRIPT, str(out)], timeout=240)
        return Launch(rank_results(out, request.param), log)

    def test_something(launch: Launch) -> None:
        rank0, rank1, *_ = launch.outcome("something")  # fails with the log's tail if it never ran
        assert rank0 == rank1
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

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


def launch_log(start: Callable[..., Completed], *args: Any, timeout: float, **kwargs: Any) -> str:
    """``start(*args, timeout=timeout, **kwargs)`` (``run``, ``run_torch`` or ``run_horovod``) and
    its output; after a timeout, what it printed until it was killed, marked as such. The test
    then fails on the checks the launch did not finish, not on the timeout itself."""
    try:
        return start(*args, timeout=timeout, **kwargs).stdout
    except subprocess.TimeoutExpired as err:
        return f"TIMED OUT after {timeout}s\n{err.output}"


def launch_json(start: Callable[..., Completed], *args: Any, out: Path, timeout: float, **kwargs: Any) -> Any:
    """For benchmarks: ``start(*args, timeout=timeout, **kwargs)`` of a script that writes its
    result as JSON to ``out``; that result, or a one-line reason why there is none (the launch's
    output then goes to stderr), to print in a table."""
    try:
        done = start(*args, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    if done.returncode != 0 or not out.exists():
        sys.stderr.write(done.stdout[-4000:])
        return f"failed (exit status {done.returncode})"
    return json.loads(out.read_text())


def rank_results(out_dir: Path, world: int) -> dict[str, list[Any]]:
    """The ``out_dir/rank{r}.json`` files the ranks wrote (each: check name -> what that rank
    saw) as check name -> one entry per rank, ``None`` for a rank that did not report it."""
    ranks = [json.loads(path.read_text()) if (path := out_dir / f"rank{r}.json").exists() else {}
             for r in range(world)]
    names = dict.fromkeys(name for rank in ranks for name in rank)
    return {name: [rank.get(name) for rank in ranks] for name in names}


class Launch(NamedTuple):
    """What one launch left: check name -> every rank's outcome, and the launch's output."""

    results: dict[str, list[Any]]
    log: str

    def outcome(self, name: str) -> list[Any]:
        """Every rank's outcome of check ``name``. Fails the calling test, with the end of the
        launch's output, when a rank did not get that far (a hang or a crash), and with the
        traceback when a rank's check raised (a rank script reports ``{"error": traceback}``)."""
        import pytest  # only tests call this; bench/ imports this module without pytest

        per_rank = self.results.get(name)
        if per_rank is None or any(r is None for r in per_rank):
            pytest.fail(f"{name} did not finish on every rank (hang or crash); launch output:\n{self.log[-6000:]}")
        errors = [f"rank {rank}:\n{seen['error']}" for rank, seen in enumerate(per_rank)
                  if isinstance(seen, dict) and "error" in seen]
        if errors:
            pytest.fail(f"{name} raised on " + "\n".join(errors))
        return per_rank
