"""Launch the reliability workers on real ranks and turn their per-rank files into results.

Used by the pytest suite (a CI-sized campaign) and by ``tests/reliability/run.py`` (a larger
one with a summary table). Every launch has a hard timeout; a timeout is a result
(``hung``), never a stalled run.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from harness.launch import run_horovod, run_torch
from tests.reliability.cases import (
    CHECKPOINT_KWARGS,
    CHECKPOINT_RESUME_STEPS,
    CHECKPOINT_SAVE_STEPS,
    CHECKPOINT_SEED,
    checkpoint_rows,
    draw_cases,
    expected_step,
    snapshot,
)

HERE = Path(__file__).resolve().parent
EQUIVALENCE = HERE / "equivalence_worker.py"
FAULTS = HERE / "fault_worker.py"
#: torch.distributed ``init_process_group(timeout=...)`` used by the fault launches.
TORCH_TIMEOUT_S = 10.0
#: The library's own bound on a Horovod step() (``distplateau._gather.TIMEOUT_ENV``) where a test sets it.
HOROVOD_TIMEOUT = {"DISTPLATEAU_HOROVOD_TIMEOUT_S": "5"}
#: No bound: Horovod's own blocking wait.
HOROVOD_NO_LIMIT = {"DISTPLATEAU_HOROVOD_TIMEOUT_S": "0"}
#: The variable unset and its default (30 minutes) forced to 5 s in the fault worker, so that a
#: launch shows the default at work within its wall time.
HOROVOD_SHORT_DEFAULT = {"RELIABILITY_HOROVOD_DEFAULT_S": "5"}


def launch(backend: str, world: int, args: list[str], timeout: float, env: dict[str, str] | None = None
           ) -> tuple[int | None, str, float]:
    """(exit code or None on timeout, output, wall seconds) of one launch."""
    start = time.monotonic()
    # DISTPLATEAU_HOROVOD_TIMEOUT_S empty means unset (the default) whatever the shell exported.
    env = {"RELIABILITY_TIMEOUT_S": str(TORCH_TIMEOUT_S), "PYTHONUNBUFFERED": "1", "DISTPLATEAU_HOROVOD_TIMEOUT_S": "",
           **(env or {})}
    try:
        if backend == "horovod":
            proc = run_horovod(world, args, timeout, env=env)
        else:  # "torch", and "none" as one plain process
            proc = run_torch(world, args, timeout, env=env)
        return proc.returncode, proc.stdout, time.monotonic() - start
    except subprocess.TimeoutExpired as err:
        out = err.output if isinstance(err.output, str) else ""
        return None, f"TIMED OUT after {timeout}s\n{out}", time.monotonic() - start


def rank_files(out: Path, world: int) -> list[dict[str, Any] | None]:
    files = [out.with_name(f"{out.name}.rank{r}.json") for r in range(world)]
    return [json.loads(f.read_text()) if f.exists() else None for f in files]


@dataclass
class Result:
    """One launch's outcome: what ran, what went wrong (``problems`` must stay empty)."""

    name: str
    cases: int = 0
    steps: int = 0
    faults: int = 0
    mismatches: int = 0
    longest_error_s: float = 0.0
    wall_s: float = 0.0
    problems: list[str] = field(default_factory=list)
    fault_problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)  #: rank -> "Type: message" of its error, where it had one
    #: Horovod: each rank's limit on its step's wait, in seconds (None: no limit)
    limits: list[float | None] = field(default_factory=list)


# --- equivalence + faults (c) and (e) -------------------------------------------------------
def equivalence(backend: str, world: int, count: int, seed: int, tmp: Path, timeout: float = 300,
                env: dict[str, str] | None = None) -> Result:
    """Draw ``count`` cases, replay them on ``world`` real ranks, then inject the bad-input and
    altered-state faults; compare every rank with the reference and with every other rank."""
    result = Result(f"equivalence {backend} x{world}" + "".join(f", {k}={v}" for k, v in (env or {}).items()))
    cases = draw_cases(world, count, seed)
    case_file = tmp / f"cases-{backend}-{world}.json"
    case_file.write_text(json.dumps(cases))
    out = tmp / f"eq-{backend}-{world}{'-env' if env else ''}"
    code, log, result.wall_s = launch(backend, world, [str(EQUIVALENCE), backend, str(case_file), str(out)], timeout,
                                      env)
    ranks = rank_files(out, world)
    if code != 0 or any(r is None for r in ranks):
        result.problems.append(f"launch ended with {code}, rank files {[r is not None for r in ranks]}:\n"
                               f"{log[-4000:]}")
    got = [r for r in ranks if r is not None]
    if not got:
        return result
    first = got[0]
    result.cases, result.steps = first["cases"], first["steps"]
    if result.cases != len(cases):
        result.problems.append(f"only {result.cases} of {len(cases)} cases ran")
    for r in got:
        result.mismatches += r["mismatched_cases"]
        result.problems += [f"rank {r['rank']}: mismatch {m}" for m in r["mismatches"]]
        if (r["cases"], r["steps"]) != (first["cases"], first["steps"]):
            result.problems.append(f"rank {r['rank']} ran {r['cases']} cases, rank 0 {first['cases']}")
        if r["unpickles_in_step"]:
            result.problems.append(f"rank {r['rank']}: {r['unpickles_in_step']} unpickling calls inside step()")
    # Faults: the same error, with the same message, on every rank.
    if len(got) == world:
        for i, fault in enumerate(first["faults"]):
            result.faults += 1
            per_rank = [r["faults"][i] if i < len(r["faults"]) else None for r in got]
            result.longest_error_s = max(result.longest_error_s, *(f["seconds"] for f in per_rank if f))
            for f in per_rank:
                if f is None or f.get("failure"):
                    result.fault_problems.append(f"{fault['kind']}: {f and f.get('failure')}")
            if len({(f or {}).get("message") for f in per_rank}) != 1:
                result.fault_problems.append(f"{fault['kind']}: ranks raised different errors: "
                                       f"{[(f or {}).get('message') for f in per_rank]}")
    return result


# --- fault (a): SIGKILL -----------------------------------------------------------------------
def kill(backend: str, world: int, tmp: Path, timeout: float = 120) -> Result:
    """The last rank SIGKILLs itself mid-training; every survivor must get an error, and soon."""
    result = Result(f"SIGKILL {backend} x{world}", faults=1)
    out = tmp / f"kill-{backend}-{world}"
    code, log, result.wall_s = launch(backend, world, [str(FAULTS), backend, "kill", str(out)], timeout)
    ended = time.time()
    ranks = rank_files(out, world)
    victim = ranks[-1]
    if code is None:
        result.problems.append(f"hang: the launch did not end within {timeout}s\n{log[-3000:]}")
    if victim is None or "killed_at" not in victim:
        result.problems.append(f"the victim never reached the kill point:\n{log[-3000:]}")
        return result
    for r, data in enumerate(ranks[:-1]):
        if data is None or not data.get("error"):
            # Horovod's launcher may terminate a survivor before it reports: bounded all the same.
            result.notes.append(f"rank {r} reported no error; launcher ended {ended - victim['killed_at']:.2f}s "
                                "after the kill")
            result.longest_error_s = max(result.longest_error_s, ended - victim["killed_at"])
            if code is None:
                result.problems.append(f"rank {r}: no error before the launch timed out")
            continue
        delay = data["error_at"] - victim["killed_at"]
        result.longest_error_s = max(result.longest_error_s, delay)
        result.notes.append(f"rank {r}: {data['error']} after {delay:.3f}s: {data['message'][:120]}")
        result.errors[r] = f"{data['error']}: {data['message']}"
    return result


# --- fault (b): one rank skips a step ---------------------------------------------------------
def skip(backend: str, world: int, tmp: Path, then: str, timeout: float = 120,
         env: dict[str, str] | None = None) -> Result:
    """Rank 1 skips one ``step``; ``then`` is what it does after the loop: ``"exit"`` (its
    training ends) or ``"sync"`` (it enters the next training collective). Measures how
    the other ranks' one extra ``step`` ends."""
    shown = {k: v for k, v in (env or {}).items() if k.startswith(("DISTPLATEAU", "RELIABILITY_HOROVOD"))}
    result = Result(f"skipped step ({then}) {backend} x{world}" + "".join(f", {k}={v}" for k, v in shown.items()),
                    faults=1)
    out = tmp / (f"skip-{then}-{backend}-{world}" + "".join(f"-{k}{v}" for k, v in sorted((env or {}).items())))
    code, log, result.wall_s = launch(backend, world, [str(FAULTS), backend, f"skip-{then}", str(out)], timeout, env)
    ranks = rank_files(out, world)
    if any(r is None for r in ranks):
        result.problems.append(f"a rank wrote nothing:\n{log[-3000:]}")
        return result
    # In call order, every rank went through the same states: same decisions, shifted data.
    sequences = [[s[1:] for s in r["states"]] for r in ranks]
    shortest = min(len(s) for s in sequences)
    if any(s[:shortest] != sequences[0][:shortest] for s in sequences):
        result.problems.append(f"ranks took different decisions: {sequences}")
    stuck_since = ranks[1].get("entered")
    if backend == "horovod":
        result.limits = [r.get("limit_s") for r in ranks]
    if code is None:
        result.problems.append(f"hang: the launch did not end within {timeout}s")
        result.longest_error_s = math.inf
        return result
    for r, data in enumerate(ranks):
        if r == 1 and then == "exit":
            continue
        if r == 1 and backend == "horovod" and not data.get("error") and "finished_at" not in data:
            # Rank 1 waits in its own allreduce, not in step(). Once the ranks in step() have raised
            # and exited, horovodrun terminates every rank still running (on any non-zero exit:
            # horovod/runner/gloo_run.py, 0.28.1), sometimes before rank 1 reported the
            # HorovodInternalError it gets when their sockets close. Bounded all the same: the
            # launch ended. (This was the campaign's flaky row: 2 of 22 launches.)
            result.notes.append("rank 1: ended by horovodrun after the others raised, before it reported")
            continue
        if not data.get("error"):
            result.problems.append(f"rank {r} finished without an error: {data}")
            continue
        delay = data["error_at"] - stuck_since
        result.longest_error_s = max(result.longest_error_s, delay)
        result.errors[r] = f"{data['error']}: {data['message']}"
        result.notes.append(f"rank {r}: {data['error']} in {data['where']} after {delay:.2f}s: "
                            f"{data['message'][:110]}")
    return result


# --- fault (d): checkpoint saved at one world size, resumed at another -------------------------
def reference_states(save_world: int, resume_world: int) -> list[str]:
    """Torch's own ``ReduceLROnPlateau``, uninterrupted, fed the expected global value of every
    step of both parts: the state after each step of the second part."""
    torch_kw = {k: v for k, v in CHECKPOINT_KWARGS.items() if k not in ("reduction", "nan_policy")}
    ref = ReduceLROnPlateau(torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0), **torch_kw)
    last: float | None = None
    states = []
    rows = (checkpoint_rows(save_world, CHECKPOINT_SAVE_STEPS, CHECKPOINT_SEED)
            + checkpoint_rows(resume_world, CHECKPOINT_RESUME_STEPS, CHECKPOINT_SEED + 1))
    for t, row in enumerate(rows):
        want = expected_step(row, CHECKPOINT_KWARGS["reduction"], CHECKPOINT_KWARGS["nan_policy"], last)
        assert want.error is None, want
        if want.value is not None:
            ref.step(want.value)
            last = want.value if math.isfinite(want.value) else last
        if t >= CHECKPOINT_SAVE_STEPS:
            states.append(snapshot(ref))
    return states


def checkpoint(save: tuple[str, int], resumes: list[tuple[str, int]], tmp: Path, timeout: float = 120) -> Result:
    """Save at ``save`` = (backend, world), resume at each of ``resumes``; every rank of every
    resumed run must follow the uninterrupted reference step for step."""
    result = Result(f"checkpoint {save[0]} x{save[1]} -> " + ", ".join(f"{b} x{w}" for b, w in resumes))
    out = tmp / f"save-{save[0]}-{save[1]}"
    code, log, wall = launch(save[0], save[1], [str(FAULTS), save[0], "save", str(out)], timeout)
    result.wall_s += wall
    ckpt = out.with_name(out.name + ".ckpt")
    if code != 0 or not ckpt.exists():
        result.problems.append(f"save failed ({code}):\n{log[-3000:]}")
        return result
    for backend, world in resumes:
        result.faults += 1
        rout = tmp / f"resume-{save[1]}-{backend}-{world}"
        code, log, wall = launch(backend, world, [str(FAULTS), backend, "resume", str(rout), str(ckpt)], timeout)
        result.wall_s += wall
        want = reference_states(save[1], world)
        for r, data in enumerate(rank_files(rout, world)):
            got = [s[1] for s in data["states"]] if data else None
            result.steps += len(got or [])
            if got != want:
                result.mismatches += 1
                result.problems.append(f"resume at {backend} x{world}, rank {r} ({code}): {got} != {want}\n"
                                       f"{log[-2000:]}")
    return result
