"""What a window costs: ``accumulation_size=1`` vs ``100`` on real ranks, per call of ``step``.

``python bench/window.py`` launches
``bench/window_worker.py`` on 2 and 4 ranks of torch.distributed gloo and of ``horovodrun
--gloo``, each under a hard timeout, and prints one Markdown table: the collectives counted in
1000 calls of each setting, and the time per call of each, measured side by side.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.abtest import format_table  # noqa: E402
from bench.window_worker import CALLS  # noqa: E402
from harness.launch import horovodrun_available, launch_json, run_horovod, run_torch  # noqa: E402

WORKER = os.path.join(ROOT, "bench", "window_worker.py")


def measure(backends: list[str], sizes: list[int], blocks: int, timeout: float) -> list[tuple[str, int, Any]]:
    """(backend, ranks, the worker's result or why there is none) for every pair."""
    runs = []
    for backend in backends:
        if backend == "horovod" and not horovodrun_available():
            runs += [(backend, size, "Horovod is not installed") for size in sizes]
            continue
        for size in sizes:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "result.json"
                launch = run_horovod if backend == "horovod" else run_torch
                result = launch_json(launch, size, [WORKER, backend, str(out), "--blocks", str(blocks)], out=out,
                                     timeout=timeout)
            runs.append((backend, size, result))
            print(f"({backend}, {size} ranks: done)", file=sys.stderr, flush=True)
    return runs


def table(runs: list[tuple[str, int, Any]], cores: int) -> str:
    rows = []
    for backend, size, result in runs:
        if isinstance(result, str):
            rows.append([backend, str(size), result, "", "", "", "", ""])
            continue
        one, hundred = result["timing"]
        counted = result["collectives"]
        rows.append([backend, str(size), f"{counted['1']} / {counted['100']}", f"{one['us_per_call']:.1f}",
                     f"{hundred['us_per_call']:.1f}", f"**{hundred['median']:.3f}x**",
                     f"{hundred['low']:.3f}-{hundred['high']:.3f}",
                     f"oversubscribed: {size} ranks on {cores} cores" if size > cores else ""])
    return format_table(["backend", "ranks", f"collectives in {CALLS} calls (size 1 / size 100)",
                         "us per call, size 1", "us per call, size 100", "size 100 / size 1 (median)", "min-max",
                         "note"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["torch", "horovod"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--blocks", type=int, default=10, help="A/B blocks of 200 calls each")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per launch")
    args = parser.parse_args()
    runs = measure(args.backends, args.sizes, args.blocks, args.timeout)
    print(table(runs, os.cpu_count() or 1))
    sys.exit(1 if any(isinstance(result, str) for _, _, result in runs) else 0)


if __name__ == "__main__":
    main()
