"""What bounding a Horovod ``step()`` costs: ``python bench/horovod_wait.py`` (also in ``bash dev.sh bench``).

On 2 and 4 real ranks under ``horovodrun --gloo``, one launch each, every rank times in
alternating blocks (``bench/abtest.py``) three schedulers that differ only in how ``step()``
waits for its allgather:

* ``DISTPLATEAU_HOROVOD_TIMEOUT_S=0``: Horovod's own blocking ``allgather`` (the baseline; what
  ``step()`` did by default before the bound);
* unset: the default bound, the same allgather started asynchronously and polled, then polled
  less and less often (``distplateau._gather.HorovodGather._wait``);
* 0.2.0's bounded wait: a 1 ms sleep between polls;
* the default's back-off from the first poll on, without its first 2 ms of polling as
  ``hvd.synchronize`` polls (what ``SPIN_S`` buys).

Prints a Markdown table of their times per ``step`` and ratios to the baseline (median of
blocks, min-max), and the load average before and after each launch (a polling wait slows down
when other processes want the cores); the target is a median of at most 1.05x for the default
bound. Exits 1 if a launch fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.abtest import format_table  # noqa: E402
from harness.launch import horovodrun_available, launch_json, run_horovod  # noqa: E402

TARGET = 1.05
CORES = os.cpu_count() or 1


def measure(size: int, blocks: int, iters: int, timeout: float) -> list[dict[str, float | str]] | str:
    """The ``wait`` table of ``bench/ranks.py`` on ``size`` Horovod ranks, or why there is none."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        args = [os.path.join(ROOT, "bench", "ranks.py"), "horovod", str(out), "--blocks", str(blocks),
                "--iters", str(iters), "--tables", "wait"]
        result = launch_json(run_horovod, size, args, out=out, timeout=timeout)
        return result if isinstance(result, str) else list(result["wait"])


def rows(size: int, result: list[dict[str, float | str]] | str) -> list[list[str]]:
    note = f"oversubscribed: {size} ranks on {CORES} cores" if size > CORES else ""
    if isinstance(result, str):
        return [[str(size), result, "", "", "", note]]
    return [[str(size), str(r["name"]), f"{r['us_per_call']:.0f}",
             f"**{r['median']:.3f}x**" if i == 1 else f"{r['median']:.3f}x",
             f"{r['low']:.2f}-{r['high']:.2f}", note] for i, r in enumerate(result)]


def table(results: dict[int, list[dict[str, float | str]] | str]) -> str:
    return format_table(["ranks", "how step() waits", "us per step (median)", "time / blocking wait (median)",
                         "min-max", "note"], [row for size, result in results.items() for row in rows(size, result)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--blocks", type=int, default=40, help="A/B blocks per launch")
    parser.add_argument("--iters", type=int, default=50, help="steps of each variant per block")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per launch")
    args = parser.parse_args()
    if not horovodrun_available():
        sys.exit("Horovod is not installed: python -m distplateau.install_horovod")
    results: dict[int, list[dict[str, float | str]] | str] = {}
    for size in args.sizes:
        t0, load = time.monotonic(), os.getloadavg()[0]
        results[size] = measure(size, args.blocks, args.iters, args.timeout)
        # The load average says how much else ran: Horovod's spinning wait slows down on a busy machine.
        print(f"({size} ranks: {time.monotonic() - t0:.0f} s; load average {load:.1f} before, "
              f"{os.getloadavg()[0]:.1f} after, on {CORES} cores)", flush=True)
    print(table(results))
    for size, result in results.items():
        if not isinstance(result, str):
            ratio = float(result[1]["median"])
            print(f"{size} ranks: default bound / blocking wait {ratio:.3f}x "
                  f"({'within' if ratio <= TARGET else 'OVER'} the {TARGET:.2f}x target)")
    sys.exit(1 if any(isinstance(r, str) for r in results.values()) else 0)


if __name__ == "__main__":
    main()
