"""What the strategy costs: one model's epoch time, trained three ways on 2 real ranks.

The three ways: ``Trainer(strategy="horovod")`` (distplateau's ``HorovodStrategy``), a raw
Horovod loop without Lightning, and ``Trainer(strategy="ddp")``.

Run: ``python bench/strategy.py [--blocks 5]`` (also part of ``bash dev.sh bench``).
One ``horovodrun -np 2 --gloo`` launch, under a hard timeout, runs ``bench/strategy_worker.py``:
every block fits the same ~1.3M-parameter MLP once per configuration, in rotating order, so
that drift cancels. Prints a Markdown table: the median epoch time of each configuration, and
the median over blocks of (its epoch time / the raw Horovod loop's in the same block), with
the min and max over blocks; the same for the median step, which a burst of other work on
the machine moves less. Target: ``strategy="horovod"`` at most 1.05x the raw loop's epoch.
Start-up (``Trainer()`` and ``fit`` up to the first epoch) is not in the epoch time; it is
its own column.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.abtest import format_table  # noqa: E402
from harness.launch import horovodrun_available, run_horovod  # noqa: E402

TARGET = 1.05
IDLE = 0.1  # cores other processes may keep busy in a block that counts as run on an idle machine
LABELS = {"raw": "raw Horovod loop (no Lightning)", "horovod": 'Lightning `strategy="horovod"` (distplateau)',
          "ddp": 'Lightning `strategy="ddp"` (gloo)'}


def available() -> bool:
    """Whether this environment can run the benchmark: Horovod with horovodrun, and Lightning."""
    return horovodrun_available() and importlib.util.find_spec("lightning") is not None


def measure(blocks: int, timeout: float, epochs: int = 4, steps: int = 32) -> dict[str, Any] | str:
    """The worker's results on 2 ranks, or why there are none."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        args = [os.path.join(ROOT, "bench", "strategy_worker.py"), out, "--blocks", str(blocks),
                "--epochs", str(epochs), "--steps", str(steps)]
        try:
            done = run_horovod(2, args, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            sys.stderr.write(str(err.output or "")[-4000:])
            return f"timed out after {timeout:.0f} s"
        if done.returncode != 0 or not os.path.exists(out):
            sys.stderr.write(done.stdout[-4000:])
            return f"failed (exit status {done.returncode})"
        with open(out) as f:
            result: dict[str, Any] = json.load(f)
            return result


def table(result: dict[str, Any]) -> str:
    """The Markdown table and a paragraph on what was run and checked."""
    runs = result["runs"]

    def per_block(config: str, statistic: Any, key: str) -> list[float]:
        return [statistic(run[key][1:] if key == "epochs_s" else run[key]) for run in runs[config]]

    rows, ratio, horovod_by_epoch = [], {}, []
    for config in ("raw", "horovod", "ddp"):
        epochs = [t for run in runs[config] for t in run["epochs_s"][1:]]
        steps = [t for run in runs[config] for t in run["timed_steps_s"]]
        # Per block: the mean timed epoch (what the target is about), and the median step,
        # which a burst of other work on the machine moves less.
        by_epoch = [t / r for t, r in zip(per_block(config, statistics.mean, "epochs_s"),
                                          per_block("raw", statistics.mean, "epochs_s"))]
        by_step = [t / r for t, r in zip(per_block(config, statistics.median, "timed_steps_s"),
                                         per_block("raw", statistics.median, "timed_steps_s"))]
        ratio[config] = statistics.median(by_epoch)
        if config == "horovod":
            horovod_by_epoch = by_epoch
        bold = "**" if config == "horovod" else ""
        rows.append([LABELS[config], f"{statistics.median(epochs):.3f}", f"{min(epochs):.3f}-{max(epochs):.3f}",
                     f"{bold}{ratio[config]:.3f}x{bold}", f"{min(by_epoch):.3f}-{max(by_epoch):.3f}",
                     f"{statistics.median(steps) * 1e3:.1f}", f"{statistics.median(by_step):.3f}x",
                     f"{min(by_step):.3f}-{max(by_step):.3f}",
                     f"{statistics.median(run['startup_s'] for run in runs[config]):.2f}"])
    text = format_table(["configuration", "epoch (s), median", "min-max", "epoch / raw Horovod (median of blocks)",
                         "min-max", "step (ms), median", "step / raw Horovod (median of blocks)", "min-max",
                         "start-up (s), median"], rows)
    ranks_equal = all(run["ranks_equal"] for config in runs for run in runs[config])
    diff = {config: max(run["max_abs_diff_to_raw"] for run in runs[config]) for config in ("horovod", "ddp")}
    verdict = "met" if ratio["horovod"] <= TARGET else "not met"
    low, high = _median_interval(horovod_by_epoch)
    return (f"{text}\n\n{len(runs['raw'])} blocks; each fits a {result['parameters']:,}-parameter MLP once per "
            f"configuration, {result['epochs']} epochs of {result['steps']} steps of batch {result['batch_size']} "
            f"per rank on {result['world']} ranks, the first epoch untimed. Weights identical on both ranks after "
            f"every fit: {'yes' if ranks_equal else 'NO'}. Largest |weight - raw loop's weight| after a fit: "
            f"horovod {diff['horovod']:.2g}, ddp {diff['ddp']:.2g}. "
            f"Target `strategy=\"horovod\"` <= {TARGET:.2f}x the raw loop's epoch: **{verdict}** "
            f"({ratio['horovod']:.3f}x; 95% confidence interval of that median: {low:.3f}-{high:.3f}). "
            f"Other processes kept {statistics.mean(result['other_cores']):.2f} of the machine's cores busy on "
            f"average, {max(result['other_cores']):.2f} in the busiest block; "
            f"{_idle_blocks(horovod_by_epoch, result['other_cores'])}")


def _median_interval(values: list[float]) -> tuple[float, float]:
    """An interval that holds the true median with about 95% probability, from order statistics
    (no assumption on the distribution of the blocks; min-max for 5 blocks or fewer)."""
    ordered, half = sorted(values), 0.98 * math.sqrt(len(values))
    low, high = max(round(len(values) / 2 - half), 1), min(round(1 + len(values) / 2 + half), len(values))
    return ordered[low - 1], ordered[high - 1]


def _idle_blocks(ratios: list[float], other_cores: list[float]) -> str:
    # Two ranks on two cores: Horovod's cycle stalls whenever anything else takes a core, so
    # the blocks that ran on an otherwise idle machine are the cleanest reading.
    idle = [r for r, busy in zip(ratios, other_cores) if busy < IDLE]
    if not idle:
        return f"no block ran with other processes below {IDLE} cores."
    return (f"in the {len(idle)} blocks with other processes below {IDLE} cores, `strategy=\"horovod\"` took "
            f"{statistics.median(idle):.3f}x the raw loop's epoch ({min(idle):.3f}-{max(idle):.3f}).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=5, help="blocks of one fit per configuration")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per fit, the first one untimed")
    parser.add_argument("--steps", type=int, default=32, help="steps per epoch on each rank")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for the whole launch")
    parser.add_argument("--json", help="also write every measured time to this file")
    args = parser.parse_args()
    if not available():
        sys.exit("needs Horovod (python -m distplateau.install_horovod) and Lightning (pip install lightning)")
    started = time.monotonic()
    result = measure(args.blocks, args.timeout, args.epochs, args.steps)
    if isinstance(result, str):
        sys.exit(f"strategy benchmark {result}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(table(result))
    print(f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
