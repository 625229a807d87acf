"""Does smoothing help? ``smoothing_factor`` and a training-loss window on real training, 2 ranks.

``python bench/noisy.py [--seeds 0 1 2 3 4] [--epochs 40]`` launches ``bench/noisy_worker.py``
(the model, data and configurations are described there) on 2 torch.distributed gloo ranks under
a hard timeout and prints one Markdown table: per configuration, over the seeds, the test
accuracy and loss after the last epoch, the number of learning-rate reductions and the epoch of
the first one. Not part of ``bash dev.sh test`` (minutes of training); the table and what it
says are in ``docs/guides/noisy-metrics.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.abtest import format_table  # noqa: E402
from harness.launch import launch_json, run_torch  # noqa: E402

WORKER = os.path.join(ROOT, "bench", "noisy_worker.py")


def _spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    mean = statistics.fmean(values) * scale
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    rows = []
    for name, runs in results.items():
        firsts = [r["first_cut"] for r in runs if r["first_cut"] is not None]
        accuracy, cuts = [r["accuracy"] for r in runs], [r["reductions"] for r in runs]
        rows.append([name, _spread(accuracy, 100.0), f"{min(accuracy) * 100:.1f}",
                     _spread([r["test_loss"] for r in runs], digits=3),
                     f"{statistics.fmean(cuts):.1f} ({min(cuts)}-{max(cuts)})",
                     f"{statistics.fmean(firsts):.1f}" if firsts else "none",
                     " ".join(f"{r['accuracy'] * 100:.1f}" for r in runs)])
    return format_table(["configuration", "test accuracy % (mean ± sd)", "worst seed", "test loss",
                         "reductions (range)", "first cut (epoch, mean)", "accuracy per seed"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--label-noise", type=float, default=0.0, help="share of training labels made random")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for the launch")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        result = launch_json(run_torch, 2, [WORKER, str(out), "--seeds", *map(str, args.seeds), "--epochs",
                                            str(args.epochs), "--lr", str(args.lr), "--label-noise",
                                            str(args.label_noise)], out=out, timeout=args.timeout)
    if isinstance(result, str):
        print(f"bench/noisy_worker.py {result}")
        sys.exit(1)
    print(f"{len(args.seeds)} seeds ({' '.join(map(str, args.seeds))}), {result['epochs']} epochs, learning rate "
          f"{result['lr']}, {result['label_noise']:.0%} of the training labels random, 2 ranks (torch.distributed "
          f"gloo), {time.monotonic() - started:.0f} s\n")
    print(table(result["results"]))


if __name__ == "__main__":
    main()
