"""The full reliability campaign on real ranks, ending with a summary table.

    python -m tests.reliability.run            # about 11 minutes on 2 cores (bash dev.sh reliability)
    python -m tests.reliability.run --scale 0.2 --seed 7

Runs the property-based equivalence campaign (hypothesis-drawn schedules, world sizes 1-4,
torch gloo and Horovod) with faults (c) bad input and (e) altered state on every launch, then
(a) SIGKILL, (b) a skipped step and (d) checkpoints across world sizes. Prints one row per
launch and a total: cases run, faults injected, mismatches (must be 0), longest time to
error after a fault. Then elastic training (``tests/reliability/elastic.py``): Horovod elastic
through 14 resets with 5 workers SIGKILLed, and torchrun restarts at 2, 3, 1 and 4 workers;
their rows give resets survived, workers killed, mismatches and the recovery times. Exits 1 if
anything went wrong. ``--json PATH`` keeps the rows.

Under Horovod a skipped step followed by another collective ends at the library's bound on a
step's wait: ``DISTPLATEAU_HOROVOD_TIMEOUT_S=5`` at 2, 3 and 4 ranks, and at 3 ranks with the
variable unset and its default (30 minutes) forced to 5 s in the workers, which shows the default
at work. One row is a measurement, not a check: with ``DISTPLATEAU_HOROVOD_TIMEOUT_S=0`` (no
limit, the default forced to 5 s all the same) that launch hangs as asked (Horovod has no
per-operation timeout; its stall check did not fire in our runs), so it is killed after
``--hang-limit`` seconds and reported as such.
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

from harness.launch import horovodrun_available
from tests.reliability import campaign, elastic

EQUIVALENCE = [("none", 1, 400), ("torch", 2, 300), ("torch", 3, 300), ("torch", 4, 250),
               ("horovod", 2, 250), ("horovod", 3, 200), ("horovod", 4, 150)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every case count (default 1)")
    parser.add_argument("--seed", type=int, default=int(time.strftime("%Y%m%d")), help="hypothesis seed")
    parser.add_argument("--hang-limit", type=float, default=60.0,
                        help="seconds before the Horovod launch with DISTPLATEAU_HOROVOD_TIMEOUT_S=0 is killed "
                             "(0: skip that row)")
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
        if "horovod" in backends:  # Horovod's own blocking wait, without the default bound
            run(campaign.equivalence("horovod", 3, max(1, round(200 * args.scale)), args.seed + 1, tmp,
                                     timeout=900, env=campaign.HOROVOD_NO_LIMIT))
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
            run(campaign.skip("horovod", 3, tmp, "sync", env=campaign.HOROVOD_SHORT_DEFAULT))
        run(campaign.checkpoint(("torch", 2), [("torch", 3), ("none", 1)]
                                + ([("horovod", 3)] if "horovod" in backends else []), tmp))
        if "horovod" in backends:
            run(campaign.checkpoint(("horovod", 2), [("horovod", 3), ("torch", 3), ("none", 1)], tmp))
            if args.hang_limit > 0:
                hang = campaign.skip("horovod", 3, tmp, "sync", timeout=args.hang_limit,
                                     env={**campaign.HOROVOD_NO_LIMIT, **campaign.HOROVOD_SHORT_DEFAULT,
                                          "HOROVOD_STALL_CHECK_TIME_SECONDS": "5",
                                          "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "20"})
                measured.append(hang)
                outcome = "hung (as asked)" if math.isinf(hang.longest_error_s) else "ended"
                print(f"{hang.name + ' [measured]':<66} {'':>6} {1:>6} {'':>4} {outcome:>9} {hang.wall_s:>7.1f}s")
        print()
        print(f"{'elastic launch':<40} {'epochs':>6} {'resets':>6} {'killed':>6} {'mism':>4} {'recovery':>9} "
              f"{'wall':>8}")
        elastic_rows = []
        if "horovod" in backends:
            elastic_rows.append(elastic.horovod(tmp, elastic.LONG_PLAN, timeout=600))
        elastic_rows.append(elastic.torchrun(tmp, elastic.LONG_TORCHRUN, timeout=300))
        for e in elastic_rows:
            status = "ok" if not e.problems else "FAILED"
            print(f"{e.name:<40} {e.epochs:>6} {e.resets:>6} {e.killed:>6} {e.mismatches:>4} "
                  f"{e.longest_recovery_s:>8.2f}s {e.wall_s:>7.1f}s  {status}", flush=True)
            for label, seconds in e.recoveries:
                print(f"    {label}: {seconds:.2f}s")
            for error, seconds in e.step_errors:
                print(f"    a step() waiting when its peer died ended in {error} after {seconds:.2f}s")
            for line in e.problems[:5]:
                print("    " + line[:400].replace("\n", "\n    "), flush=True)
    cases = sum(r.cases for r in rows)
    faults = sum(r.faults for r in rows)
    mismatches = sum(r.mismatches for r in rows)
    longest = max(r.longest_error_s for r in rows)
    failed = [r.name for r in rows if r.problems or r.fault_problems] + [e.name for e in elastic_rows if e.problems]
    mismatches += sum(e.mismatches for e in elastic_rows)
    print()
    print(f"cases run: {cases}   faults injected: {faults}   mismatches: {mismatches}   "
          f"longest time to error after a fault: {longest:.2f}s   failed launches: {len(failed)}")
    print(f"elastic: resets survived {sum(e.resets for e in elastic_rows)}   workers killed "
          f"{sum(e.killed for e in elastic_rows)}   longest recovery "
          f"{max(e.longest_recovery_s for e in elastic_rows):.2f}s")
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "rows": [dataclasses.asdict(r) for r in rows],
                                         "measured": [dataclasses.asdict(r) for r in measured],
                                         "elastic": [dataclasses.asdict(e) for e in elastic_rows]}, indent=1))
    return 1 if failed or mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
