"""A torch.distributed gloo rank whose script ends right after its last ``step()``.

Launched by tests/test_exit.py. Usage: ``exit_worker.py destroy|no-destroy`` with the env://
rendezvous variables set. Exit status 0 is the whole check.
"""

import datetime
import sys

import torch
import torch.distributed as dist

from distplateau import DistributedReduceLROnPlateau

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
scheduler = DistributedReduceLROnPlateau(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
for _ in range(20):
    scheduler.step(0.5 + dist.get_rank())
# Keep the GIL from here to the exit (no forced switch for 100 s): a gloo worker thread that
# still needs it to let go of the last step's work can then only get it during interpreter
# shutdown, which aborts the process; that is the race this script makes certain to lose.
sys.setswitchinterval(100)
scheduler.step(0.5 + dist.get_rank())
if sys.argv[1] == "destroy":
    dist.destroy_process_group()
