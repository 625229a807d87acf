"""Step time on GPUs: a float metric against a 0-d CUDA tensor metric and weight.

Run: ``python bench/cuda_step.py``. Times ``DistributedReduceLROnPlateau.step`` in one process
(backend ``"none"``) and, where there are 2 GPUs or more, on 2 ranks over NCCL (launched here
under a hard timeout), with float inputs and with 0-d CUDA tensors, side by side in
alternating blocks (``bench/abtest.py``). Prints a Markdown table. Without a CUDA device it
prints ``no CUDA device: skipped`` and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.abtest import Ratio, compare, format_table  # noqa: E402
from distplateau import DistributedReduceLROnPlateau  # noqa: E402
from harness.launch import launch_json, run_torch  # noqa: E402

NCCL_TIMEOUT = 300  # seconds for the whole 2-rank launch


def measure(backend: str, device: torch.device, blocks: int, iters: int) -> list[Ratio]:
    """Our ``step`` on a float metric and weight, and on 0-d CUDA tensors (the float's ratio is 1)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1, device=device))], lr=0.1)
    # A patience no run reaches: every step takes the same path, none changes the lr.
    scheduler = DistributedReduceLROnPlateau(optimizer, patience=10**9, backend=backend)  # type: ignore[arg-type]
    metric = torch.full((8,), 0.5, device=device).mean()  # a loss reduced on the GPU
    weight = torch.tensor(8, device=device)
    return compare({"float": lambda: scheduler.step(0.5, weight=8.0),
                    "0-d CUDA tensor": lambda: scheduler.step(metric, weight=weight)},
                   "float", blocks=blocks, iters=iters)


def nccl_rank(out: Path, blocks: int, iters: int) -> None:
    """One rank of the NCCL run (``--rank-of OUT``); rank 0 writes the result to ``OUT``."""
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)  # NCCL gathers on the current device
    torch.distributed.init_process_group("nccl")
    ratios = measure("torch", device, blocks, iters)
    if torch.distributed.get_rank() == 0:
        out.write_text(json.dumps([r._asdict() for r in ratios]))
    torch.distributed.destroy_process_group()


def nccl(blocks: int, iters: int) -> list[Ratio] | str:
    """The 2-rank NCCL measurement, or why there is none."""
    if torch.cuda.device_count() < 2:
        return f"needs 2 GPUs, found {torch.cuda.device_count()}"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "nccl.json"
        args = [os.path.abspath(__file__), "--rank-of", str(out), "--blocks", str(blocks), "--iters", str(iters)]
        result = launch_json(run_torch, 2, args, out=out, timeout=NCCL_TIMEOUT)
        return result if isinstance(result, str) else [Ratio(**r) for r in result]


def table(results: dict[str, list[Ratio] | str]) -> str:
    rows = []
    for setup, ratios in results.items():
        if isinstance(ratios, str):
            rows.append([setup, "-", "-", "-", ratios.splitlines()[0]])
            continue
        for r in ratios:
            rows.append([setup, r.name, f"{r.us_per_call:.1f}", f"**{r.median:.2f}x**", f"{r.low:.2f}-{r.high:.2f}"])
    return format_table(["setup", "metric and weight", "us per step", "vs float (median)", "min-max"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--rank-of", type=Path, help=argparse.SUPPRESS)  # set by nccl() for its ranks
    args = parser.parse_args()
    if args.rank_of is not None:
        nccl_rank(args.rank_of, args.blocks, args.iters)
        return
    if not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return
    results: dict[str, list[Ratio] | str] = {
        "1 process, backend none": measure("none", torch.device("cuda", 0), args.blocks, args.iters),
        "2 ranks, NCCL": nccl(args.blocks, args.iters),
    }
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}\n")
    print(table(results))
    failed = results["2 ranks, NCCL"]
    if isinstance(failed, str) and not failed.startswith("needs"):
        print(f"\nNCCL run {failed}")
        sys.exit(1)


if __name__ == "__main__":
    main()
