"""The full reliability campaign on real ranks, ending with a summary table.

    python -m tests.reliability.run            # about 11 minutes on 2 cores (bash dev.sh reliability)
    python -m tests.reliability.run --scale 0.2 --seed 7

Runs the property-based equivalence campaign (hypothesis-drawn schedules, world sizes 1-4,
torch gloo and Horovod) with faults (c) bad input and (e) altered state on every launch, then
(a) SIGKILL, (b) a skipped step and (d) checkpoints across world sizes. Prints one row per
launch and a total: cases run, faults injected, mismatches (must be 0), longest time to
error after a fault. Exits 1 if anything went wrong. ``--json PATH`` keeps the rows.

One row is a measurement, not a check: under Horovod without ``DISTPLATEAU_HOROVOD_TIMEOUT_S``,
a skipped step followed by another collective hangs (Horovod has no per-operation timeout; its
stall check did not fire in our runs), so that launch is killed after ``--hang-limit`` seconds
and reported as such.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from tests.launch import horovodrun_available
from tests.reliability import campaign

EQUIVALENCE = [("none", 1, 400), ("torch", 2, 300), ("torch", 3, 300), ("torch", 4, 250),
               ("horovod", 2, 250), ("horovod", 3, 200), ("horovod", 4, 150)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every case count (default 1)")
    parser.add_argument("--seed", type=int, default=int(time.strftime("%Y%m%d")), help="hypothesis seed")
    parser.add_argument("--hang-limit", type=float, default=60.0,
                        help="seconds before the documented Horovod hang is killed (0: skip that row)")
    parser.add_argument("--json", type=Path, help="write every row here")
    args = parser.parse_args(argv)
    backends = ["torch", "horovod"] if horovodrun_available() else ["torch"]
    if "horovod" not in backends:
        print("Horovod is not installed: Horovod rows are left out", file=sys.stderr)
    rows: list[campaign.Result] = []
    measured: list[campaign.Result] = []
    with tempfile.TemporaryDirectory(prefix="distplateau-reliability-") as d:
        tmp = Path(d)

        def run(result: campaign.Result) -> None:
            rows.append(result)
            status = "ok" if not (result.problems or result.fault_problems) else "FAILED"
            print(f"{result.name[:66]:<66} {result.cases:>6} {result.faults:>6} {result.mismatches:>4} "
                  f"{result.longest_error_s:>9.3f} {result.wall_s:>7.1f}s  {status}", flush=True)
            for line in (result.problems + result.fault_problems)[:5]:
                print("    " + line[:400].replace("\n", "\n    "), flush=True)

        print(f"seed {args.seed}; torch.distributed timeout {campaign.TORCH_TIMEOUT_S:.0f}s")
        print(f"{'launch':<66} {'cases':>6} {'faults':>6} {'mism':>4} {'to error':>9} {'wall':>8}")
        for backend, world, count in EQUIVALENCE:
            if backend in backends or backend == "none":
                run(campaign.equivalence(backend, world, max(1, round(count * args.scale)), args.seed,
                                         tmp, timeout=900))
        if "horovod" in backends:  # the bounded wait: the same single allgather, polled
            run(campaign.equivalence("horovod", 3, max(1, round(200 * args.scale)), args.seed + 1, tmp,
                                     timeout=900, env=campaign.HOROVOD_TIMEOUT))
        for backend in backends:
            for world in (2, 3, 4):
                run(campaign.kill(backend, world, tmp))
        for world in (2, 3, 4):
            run(campaign.skip("torch", world, tmp, "sync"))
        for backend in backends:
            run(campaign.skip(backend, 3, tmp, "exit"))
        if "horovod" in backends:
            for world in (2, 3, 4):
                run(campaign.skip("horovod", world, tmp, "sync", env=campaign.HOROVOD_TIMEOUT))
        run(campaign.checkpoint(("torch", 2), [("torch", 3), ("none", 1)]
                                + ([("horovod", 3)] if "horovod" in backends else []), tmp))
        if "horovod" in backends:
            run(campaign.checkpoint(("horovod", 2), [("horovod", 3), ("torch", 3), ("none", 1)], tmp))
            if args.hang_limit > 0:
                hang = campaign.skip("horovod", 3, tmp, "sync", timeout=args.hang_limit,
                                     env={"HOROVOD_STALL_CHECK_TIME_SECONDS": "5",
                                          "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "20"})
                measured.append(hang)
                outcome = "hung (documented)" if math.isinf(hang.longest_error_s) else "ended"
                print(f"{hang.name + ' [measured]':<66} {'':>6} {1:>6} {'':>4} {outcome:>9} {hang.wall_s:>7.1f}s")
    cases = sum(r.cases for r in rows)
    faults = sum(r.faults for r in rows)
    mismatches = sum(r.mismatches for r in rows)
    longest = max(r.longest_error_s for r in rows)
    failed = [r.name for r in rows if r.problems or r.fault_problems]
    print()
    print(f"cases run: {cases}   faults injected: {faults}   mismatches: {mismatches}   "
          f"longest time to error after a fault: {longest:.2f}s   failed launches: {len(failed)}")
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "rows": [dataclasses.asdict(r) for r in rows],
                                         "measured": [dataclasses.asdict(r) for r in measured]}, indent=1))
    return 1 if failed or mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
