"""This checkout's ``step`` against another revision's, side by side in one run.

``python bench/versus.py --ref REV`` (default ``HEAD``) exports ``distplateau/`` at ``REV`` (git
archive) as the package ``distplateau_ref``, then times ``step`` of both schedulers in
alternating blocks (``bench/abtest.py``): in one process with a float and a 0-d tensor metric,
and on 2 real ranks under torch.distributed gloo and under horovodrun. Every rank runs the same
variants in the same order, so the collectives of the two schedulers never mix. Prints Markdown
tables: microseconds per step of each and this checkout's over the reference's (median of
blocks, min-max). Used for refactors: "behaviour unchanged" is the test suite's job, "no slower"
is this script's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.abtest import Ratio, compare, format_table  # noqa: E402
from harness.launch import horovodrun_available, launch_json, run_horovod, run_torch  # noqa: E402

LAUNCH_TIMEOUT = 300


def export(rev: str, into: Path) -> None:
    """``distplateau/`` at ``rev`` as the package ``into/distplateau_ref``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "distplateau"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "distplateau").rename(into / "distplateau_ref")


def schedulers() -> dict[str, Any]:
    """One scheduler per variant, each on its own optimizer, with a patience no run reaches."""
    import distplateau_ref

    from distplateau import DistributedReduceLROnPlateau

    def build(cls: type[Any]) -> Any:
        return cls(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), patience=10**9)

    return {"torch ReduceLROnPlateau": build(ReduceLROnPlateau),
            "reference": build(distplateau_ref.DistributedReduceLROnPlateau),
            "this checkout": build(DistributedReduceLROnPlateau)}


def single_process(blocks: int, iters: int) -> dict[str, list[Ratio]]:
    result = {}
    for kind, metric in {"float": 0.5, "0-d tensor": torch.tensor(0.5)}.items():
        steppers = schedulers()
        result[kind] = compare({name: (lambda s=s, m=metric: s.step(m)) for name, s in steppers.items()},
                               "reference", blocks=blocks, iters=iters)
    return result


def worker(backend: str, out: str, blocks: int, iters: int) -> None:
    """On every rank: our two schedulers' ``step`` on this rank's metric, rank 0 writes the ratios."""
    torch.set_num_threads(1)
    if backend == "horovod":
        import horovod.torch as hvd

        hvd.init()
        rank = hvd.rank()
    else:
        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
        rank = dist.get_rank()
    steppers = schedulers()
    del steppers["torch ReduceLROnPlateau"]  # a local step: no collective to line up
    metric = 0.5 + rank
    ratios = compare({name: (lambda s=s: s.step(metric)) for name, s in steppers.items()}, "reference",
                     blocks=blocks, iters=iters)
    if rank == 0:
        Path(out).write_text(json.dumps([r._asdict() for r in ratios]))


def distributed(backend: str, blocks: int, iters: int, pythonpath: str) -> list[Ratio] | str:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        args = [str(Path(__file__)), "--worker", backend, str(out), "--blocks", str(blocks), "--iters", str(iters)]
        env = {"PYTHONPATH": os.pathsep.join([str(ROOT), pythonpath])}
        launch = run_horovod if backend == "horovod" else run_torch
        result = launch_json(launch, 2, args, out=out, timeout=LAUNCH_TIMEOUT, env=env)
        return result if isinstance(result, str) else [Ratio(**r) for r in result]


def table(rows: dict[str, list[Ratio] | str]) -> str:
    lines = []
    for setting, ratios in rows.items():
        if isinstance(ratios, str):
            lines.append([setting, "-", "-", "-", ratios])
            continue
        by_name = {r.name: r for r in ratios}
        ref, new = by_name["reference"], by_name["this checkout"]
        torch_us = f"{by_name['torch ReduceLROnPlateau'].us_per_call:.2f}" if "torch ReduceLROnPlateau" in by_name \
            else "-"
        lines.append([setting, torch_us, f"{ref.us_per_call:.2f}", f"{new.us_per_call:.2f}",
                      f"**{new.median:.3f}x** ({new.low:.2f}-{new.high:.2f})"])
    return format_table(["setting", "torch step (us)", "reference step (us)", "this checkout's step (us)",
                         "this / reference, median of blocks (min-max)"], lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="HEAD", help="git revision to compare with (default HEAD)")
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--iters", type=int, default=5000, help="single-process steps per block")
    parser.add_argument("--rank-iters", type=int, default=200, help="steps per block on 2 ranks")
    parser.add_argument("--worker", nargs=2, metavar=("BACKEND", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, blocks=args.blocks, iters=args.iters)
        return
    with tempfile.TemporaryDirectory() as tmp:
        export(args.ref, Path(tmp))
        sys.path.insert(0, tmp)
        rows: dict[str, list[Ratio] | str] = {}
        for kind, ratios in single_process(args.blocks, args.iters).items():
            rows[f"1 process, {kind} metric"] = ratios
        rows["2 ranks, torch.distributed gloo"] = distributed("torch", args.blocks, args.rank_iters, tmp)
        rows["2 ranks, Horovod (gloo)"] = (distributed("horovod", args.blocks, args.rank_iters, tmp)
                                           if horovodrun_available() else "Horovod not installed")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.ref], capture_output=True,
                            text=True).stdout.strip()
    print(f"reference: {args.ref} ({commit})")
    print(table(rows))
    if any(isinstance(r, str) for r in rows.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
