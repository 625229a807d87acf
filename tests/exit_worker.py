"""A torch.distributed gloo rank whose script ends right after its last ``step()``.

Launched by tests/test_exit.py with the env:// rendezvous variables set. Usage:
``exit_worker.py kept`` (the scheduler lives until the interpreter exits, no
``destroy_process_group``) or ``exit_worker.py dropped`` (the scheduler is a local of a
function that returns, then ``destroy_process_group``). Exit status 0 is the whole check.
"""

from __future__ import annotations

import datetime
import sys

import torch
import torch.distributed as dist

from distplateau import DistributedReduceLROnPlateau


def train() -> DistributedReduceLROnPlateau:
    scheduler = DistributedReduceLROnPlateau(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    for _ in range(20):
        scheduler.step(0.5 + dist.get_rank())
    # Keep the GIL from here to the exit (no forced switch for 100 s): a gloo worker thread
    # that still needs it to let go of the last step's work is then likely to get it only
    # during interpreter shutdown, which aborts the process.
    sys.setswitchinterval(100)
    scheduler.step(0.5 + dist.get_rank())
    return scheduler


scheduler: DistributedReduceLROnPlateau | None = None  # "kept": alive until the interpreter exits


def main(argv: list[str] | None = None) -> None:
    global scheduler
    ending = (sys.argv[1:] if argv is None else argv)[0]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    if ending == "kept":
        scheduler = train()
    else:
        train()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
