"""Elastic training on real processes: Horovod elastic and torchrun restarts, checked against an
uninterrupted reference.

Two launchers, each a :class:`Elastic` result:

- :func:`horovod` runs ``horovodrun`` in elastic mode on this machine the way Horovod's own
  elastic integration tests do: two host names of this machine (``localhost`` and
  ``127.0.0.1``, one slot each), a host discovery script whose output the workers change during
  the run (it prints a hosts file that rank 0 rewrites), and workers that SIGKILL themselves
  mid-epoch. A killed worker's host is blacklisted by Horovod until ``--blacklist-cooldown-range``
  ends, then comes back: each kill is a 2 -> 1 -> 2 round trip.
- :func:`torchrun` runs ``torchrun --nnodes=1:2 --max-restarts=2``: a worker SIGKILLs itself
  mid-epoch, torchrun restarts every worker, they resume from the last checkpoint; then a
  second torchrun with another ``--nproc-per-node`` resumes from the same checkpoint.

Every committed epoch (a Horovod ``state.commit()``, a torchrun checkpoint) is recorded with
its global metric, learning rates and scheduler state. The reference is torch's own
``ReduceLROnPlateau`` fed the committed metrics in order, without interruption: the learning
rates trained with and the scheduler state after every committed epoch must equal it bit for
bit. The workers check more on their own (after every reset and every step: the same state
on every rank, the live optimizer's learning rates equal to the scheduler's, the gather
adapter sized for the current world) and record any failure; each one is a mismatch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from harness.launch import child_env, free_port, horovodrun_path, run

HERE = Path(__file__).resolve().parent
HOROVOD_WORKER = HERE / "elastic_worker.py"
TORCHRUN_WORKER = HERE / "torchrun_worker.py"

#: The scheduler of both scenarios (the reference gets the parent's arguments).
KWARGS: dict[str, Any] = {"mode": "min", "factor": 0.7, "patience": 1, "min_lr": 1e-5}
LR0 = 1.0
#: Validation samples of the whole job; each rank takes every world-th one.
VALIDATION = 11
#: Seconds a Horovod blacklisted host stays out (--blacklist-cooldown-range takes whole seconds).
COOLDOWN = (1, 2)


def sample_loss(epoch: int, i: int) -> float:
    """Validation loss of sample ``i`` at ``epoch``: it improves for three epochs of every five,
    then plateaus for two, so ``patience=1`` reduces the learning rate every five epochs and a
    step counted twice (a scheduler not rolled back) reduces it early."""
    block, within = divmod(epoch, 5)
    return (0.5 + (i % 4) * 0.25) / (1.0 + 3 * block + min(within, 2))


def shard_metric(epoch: int, rank: int, world: int) -> tuple[float, int]:
    """This rank's mean validation loss and its number of samples."""
    losses = [sample_loss(epoch, i) for i in range(rank, VALIDATION, world)]
    return (math.fsum(losses) / len(losses) if losses else math.nan), len(losses)


def global_metric(epoch: int) -> float:
    return math.fsum(sample_loss(epoch, i) for i in range(VALIDATION)) / VALIDATION


def scheduler_state(s: Any) -> dict[str, Any]:
    """What the reference is compared on, as exact reprs."""
    return {"lrs": repr(s.get_last_lr()), "best": repr(s.best), "num_bad_epochs": s.num_bad_epochs,
            "cooldown_counter": s.cooldown_counter, "last_epoch": s.last_epoch}


class Recorder:
    """Appends one JSON line per event to ``OUT/proc-<pid>.jsonl``: a process may be killed
    at any point, so every line is flushed as it is written."""

    def __init__(self, out: str) -> None:
        self._file = open(os.path.join(out, f"proc-{os.getpid()}.jsonl"), "a")  # noqa: SIM115

    def __call__(self, kind: str, **fields: Any) -> None:
        self._file.write(json.dumps({"kind": kind, "time": time.time(), "pid": os.getpid(), **fields}) + "\n")
        self._file.flush()


def read_records(out: Path) -> list[dict[str, Any]]:
    records = []
    for path in sorted(out.glob("proc-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # the last line of a killed process may be cut
                pass
    return sorted(records, key=lambda r: r["time"])


@dataclass
class Elastic:
    """One elastic launch: what happened and what went wrong (``problems`` must stay empty)."""

    name: str
    epochs: int = 0
    resets: int = 0
    killed: int = 0
    world_sizes: list[int] = field(default_factory=list)
    mismatches: int = 0
    recoveries: list[tuple[str, float]] = field(default_factory=list)
    #: how each step() a peer's death interrupted ended: (error, seconds from entering it)
    step_errors: list[tuple[str, float]] = field(default_factory=list)
    wall_s: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def longest_recovery_s(self) -> float:
        return max((s for _, s in self.recoveries), default=0.0)


def compare_with_reference(records: list[dict[str, Any]], result: Elastic) -> None:
    """Replay the committed epochs through torch's ``ReduceLROnPlateau``; count every epoch
    whose learning rates or state differ, and every check a worker recorded as failed."""
    commits: dict[int, dict[str, Any]] = {}
    for r in records:
        if r["kind"] == "commit":
            seen = commits.setdefault(r["epoch"], r)
            if {k: seen[k] for k in ("metric", "train_lrs", "state")} != {k: r[k] for k in ("metric", "train_lrs",
                                                                                           "state")}:
                result.mismatches += 1
                result.problems.append(f"epoch {r['epoch']} committed twice, differently: {seen} vs {r}")
        elif r["kind"] == "mismatch":
            result.mismatches += 1
            result.problems.append(f"pid {r['pid']}: {r['what']}")
    result.epochs = len(commits)
    if sorted(commits) != list(range(len(commits))):
        result.problems.append(f"committed epochs are not 0..n-1: {sorted(commits)}")
    reference = ReduceLROnPlateau(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR0), **KWARGS)
    for epoch in sorted(commits):
        c = commits[epoch]
        expected_lrs = repr(reference.get_last_lr())
        reference.step(c["metric"])
        if c["train_lrs"] != expected_lrs or c["state"] != scheduler_state(reference):
            result.mismatches += 1
            result.problems.append(f"epoch {epoch} (world {c['size']}): trained with {c['train_lrs']}, state "
                                   f"{c['state']}; reference trained with {expected_lrs}, state "
                                   f"{scheduler_state(reference)}")
        if not math.isclose(c["metric"], global_metric(epoch), rel_tol=1e-12):
            result.problems.append(f"epoch {epoch}: global metric {c['metric']!r}, expected {global_metric(epoch)!r}")


def _first_step_at(records: list[dict[str, Any]], since: float, size: int) -> float | None:
    """When every rank of the first world of ``size`` ranks after ``since`` had stepped."""
    firsts: dict[int, float] = {}
    for r in records:
        if r["kind"] == "step" and r["time"] > since and r["size"] == size:
            firsts.setdefault(r["pid"], r["time"])
            if len(firsts) == size:
                return max(firsts.values())
    return None


# --- Horovod elastic ---------------------------------------------------------------------------
#: The CI-sized plan: 2 -> 1 (a host removed) -> 2 (added back) -> SIGKILL of a worker right
#: after its step() -> 1 -> 2 (the blacklisted host returns) -> SIGKILL of a worker while the
#: other waits in step() (``in_step``: the survivor must get Horovod's HorovodInternalError
#: there, as without a limit on the wait) -> 1, where the run ends (the host may return in the
#: last epochs). Each phase: run ``after`` epochs at its start size, then act, then wait
#: (training on) until the world has ``size`` ranks. A kill comes after at least one epoch
#: (``after`` >= 1), so that the world it ends has stepped: the recovery it follows is measured.
CI_PLAN: list[dict[str, Any]] = [
    {"after": 2, "hosts": ["localhost:1"], "size": 1},
    {"after": 2, "hosts": ["localhost:1", "127.0.0.1:1"], "size": 2},
    {"after": 1, "kill": "last", "where": "after_step", "size": 1},
    {"after": 0, "size": 2},
    {"after": 1, "kill": "last", "where": "in_step", "size": 1},
]
#: The plan of ``bash dev.sh reliability``: the CI plan and back to 2 ranks, then rank 0 killed
#: mid-batches and after its step, the other host removed and added, and the last rank killed
#: mid-batches.
LONG_PLAN: list[dict[str, Any]] = [
    *CI_PLAN,
    {"after": 0, "size": 2},
    {"after": 1, "kill": "first", "where": "mid_batches", "size": 1},
    {"after": 0, "size": 2},
    {"after": 1, "kill": "first", "where": "after_step", "size": 1},
    {"after": 0, "size": 2},
    {"after": 2, "hosts": ["127.0.0.1:1"], "size": 1},
    {"after": 2, "hosts": ["localhost:1", "127.0.0.1:1"], "size": 2},
    {"after": 1, "kill": "last", "where": "mid_batches", "size": 1},
    {"after": 0, "size": 2},
]


def horovod(tmp: Path, plan: list[dict[str, Any]], *, tail: int = 3, timeout: float = 180,
            name: str = "Horovod elastic") -> Elastic:
    """``horovodrun`` in elastic mode (``--min-np 1 --max-np 2``) through ``plan``, then ``tail``
    more epochs."""
    result = Elastic(name)
    out = tmp / "horovod-elastic"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    hosts = out / "hosts"
    hosts.write_text("localhost:1\n127.0.0.1:1\n")
    discovery = out / "discover.sh"
    discovery.write_text(f"#!/bin/sh\ncat '{hosts}'\n")
    discovery.chmod(0o755)
    (out / "plan.json").write_text(json.dumps({"phases": plan, "tail": tail}))
    exe = horovodrun_path()
    assert exe, "horovodrun not found: run `python -m distplateau.install_horovod`"
    # --network-interfaces: with it, an elastic job may start on one host (Horovod's own tests
    # mock _get_min_start_hosts instead); HOROVOD_ELASTIC_TIMEOUT bounds a wait for hosts.
    cmd = [exe, "-np", "2", "--min-np", "1", "--max-np", "2", "--host-discovery-script", str(discovery),
           "--network-interfaces", "lo", "--blacklist-cooldown-range", *map(str, COOLDOWN),
           "--gloo-timeout-seconds", "30", sys.executable, str(HOROVOD_WORKER), str(out)]
    start = time.monotonic()
    # DISTPLATEAU_HOROVOD_TIMEOUT_S empty: the default bound, which the workers check, whatever the shell exported.
    log = _launch(cmd, timeout, {"HOROVOD_ELASTIC_TIMEOUT": "60", "PYTHONUNBUFFERED": "1",
                                 "DISTPLATEAU_HOROVOD_TIMEOUT_S": ""}, result)
    result.wall_s = time.monotonic() - start
    records = read_records(out)
    entries = [r for r in records if r["kind"] == "enter" and r["rank"] == 0]
    result.resets = max(0, len(entries) - 1)
    result.world_sizes = [r["size"] for r in entries]
    for r in records:
        if r["kind"] == "hosts":
            size = len(r["hosts"])
            _recovered(result, f"host {'removed, 2 -> 1' if size == 1 else 'added, 1 -> 2'}", r["time"],
                       _first_step_at(records, r["time"], size))
        elif r["kind"] == "kill":
            result.killed += 1
            _recovered(result, f"SIGKILL {r['where'].replace('_', ' ')}, 2 -> 1", r["time"],
                       _first_step_at(records, r["time"], 1))
            if r["where"] == "in_step":  # the survivor's step() ends as it would without a limit
                ended = next((e for e in records if e["kind"] == "step_error" and e["time"] > r["time"]), None)
                if ended is None or ended["error"] != "HorovodInternalError":
                    result.problems.append(f"SIGKILL while a rank waits in step(): its step() ended with {ended}")
                else:
                    result.step_errors.append((ended["error"], ended["waited"]))
            if r["phase"] + 1 < len(plan):  # the plan's last kill ends the run at 1 rank
                _recovered(result, f"blacklisted host back, 1 -> 2 (from the kill; {COOLDOWN[1]} s cooldown)",
                           r["time"], _first_step_at(records, r["time"], 2))
    compare_with_reference(records, result)
    if not any(r["kind"] == "done" for r in records):
        result.problems.append(f"no rank finished the plan:\n{log[-4000:]}")
    return result


def _launch(cmd: list[str], timeout: float, env: dict[str, str], result: Elastic) -> str:
    import subprocess

    try:
        proc = run(cmd, timeout, child_env(env))
    except subprocess.TimeoutExpired as err:
        result.problems.append(f"hang: the launch did not end within {timeout}s")
        return f"TIMED OUT after {timeout}s\n{err.output or ''}"
    if proc.returncode != 0:
        result.problems.append(f"launch ended with exit code {proc.returncode}:\n{proc.stdout[-4000:]}")
    return proc.stdout


def _recovered(result: Elastic, label: str, since: float, done: float | None) -> None:
    if done is None:
        result.problems.append(f"{label}: the job never stepped again")
    else:
        result.recoveries.append((label, done - since))


# --- torchrun ---------------------------------------------------------------------------------
#: The CI-sized plan: two launches sharing one checkpoint directory. The first runs at 2 ranks
#: and loses a worker to SIGKILL right after its step() at epoch 3 (torchrun restarts both,
#: they resume from epoch 2's checkpoint); the second resumes at 3 ranks and a worker dies in
#: the middle of epoch 8's training.
CI_TORCHRUN: list[dict[str, Any]] = [
    {"nproc": 2, "until": 6, "kill": {"epoch": 3, "rank": 1, "where": "after_step"}},
    {"nproc": 3, "until": 10, "kill": {"epoch": 8, "rank": 2, "where": "mid_batches"}},
]
#: The launches of ``bash dev.sh reliability``: 2, 3, 1 and 4 workers, rank 0 killed too.
LONG_TORCHRUN: list[dict[str, Any]] = [
    {"nproc": 2, "until": 6, "kill": {"epoch": 3, "rank": 1, "where": "after_step"}},
    {"nproc": 3, "until": 11, "kill": {"epoch": 8, "rank": 0, "where": "mid_batches"}},
    {"nproc": 1, "until": 16, "kill": {"epoch": 13, "rank": 0, "where": "after_step"}},
    {"nproc": 4, "until": 21, "kill": {"epoch": 18, "rank": 3, "where": "after_step"}},
]


def torchrun(tmp: Path, launches: list[dict[str, Any]], *, timeout: float = 150,
             name: str = "torchrun elastic") -> Elastic:
    """One ``torchrun --nnodes=1:2 --max-restarts=2`` per entry of ``launches``, all resuming
    from the same checkpoint."""
    result = Elastic(name)
    out = tmp / "torchrun-elastic"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start = time.monotonic()
    log = ""
    for launch in launches:
        plan = out / f"plan-{launch['nproc']}-{launch['until']}.json"
        plan.write_text(json.dumps(launch))
        port = free_port()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", f"--nproc-per-node={launch['nproc']}",
               "--max-restarts=2", "--monitor-interval=0.2", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=distplateau-{port}",
               "--rdzv-conf=last_call_timeout=1", str(TORCHRUN_WORKER), str(out), str(plan)]
        log += _launch(cmd, timeout, {"PYTHONUNBUFFERED": "1"}, result)
        result.world_sizes.append(launch["nproc"])
    result.wall_s = time.monotonic() - start
    records = read_records(out)
    restarts = [r for r in records if r["kind"] == "restart"]
    result.resets, result.killed = len(restarts), sum(1 for r in records if r["kind"] == "kill")
    if result.resets != result.killed:
        result.problems.append(f"torchrun restarted {result.resets} times for {result.killed} killed workers:\n"
                               f"{log[-4000:]}")
    for r in restarts:
        _recovered(result, f"SIGKILL, torchrun restarts {r['size']} workers from the checkpoint", r["killed_at"],
                   _first_step_at(records, r["killed_at"], r["size"]))
    compare_with_reference(records, result)
    if sum(1 for r in records if r["kind"] == "done" and r["rank"] == 0) != len(launches):
        result.problems.append(f"not every launch finished:\n{log[-4000:]}")
    return result
