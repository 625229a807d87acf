"""Import cost of ``distplateau`` on top of ``import torch``, and what it leaves unimported.

Run: ``python bench/import_cost.py``. Each run is a fresh interpreter that imports torch,
then distplateau, timing both, and lists which of Horovod and Lightning ended up in
``sys.modules`` (the promise: none).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.abtest import format_table  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("horovod", "horovod.torch", "lightning", "lightning.pytorch", "pytorch_lightning")

_PROBE = f"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import distplateau
t2 = time.perf_counter()
print(json.dumps({{"torch": t1 - t0, "distplateau": t2 - t1,
                  "imported": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def measure(runs: int) -> list[dict[str, object]]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    result = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                             timeout=120, check=True).stdout
        result.append(json.loads(out.strip().splitlines()[-1]))
    return result


def table(runs: list[dict[str, object]]) -> str:
    ms = [float(r["distplateau"]) * 1e3 for r in runs]  # type: ignore[arg-type]
    torch_ms = [float(r["torch"]) * 1e3 for r in runs]  # type: ignore[arg-type]
    share = [d / t for d, t in zip(ms, torch_ms)]
    imported = sorted({m for r in runs for m in r["imported"]})  # type: ignore[attr-defined]
    return format_table(
        ["", "median", "min-max"],
        [["`import torch` (ms)", f"{statistics.median(torch_ms):.0f}", f"{min(torch_ms):.0f}-{max(torch_ms):.0f}"],
         ["`import distplateau` after it (ms)", f"**{statistics.median(ms):.1f}**", f"{min(ms):.1f}-{max(ms):.1f}"],
         ["distplateau / torch", f"{100 * statistics.median(share):.2f}%",
          f"{100 * min(share):.2f}-{100 * max(share):.2f}%"],
         [f"Horovod or Lightning modules imported ({len(runs)} runs)", ", ".join(imported) or "**none**", ""]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6)
    args = parser.parse_args()
    print(table(measure(args.runs)))


if __name__ == "__main__":
    main()
