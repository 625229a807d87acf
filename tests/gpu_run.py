"""The GPU run, in one command: ``bash dev.sh gpu`` (``python -m tests.gpu_run``).

For a GPU machine without registry access, into the Python that is already there (its torch,
Lightning, Accelerate): installs distplateau without dependencies (editable, no build
isolation, no index), runs ``pytest -m cuda`` (tests/test_cuda.py, tests/test_tensor_lr.py),
then ``bench/cuda_step.py``, each under a hard timeout (7 minutes in all), and prints a
Markdown table to paste into docs/guides/gpu.md and docs/compatibility.md: the card, the
versions, the counts, the benchmark, the wall time. Everything is also written to ``--out``.

pytest, pytest-timeout, hypothesis, setuptools and wheel must be importable there. Where
they are not, bring their wheels: ``python -m tests.gpu_run --fetch-wheels`` (on a machine
with the registry) puts them, for Python 3.10 to 3.13, in ``.cache/gpu-wheels``, from which
this command installs whatever is missing. Without a CUDA device every test skips with its reason and the
benchmark prints ``no CUDA device: skipped``: the table then says so.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".cache" / "gpu-wheels"
# What the tests and the editable install (without build isolation) need besides torch.
TOOLS = {"pytest": "pytest>=8", "pytest_timeout": "pytest-timeout>=2.3", "hypothesis": "hypothesis>=6.100",
         "setuptools": "setuptools>=61", "wheel": "wheel"}
TESTS = ["tests/test_cuda.py", "tests/test_tensor_lr.py"]
PYTEST_TIMEOUT, BENCH_TIMEOUT = 330, 90  # seconds: the run stays under 8 minutes with installs


def fetch_wheels() -> int:
    for version in ("3.10", "3.11", "3.12", "3.13"):
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version",
                        version, "--dest", str(WHEELS), *TOOLS.values()], check=True)
    print(f"wheels in {WHEELS}: carry this folder to the GPU machine with the checkout")
    return 0


def install() -> None:
    """distplateau (for the Lightning entry points) and any missing test tool; raises
    ``RuntimeError`` saying what is missing."""
    missing = [spec for module, spec in TOOLS.items() if importlib.util.find_spec(module) is None]
    if missing and not WHEELS.is_dir():
        raise RuntimeError(f"{', '.join(missing)} not installed, and no {WHEELS} to install from: run "
                           "`python -m tests.gpu_run --fetch-wheels` where the registry is reachable and bring "
                           "that folder along, or install them")
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(WHEELS),
                        *missing], check=True)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "-e", str(ROOT)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"pip could not install distplateau without deps:\n{done.stdout[-1500:]}"
                           f"{done.stderr[-1500:]}")


def timed(cmd: list[str], timeout: int, log: Path) -> tuple[int, float, str]:
    """``cmd`` under timeout(1), which kills its process group; exit status, seconds, output."""
    start = time.monotonic()
    done = subprocess.run(["timeout", "-k", "20", str(timeout), *cmd], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, check=False)
    log.write_text(done.stdout)
    print(done.stdout[-6000:], flush=True)
    return done.returncode, time.monotonic() - start, done.stdout


def versions() -> dict[str, str]:
    import torch

    found = {"Python": sys.version.split()[0], "torch": f"{torch.__version__} (CUDA {torch.version.cuda})"}
    if torch.cuda.is_available():
        found["card"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    else:
        found["card"] = "no CUDA device"
    for name in ("lightning", "pytorch_lightning", "accelerate", "horovod"):
        if importlib.util.find_spec(name) is not None:
            module = __import__(name)
            found[name] = getattr(module, "__version__", "?")
    return found


def counts(xml: Path) -> tuple[int, int, int, list[str]]:
    passed = failed = skipped = 0
    notes = []
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                failed += 1
                notes.append(f"FAILED {case.get('name')}: {(bad.get('message') or '').splitlines()[:1]}")
            elif (skip := case.find("skipped")) is not None:
                skipped += 1
                notes.append(f"skipped {case.get('name')}: {skip.get('message')}")
            else:
                passed += 1
    return passed, failed, skipped, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu-results", help="where logs and the table go")
    parser.add_argument("--no-install", action="store_true", help="use the distplateau already installed")
    parser.add_argument("--fetch-wheels", action="store_true", help=f"download the test tools' wheels to {WHEELS}")
    args = parser.parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels()
    start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.no_install:
        try:
            install()
        except (RuntimeError, subprocess.CalledProcessError) as err:
            print(f"gpu run: {err}", file=sys.stderr)
            return 1
    found = versions()
    print("gpu run:", ", ".join(f"{k} {v}" for k, v in found.items()), flush=True)
    xml = args.out / "junit.xml"
    code, pytest_s, _ = timed([sys.executable, "-m", "pytest", "-m", "cuda", "-rs", "-s", "-p", "no:cacheprovider",
                               f"--junitxml={xml}", *TESTS], PYTEST_TIMEOUT, args.out / "pytest.log")
    passed, failed, skipped, notes = counts(xml)
    bench_code, bench_s, bench = timed([sys.executable, "bench/cuda_step.py"], BENCH_TIMEOUT, args.out / "bench.log")
    bench_lines = [line for line in bench.splitlines() if line.startswith("|") or "skipped" in line]
    pytest_result = "ok" if code == 0 else f"timed out after {PYTEST_TIMEOUT} s" if code in (124, 137) \
        else f"FAILED (pytest exit {code})"
    bench_result = "ok" if bench_code == 0 else f"FAILED (exit {bench_code})"
    frameworks = ", ".join(f"{k} {found[k]}" for k in ("lightning", "pytorch_lightning", "accelerate", "horovod")
                           if k in found) or "-"
    table = "\n".join([
        "| date | card | Python | torch | frameworks | passed | failed | skipped | pytest | bench | wall |",
        "|---|---|---|---|---|---:|---:|---:|---|---|---:|",
        f"| {datetime.date.today().isoformat()} | {found['card']} | {found['Python']} | {found['torch']} "
        f"| {frameworks} | {passed} | {failed} | {skipped} | {pytest_result} ({pytest_s:.0f} s) "
        f"| {bench_result} ({bench_s:.0f} s) | {time.monotonic() - start:.0f} s |",
        "", *notes, "", "bench/cuda_step.py:", *bench_lines, ""])
    (args.out / "results.md").write_text(table)
    print("\n" + table + f"\n(also in {args.out / 'results.md'})")
    return 0 if code == 0 and bench_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
