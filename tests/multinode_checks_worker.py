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
from pathlib import Path

CHECKS = Path(__file__).with_name("distributed_checks.py")


def main() -> None:
    backend, out = sys.argv[1], sys.argv[2]
    sys.argv = [str(CHECKS), backend, out]  # what the checks script reads at import
    from tests import distributed_checks as checks  # starts the backend

    if backend == "torch":
        destroy = checks.dist.destroy_process_group

        def barrier_then_destroy() -> None:
            checks.dist.barrier()
            destroy()

        checks.dist.destroy_process_group = barrier_then_destroy  # type: ignore[assignment]
    checks.main()


if __name__ == "__main__":
    main()
