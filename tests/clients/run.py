"""The real-client suite: each library's own training path on 2 real CPU ranks, with torch's class and ours.

    python -m tests.clients.run                  # bash dev.sh clients: every case, a table at the end
    python -m tests.clients.run --only ignite,darts --keep-out /tmp/clients

Each case is a module of this folder (see ``CASES``) with the attributes :class:`Case` reads and a
``main()`` that runs on every rank. For each case this command builds ``.venv-clients/<case>``
(torch 2.13.0 CPU in the same pip command as the library, so that nothing pulls a CUDA torch;
kept and reused while its requirements are unchanged), launches the variants of
``tests/clients/record.py`` under a hard timeout that kills the launch's process group, checks
what the ranks recorded, and prints one row: torch's class diverged (or the library already
gathers), ours identical and exact, resume exact. Exits 1 if a case failed. The table also goes
to ``.venv-clients/results.md``, each launch's output to ``.venv-clients/logs/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

from harness.launch import child_env, free_port, run
from tests.clients import record
from tests.compat_torch import step  # a pip step under timeout(1), its output in the log

ROOT = Path(__file__).resolve().parent.parent.parent
ENVS = ROOT / ".venv-clients"
# Light first: ignite and skorch also run in CI (tests/test_clients.py).
CASES = ["ignite", "skorch", "darts", "neuralforecast", "schnetpack", "mace", "timm"]
TORCH = "torch==2.13.0"  # the CPU build on this machine's disk


@dataclasses.dataclass
class Case:
    """A case module's declarations."""

    name: str
    library: str  # the PyPI name, for the table
    field: str
    seam: str  # how the user swaps the class in, for the table
    requirements: list[str]  # pip requirements besides torch and distplateau (pinned)
    extras: str  # distplateau's extras the case needs, e.g. "pytorch-lightning"
    launcher: str  # "python": the script starts its own ranks (Lightning DDP, ignite); "torchrun"
    baseline: str  # "diverges": the library does not gather the metric; "synced": it does
    # The resume through the library's own checkpoint: "exact" (the two parts step as the
    # uninterrupted run), "state" (the scheduler's state continues, but the library's resume
    # does not repeat the uninterrupted run), or "" (the library saves no scheduler state).
    resume: str
    timeout: int  # seconds for one launch
    torch: str = TORCH  # the torch pin (a torchvision-based library needs the CUDA build with its torchvision)

    @classmethod
    def load(cls, name: str) -> Case:
        module: ModuleType = importlib.import_module(f"tests.clients.{name}")
        fields = {f.name for f in dataclasses.fields(cls)} - {"name"}
        return cls(name=name, **{key: getattr(module, key.upper()) for key in fields if hasattr(module, key.upper())})


@dataclasses.dataclass
class Row:
    case: str
    library: str = "-"
    version: str = "-"
    field: str = "-"
    seam: str = "-"
    baseline: str = "-"
    ours: str = "-"
    resume: str = "-"
    seconds: float = 0.0
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def build(case: Case, log: Path) -> Path:
    """``.venv-clients/<case>`` with the pinned torch, distplateau (editable) and the library; its python."""
    env_dir = ENVS / case.name
    python = env_dir / "bin" / "python"
    spec = f".[{case.extras}]" if case.extras else "."
    want = " ".join([case.torch, spec, *case.requirements])
    stamp = env_dir / ".distplateau-clients"
    if stamp.exists() and stamp.read_text() == want:
        return python
    if env_dir.exists():
        shutil.rmtree(env_dir)
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    step("upgrade pip", [str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], log, 300)
    step(f"install {case.torch}, distplateau and {case.library}",
         [str(python), "-m", "pip", "install", "-q", case.torch, "-e", spec, *case.requirements], log, 1800)
    stamp.write_text(want)
    return python


def launch(case: Case, python: str, variant: str, out: Path, log: Path) -> None:
    """One launch of the case on 2 ranks; its output appended to ``log``."""
    script = ["-m", f"tests.clients.{case.name}", variant, str(out)]
    port = str(free_port())
    if case.launcher == "torchrun":
        cmd = [python, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", port, *script]
    else:  # Lightning's DDP launcher takes MASTER_PORT from the environment
        cmd = [python, *script]
    start = time.monotonic()
    try:
        text = run(cmd, case.timeout, child_env({"PYTHONUNBUFFERED": "1", "MASTER_PORT": port})).stdout
        ended = "finished"
    except subprocess.TimeoutExpired as err:
        text, ended = str(err.output), f"TIMED OUT after {case.timeout} s"
    with log.open("a") as f:
        f.write(f"\n=== {variant}: {ended} in {time.monotonic() - start:.0f} s\n{text}")


def run_case(case: Case, python: str, out: Path, log: Path) -> Row:
    """Launch every variant of ``case`` with ``python`` and check what the ranks recorded."""
    row = Row(case.name, case.library, _version(python, case.library), case.field, case.seam)
    start = time.monotonic()
    variants = ["torch", "ours"] + (["resume-1", "resume-2"] if case.resume else [])
    if case.resume not in ("exact", "state", ""):
        raise ValueError(f"{case.name}: RESUME must be 'exact', 'state' or ''; got {case.resume!r}")
    for variant in variants:
        launch(case, python, variant, out, log)
    row.seconds = time.monotonic() - start
    theirs, ours = record.load(out, "torch", 2), record.load(out, "ours", 2)
    if not theirs[0]:
        row.problems.append("torch's class: no step recorded")
    elif case.baseline == "diverges":
        row.baseline = "diverged" if record.diverged(theirs) else "did NOT diverge"
        if not record.diverged(theirs):
            row.problems.append("torch's class did not diverge: the case proves nothing")
    else:
        row.baseline = "synced by the library"
        if record.diverged(theirs):
            row.problems.append("torch's class diverged although the case says the library gathers")
        elif [r["lrs"] for r in theirs[0]] != [r["lrs"] for r in ours[0]]:
            row.problems.append("ours did not give torch's learning rates where the library gathers: "
                                f"{[r['lrs'] for r in ours[0]]} vs {[r['lrs'] for r in theirs[0]]}")
    reference = record.load_reference(out, "ours")
    problems = record.check_ours(ours, reference=reference)
    row.ours = "identical, exact" if not problems else "FAILED"
    row.problems += [f"ours: {p}" for p in problems]
    if case.resume:
        problems = record.check_resume(record.load(out, "resume-1", 2), record.load(out, "resume-2", 2),
                                       ours if case.resume == "exact" else None, reference)
        row.resume = ("exact" if case.resume == "exact" else "state exact") if not problems else "FAILED"
        row.problems += [f"resume: {p}" for p in problems]
    if not row.ok:
        row.problems.append(f"launch output: {log}")
    return row


def _version(python: str, distribution: str) -> str:
    done = subprocess.run([python, "-c", f"import importlib.metadata as m; print(m.version({distribution!r}))"],
                          capture_output=True, text=True, check=False)
    return done.stdout.strip() or "?"


def table(rows: list[Row]) -> str:
    lines = ["| library | version | field | seam | torch's class | ours | resume | s |",
             "|---|---|---|---|---|---|---|---:|"]
    lines += [f"| {r.library} | {r.version} | {r.field} | {r.seam} | {r.baseline} | {r.ours} | {r.resume} | "
              f"{r.seconds:.0f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(CASES), help="comma-separated cases (default: all)")
    parser.add_argument("--keep-out", type=Path, help="keep the ranks' records in this folder")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; use {CASES}")
    (ENVS / "logs").mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        case = Case.load(name)
        log = ENVS / "logs" / f"{name}.log"
        log.write_text("")
        print(f"{name}: building .venv-clients/{name} ...", flush=True)
        try:
            python = build(case, log)
        except RuntimeError as err:
            rows.append(Row(name, case.library, problems=[f"build failed: {err}"]))
            print(f"{name}: build FAILED ({log})", flush=True)
            continue
        out = (args.keep_out / name) if args.keep_out else Path(tempfile.mkdtemp(prefix=f"clients-{name}-"))
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        row = run_case(case, str(python), out, log)
        rows.append(row)
        print(f"{name}: {'ok' if row.ok else 'FAILED'} in {row.seconds:.0f} s", flush=True)
        for problem in row.problems:
            print(f"  {problem}", flush=True)
    text = f"Real clients, {datetime.date.today()}, 2 ranks each (python -m tests.clients.run)\n\n{table(rows)}\n"
    (ENVS / "results.md").write_text(text)
    print("\n" + text)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
