"""``tests/distributed_checks.py`` on ranks started by torchrun or horovodrun on several nodes,
ending with a barrier before the process group is destroyed.

    torchrun ... tests/multinode_checks_worker.py torch OUT.json

The checks script ends its torch.distributed run with ``destroy_process_group()`` right after
a collective: a rank may then abort at exit in torch 2.13's gloo shutdown race
(docs/troubleshooting.md), which ``tests/test_distributed.py`` does not see (it reads the
results file, not the exit codes) but which makes the other node's torchrun wait in its exit
barrier (5 minutes) for the agent that lost its rank. A barrier first avoids the race.
"""

from __future__ import annotations

import sys

import torch.distributed as dist

from tests import distributed_checks


def main(argv: list[str] | None = None) -> None:
    backend, out = sys.argv[1:] if argv is None else argv
    if backend == "torch":
        destroy = dist.destroy_process_group

        def barrier_then_destroy() -> None:
            dist.barrier()
            destroy()

        dist.destroy_process_group = barrier_then_destroy  # type: ignore[assignment]
    distributed_checks.main([backend, out])


if __name__ == "__main__":
    main()
