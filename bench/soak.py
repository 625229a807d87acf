"""Soak: 100 000 steps on 2 real ranks, gloo and Horovod, looking for slow leaks and divergence.

Run: ``python bench/soak.py [--steps 100000] [--backends torch,horovod] [--seed 1]`` (not part
of ``bash dev.sh bench`` nor of CI: 100 000 steps took 196 s on gloo, and 50 000 took 390 s on
Horovod, on 2 cores loaded by other jobs; about 1-2 minutes per backend idle, by the step times).
Each backend is one launch of ``bench/soak_worker.py`` on 2 ranks under a hard timeout: random
metrics (floats and 0-d tensors, NaN or Inf one step in a hundred), random weights (0 now and
then on rank 1), ``sync_state`` every 1 000 steps. Prints a Markdown table: the step time and
anonymous resident memory (heap: where a leak shows; the file-backed part, torch's libraries,
the kernel may drop at any time) over the first and the last 10 000 steps, their trend
(least-squares slope per 10 000 steps, over every 1 000-step sample but the first, which holds
the warm-up), and the
divergences: 1 000-step samples at which the ranks' scheduler state and learning rates
(compared as a digest, taken before that block's ``sync_state``) were not identical.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.abtest import format_table  # noqa: E402
from bench.run_all import machine  # noqa: E402
from bench.soak_worker import BLOCK  # noqa: E402
from harness.launch import horovodrun_available, run_horovod, run_torch  # noqa: E402

WINDOW = 10_000  #: steps averaged for "start" and "end", and the unit of the slopes


def soak(backend: str, steps: int, seed: int, timeout: float) -> list[dict[str, Any]] | str:
    """Every rank's result of one launch on 2 ranks, or why there is none."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "soak"
        args = [os.path.join(ROOT, "bench", "soak_worker.py"), backend, str(out), str(steps), str(seed)]
        launch = run_horovod if backend == "horovod" else run_torch
        try:
            done = launch(2, args, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            sys.stderr.write(str(err.output or "")[-4000:])
            return f"timed out after {timeout:.0f} s"
        files = [out.with_name(f"soak.rank{rank}.json") for rank in range(2)]
        if done.returncode != 0 or not all(f.exists() for f in files):
            sys.stderr.write(done.stdout[-4000:])
            return f"failed (exit status {done.returncode})"
        return [json.loads(f.read_text()) for f in files]


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def summary(ranks: list[dict[str, Any]]) -> dict[str, float]:
    """Figures of one launch: the slower rank's step time and the larger resident memory."""
    blocks = len(ranks[0]["samples"])
    window = max(1, min(WINDOW // BLOCK, blocks // 2))
    step_us = [max(r["samples"][i]["block_s"] for r in ranks) / BLOCK * 1e6 for i in range(blocks)]
    anon_mib = [max(r["samples"][i]["memory_kib"]["anon"] for r in ranks) / 1024 for i in range(blocks)]
    file_mib = [max(r["samples"][i]["memory_kib"]["file"] for r in ranks) / 1024 for i in range(blocks)]
    at = [float(s["step"]) for s in ranks[0]["samples"]]
    trend = slice(1, None) if blocks > 2 else slice(None)
    return {
        "steps": ranks[0]["steps"],
        "step_us_start": statistics.median(step_us[:window]), "step_us_end": statistics.median(step_us[-window:]),
        "step_us_slope": slope(at[trend], step_us[trend]) * WINDOW,
        "anon_mib_start": statistics.fmean(anon_mib[:window]), "anon_mib_end": statistics.fmean(anon_mib[-window:]),
        "anon_kib_slope": slope(at[trend], anon_mib[trend]) * 1024 * WINDOW,
        "file_mib_start": statistics.fmean(file_mib[:window]), "file_mib_end": statistics.fmean(file_mib[-window:]),
        "divergences": sum(len({r["samples"][i]["digest"] for r in ranks}) != 1 for i in range(blocks)),
        "compared": blocks, "last_epoch": ranks[0]["last_epoch"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100_000, help="steps per backend (a multiple of 1000)")
    parser.add_argument("--backends", default="torch,horovod")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per launch before it is killed")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    print(f"Run {datetime.date.today().isoformat()} on {machine()}; {args.steps} steps, seed {args.seed}.\n",
          flush=True)
    rows, figures, failed = [], {}, False
    for backend in args.backends.split(","):
        if backend == "horovod" and not horovodrun_available():
            print("horovod: not installed (python -m distplateau.install_horovod); skipped", flush=True)
            continue
        started = time.monotonic()
        result = soak(backend, args.steps, args.seed, args.timeout)
        wall = time.monotonic() - started
        label = "torch.distributed gloo" if backend == "torch" else "Horovod (gloo)"
        if isinstance(result, str):
            failed = True
            rows.append([label, result] + [""] * 7)
            continue
        f = figures[backend] = {**summary(result), "wall_s": wall}
        failed |= f["divergences"] > 0
        rows.append([label, f"{f['steps']} in {wall:.0f} s",
                     f"{f['step_us_start']:.0f} -> {f['step_us_end']:.0f}", f"{f['step_us_slope']:+.1f}",
                     f"{f['anon_mib_start']:.1f} -> {f['anon_mib_end']:.1f}", f"{f['anon_kib_slope']:+.1f}",
                     f"{f['file_mib_start']:.0f} -> {f['file_mib_end']:.0f}",
                     f"**{f['divergences']}** of {f['compared']}", str(f["last_epoch"])])
    print(format_table(["backend (2 ranks)", "steps", "step us, first -> last 10k (median, slower rank)",
                        "us per 10k steps (slope)", "anonymous RSS MiB, first -> last 10k (larger rank)",
                        "anonymous RSS KiB per 10k steps (slope)", "file-backed RSS MiB", "divergences",
                        "last_epoch"], rows))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
