"""Every benchmark, one command: ``bash dev.sh bench`` (or ``tox -e bench``).

Prints Markdown tables (the ones in ``docs/benchmarks.md``): the single-process hot path,
the import cost, and, on 2, 3 and 4 real ranks under horovodrun and torch.distributed gloo,
our ``step`` against one bare collective and against the alternatives a user could write,
and under horovodrun our ``step`` with the default bound on its wait against Horovod's blocking
wait (``bench/horovod_wait.py``); and, on 2 ranks, the epoch time of one model under
``Trainer(strategy="horovod")``, a raw Horovod loop and ``Trainer(strategy="ddp")``
(``bench/strategy.py``); and the cost of a call of ``step`` with ``accumulation_size=100``
against 1, with the collectives counted (``bench/window.py``).
Each multi-rank run is launched here with a hard timeout; a run that fails or hangs is
reported in the tables and makes the exit status 1, it never stalls the command.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench import horovod_wait, import_cost, local_step, strategy, window  # noqa: E402
from bench.abtest import format_table  # noqa: E402
from harness.launch import horovodrun_available, launch_json, run_horovod, run_torch  # noqa: E402

CORES = os.cpu_count() or 1


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import horovod

        hvd = horovod.__version__
    except ImportError:
        hvd = "not installed"
    return (f"{CORES} cores (`nproc`), {model}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, Horovod {hvd}")


def _ranks(backend: str, size: int, blocks: int, iters: int, timeout: float,
           env: dict[str, str] | None = None) -> dict[str, list[dict[str, float | str]]] | str:
    """Results of ``bench/ranks.py`` on ``size`` real ranks, or why there are none."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        args = [os.path.join(ROOT, "bench", "ranks.py"), backend, str(out), "--blocks", str(blocks),
                "--iters", str(iters)]
        launch = run_horovod if backend == "horovod" else run_torch
        result: dict[str, list[dict[str, float | str]]] | str = launch_json(launch, size, args, out=out,
                                                                             timeout=timeout, env=env)
        return result


def _note(size: int) -> str:
    return f"oversubscribed: {size} ranks on {CORES} cores" if size > CORES else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--backends", nargs="+", default=["torch", "horovod"])
    parser.add_argument("--blocks", type=int, default=15, help="A/B blocks per multi-rank comparison")
    parser.add_argument("--iters", type=int, default=20, help="calls of each variant per block")
    parser.add_argument("--strategy-blocks", type=int, default=5,
                        help="blocks of the strategy benchmark (one fit per configuration each)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per multi-rank launch")
    parser.add_argument("--out", help="also write the Markdown to this file")
    args = parser.parse_args()
    started = time.monotonic()
    sections = [f"Run {datetime.date.today().isoformat()} on {machine()}.\n"
                f"Command: `bash dev.sh bench` (`python bench/run_all.py`).\n"]

    def emit(title: str, text: str) -> None:
        sections.append(f"### {title}\n\n{text}\n")
        print(sections[-1], flush=True)

    print(sections[0], flush=True)
    emit("Single process: our step vs torch's ReduceLROnPlateau.step",
         local_step.tables(local_step.measure(blocks=40, iters=10000)))
    emit("Import cost", import_cost.table(import_cost.measure(runs=6)))

    runs: list[tuple[str, int, dict[str, str] | None]] = []
    for backend in args.backends:
        if backend == "horovod" and not horovodrun_available():
            print("horovod: not installed (python -m distplateau.install_horovod); skipped\n")
            continue
        runs += [(backend, size, None) for size in args.sizes]
        if backend == "horovod" and 2 in args.sizes:
            runs.append((backend, 2, {"HOROVOD_CYCLE_TIME": "0.1"}))
    failed = False
    step_rows, alt_rows, design_rows = [], [], []
    waits: dict[int, list[dict[str, float | str]] | str] = {}
    for backend, size, env in runs:
        label = backend + (f", HOROVOD_CYCLE_TIME={env['HOROVOD_CYCLE_TIME']}" if env else "")
        t0 = time.monotonic()
        result = _ranks(backend, size, args.blocks, args.iters, args.timeout, env)
        print(f"({label}, {size} ranks: {time.monotonic() - t0:.0f} s)", flush=True)
        if isinstance(result, str):
            failed = True
            step_rows.append([label, str(size), result, "", "", "", "", "", ""])
            continue
        bare, ours, gathered = result["step"]
        over_gather = float(ours["us_per_call"]) / float(gathered["us_per_call"])
        step_rows.append([label, str(size), f"{bare['us_per_call']:.0f}", f"{gathered['us_per_call']:.0f}",
                          f"{ours['us_per_call']:.0f}", f"**{ours['median']:.2f}x**",
                          f"{ours['low']:.2f}-{ours['high']:.2f}", f"{over_gather:.2f}x", _note(size)])
        for r in result["alternatives"][1:]:
            alt_rows.append([label, str(size), str(r["name"]), f"{r['us_per_call']:.0f}",
                             f"**{r['median']:.2f}x**", f"{r['low']:.2f}-{r['high']:.2f}", _note(size)])
        if backend == "horovod" and not env:
            waits[size] = list(result["wait"])
        for r in result.get("design", []):
            design_rows.append([label, str(size), str(r["name"]), f"{r['us_per_call']:.0f}",
                                f"{r['median']:.2f}x", f"{r['low']:.2f}-{r['high']:.2f}"])
    if step_rows:
        emit("Distributed: our step vs one bare allreduce (target: at most 1.10x)",
             format_table(["backend", "ranks", "bare allreduce (us)", "bare allgather of the record (us)",
                           "our step (us)", "step / allreduce (median)", "min-max", "step / allgather (of medians)",
                           "note"], step_rows))
    if alt_rows:
        emit("Alternatives a user could write, as multiples of our step's time "
             "(target: at least 2x for the multi-collective and all_gather_object designs)",
             format_table(["backend", "ranks", "alternative", "us per step", "time / ours (median)", "min-max",
                           "note"], alt_rows))
    if design_rows:
        emit("Design: the bare collective, allgather of the record vs allreduce of the same information",
             format_table(["backend", "ranks", "collective", "us per call", "time / allgather (median)",
                           "min-max"], design_rows))
    if waits:
        emit(f"Horovod: our step with the default bound on its wait vs Horovod's blocking wait (target: at most "
             f"{horovod_wait.TARGET:.2f}x)", horovod_wait.table(waits))
    t0 = time.monotonic()
    windows = window.measure(args.backends, [size for size in args.sizes if size in (2, 4)] or [2], blocks=10,
                             timeout=args.timeout)
    print(f"(windows: {time.monotonic() - t0:.0f} s)", flush=True)
    failed |= any(isinstance(result, str) for _, _, result in windows)
    emit("Windows: accumulation_size=1 vs 100, per call of step", window.table(windows, CORES))
    if "horovod" in args.backends and strategy.available():
        t0 = time.monotonic()
        costs = strategy.measure(args.strategy_blocks, args.timeout)
        print(f"(strategy, 2 ranks: {time.monotonic() - t0:.0f} s)", flush=True)
        failed |= isinstance(costs, str)
        emit(f"What the strategy costs: epoch time on 2 ranks (target: `strategy=\"horovod\"` at most "
             f"{strategy.TARGET:.2f}x the raw Horovod loop)",
             f"strategy benchmark {costs}" if isinstance(costs, str) else strategy.table(costs))
    print(f"(all benchmarks: {time.monotonic() - started:.0f} s)")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(sections))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
