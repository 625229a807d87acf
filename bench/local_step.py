"""Single process: ``DistributedReduceLROnPlateau.step`` against torch's ``ReduceLROnPlateau.step``.

Run: ``python bench/local_step.py`` (or ``bash dev.sh bench`` for every benchmark).
Prints two tables: our ``step`` over torch's, with a float and with a 0-d tensor metric;
and the pieces of our hot path (one call each), as multiples of torch's ``step``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.abtest import Ratio, compare, format_table  # noqa: E402
from distplateau import DistributedReduceLROnPlateau  # noqa: E402
from distplateau._decide import decide  # noqa: E402
from distplateau._record import make_record  # noqa: E402


def _scheduler(cls: type[Any]) -> Any:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    # A patience no run reaches: every step takes the same path, none changes the lr.
    return cls(optimizer, patience=10**9)


def measure(blocks: int, iters: int) -> dict[str, list[Ratio]]:
    """Our ``step`` vs torch's per metric type, and the hot path's pieces vs torch's ``step``."""
    metrics: dict[str, Any] = {"float": 0.5, "0-d tensor": torch.tensor(0.5)}
    result: dict[str, list[Ratio]] = {}
    for kind, metric in metrics.items():
        theirs, ours = _scheduler(ReduceLROnPlateau), _scheduler(DistributedReduceLROnPlateau)
        result[kind] = compare(
            {"torch ReduceLROnPlateau.step": lambda t=theirs, m=metric: t.step(m),
             "DistributedReduceLROnPlateau.step": lambda o=ours, m=metric: o.step(m)},
            "torch ReduceLROnPlateau.step", blocks=blocks, iters=iters)
    theirs, ours = _scheduler(ReduceLROnPlateau), _scheduler(DistributedReduceLROnPlateau)
    tensor = metrics["0-d tensor"]
    row = make_record(0.5, None, 0.0)
    two_rows = (row, make_record(0.75, 3.0, 0.0))
    result["pieces"] = compare(
        {"torch ReduceLROnPlateau.step (float)": lambda: theirs.step(0.5),
         "make_record(float)": lambda: make_record(0.5, None, 0.0),
         "make_record(0-d tensor)": lambda: make_record(tensor, None, 0.0),
         "decide, 1 rank": lambda: decide((row,), reduction="mean", nan_policy="drop", last_finite=None,
                                          ranks=(0,)),
         "decide, 2 ranks": lambda: decide(two_rows, reduction="mean", nan_policy="drop", last_finite=None,
                                           ranks=(0, 1)),
         "fingerprint (more than 1 rank only)": ours.fingerprint},
        "torch ReduceLROnPlateau.step (float)", blocks=blocks, iters=iters)
    return result


def tables(result: dict[str, list[Ratio]]) -> str:
    rows = []
    for kind in ("float", "0-d tensor"):
        theirs, ours = result[kind]
        rows.append([kind, f"{theirs.us_per_call:.2f}", f"{ours.us_per_call:.2f}", f"**{ours.median:.2f}x**",
                     f"{ours.low:.2f}-{ours.high:.2f}", "our step < 10 us"])
    main = format_table(["metric", "torch step (us)", "our step (us)", "ratio (median)", "min-max", "bound"],
                        rows)
    pieces = format_table(
        ["piece of the hot path", "us per call", "x torch step (median)", "min-max"],
        [[r.name, f"{r.us_per_call:.2f}", f"{r.median:.2f}", f"{r.low:.2f}-{r.high:.2f}"]
         for r in result["pieces"]])
    return main + "\n\n" + pieces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--iters", type=int, default=10000)
    args = parser.parse_args()
    print(tables(measure(args.blocks, args.iters)))


if __name__ == "__main__":
    main()
