"""distplateau against several torch releases, one fresh environment per release.

    python -m tests.compat_torch            # bash dev.sh compat-torch: each release below, 8-15 min (2 idle cores)
    python -m tests.compat_torch --versions 2.1.2 --keep -- tests/test_scheduler.py

For each release, one at a time (an environment is about 5 GB):

1. ``pip download`` torch and its dependencies (a CUDA build from the registry, 2.5-3 GB with
   its nvidia-* wheels; it runs on CPU) into ``.cache/torch-wheels``, once: a rerun finds them
   there and downloads nothing;
2. build ``.venv-torch/<version>``: that torch from the cache, then distplateau (editable) with
   its ``horovod`` and ``test`` extras, and Lightning and Accelerate where ``--frameworks``
   names the release, every pip call pinned to that torch. This machine's pip config may cap
   torch (``global.constraint``): ``PIP_CONSTRAINT``, set for this command's pip calls only,
   replaces that file with the pin;
3. build Horovod 0.28.1 there with ``python -m distplateau.install_horovod --cpu-only`` (the
   registry's torch is a CUDA build, and Horovod's CUDA support would need the CUDA toolkit);
4. run pytest: the single-process tests, the contract checks on real ranks
   (``tests/test_distributed.py``: torch.distributed gloo, and ``horovodrun`` where Horovod
   built) and the exit test; then, in a column of their own, the Lightning, Fabric and
   Accelerate tests where installed;
5. delete the environment unless ``--keep``; a kept one is used again by the next run (Horovod
   too, if it still imports: ``install_horovod`` does nothing then).

Every step runs under a hard timeout that kills its process group. Ends with a Markdown table
(also in ``.venv-torch/results.md``; the logs stay in ``.venv-torch/logs/``). Exits 1 if a
release failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.compat import run_pytest

ROOT = Path(__file__).resolve().parent.parent
ENVS = ROOT / ".venv-torch"
LOGS = ENVS / "logs"
WHEELS = ROOT / ".cache" / "torch-wheels"
# The oldest release setup.cfg claims, releases spread over the range, the newest the registry serves.
VERSIONS = ["2.1.2", "2.4.1", "2.6.0", "2.8.0", "2.10.0", "2.12.1", "2.14.1", "2.15.0"]
FRAMEWORKS = ["2.1.2", "2.15.0"]  # the oldest and the newest: Lightning, Fabric, Accelerate too
SINGLE = ["tests/test_scheduler.py", "tests/test_state_contract.py", "tests/test_decide.py", "tests/test_record.py",
          "tests/test_stopping_and_warmup.py", "tests/test_tensor_lr.py"]
RANKS = ["tests/test_distributed.py", "tests/test_exit.py"]
FRAMEWORK_TESTS = ["tests/test_lightning.py", "tests/test_lightning_ranks.py", "tests/test_fabric.py",
                   "tests/test_accelerate.py"]
# torch before 2.4 was built against NumPy 1 and breaks under NumPy 2 (tensor.numpy() and more).
OLD_NUMPY = "numpy<2"


@dataclasses.dataclass
class Result:
    version: str
    python: str = "-"
    horovod: str = "-"
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    recompiles: str = "-"
    frameworks: str = "-"
    wall_s: float = 0.0
    status: str = "ok"
    failures: list[str] = dataclasses.field(default_factory=list)


def step(what: str, cmd: list[str], log: Path, timeout: int, env: dict[str, str] | None = None) -> float:
    """Run ``cmd`` under timeout(1) (its own process group, killed whole), output to ``log``;
    return its seconds. Raises ``RuntimeError`` with the log's tail if it fails."""
    print(f"  {what} ...", flush=True)
    start = time.monotonic()
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        done = subprocess.run(["timeout", "-k", "30", str(timeout), *cmd], cwd=ROOT, env=env, stdout=f,
                              stderr=subprocess.STDOUT, check=False)
    seconds = time.monotonic() - start
    if done.returncode != 0:
        tail = log.read_text()[-3000:]
        why = f"timed out after {timeout} s" if done.returncode in (124, 137) else f"exit status {done.returncode}"
        raise RuntimeError(f"{what}: {why} ({log})\n{tail}")
    print(f"  {what}: {seconds:.0f} s", flush=True)
    return seconds


def pip_env(pin: Path) -> dict[str, str]:
    return dict(os.environ, PIP_CONSTRAINT=str(pin), PIP_DISABLE_PIP_VERSION_CHECK="1")


def build_env(version: str, frameworks: bool, log: Path) -> Path:
    """``.venv-torch/<version>`` with torch ``version``, distplateau and the test tools; its python.
    A complete one that ``--keep`` left is used again as it is."""
    env_dir = ENVS / version
    python = env_dir / "bin" / "python"
    pins = [f"torch=={version}"]
    if tuple(int(p) for p in version.split(".")[:2]) < (2, 4):
        pins.append(OLD_NUMPY)
    extras = "horovod,test,lightning,accelerate" if frameworks else "horovod,test"
    stamp, want = env_dir / ".distplateau-torch", " ".join([*pins, extras])
    if stamp.exists() and stamp.read_text() == want:
        print(f"  {env_dir} is complete: used again", flush=True)
        return python
    if env_dir.exists():  # an interrupted run, or other extras: start again from nothing
        shutil.rmtree(env_dir)
    WHEELS.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    pin = env_dir / "constraints.txt"
    pin.write_text("\n".join(pins) + "\n")
    env = pip_env(pin)
    step(f"download torch {version} (once)", [sys.executable, "-m", "pip", "download", "-q", "--dest", str(WHEELS),
                                               f"torch=={version}"], log, 1800, env)
    step(f"install torch {version}", [str(python), "-m", "pip", "install", "-q", "--no-index", "--find-links",
                                      str(WHEELS), f"torch=={version}"], log, 900, env)
    step(f"install distplateau[{extras}]", [str(python), "-m", "pip", "install", "-q", "-e", f".[{extras}]",
                                           *pins[1:]], log, 900, env)
    stamp.write_text(want)
    return python


def probe(python: Path) -> tuple[str, str]:
    """The torch version and the Python version the env runs."""
    code = "import sys, torch; print(torch.__version__); print(sys.version.split()[0])"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=300, check=True)
    torch_version, python_version = out.stdout.split()[:2]
    return torch_version, python_version


def recompiles(xml: Path) -> str:
    """``tensor/float`` from the compiled-step test's JUnit properties, ``-`` if it did not run."""
    if not xml.exists():
        return "-"
    found = {prop.get("name"): prop.get("value") for prop in ET.parse(xml).getroot().iter("property")}
    if "recompiles_tensor_lr" not in found:
        return "-"
    return f"{found['recompiles_tensor_lr']}/{found['recompiles_float_lr']}"


def run_release(version: str, frameworks: bool, horovod: bool, timeout: int, pytest_args: list[str],
                keep: bool) -> Result:
    result = Result(version)
    log = LOGS / f"{version}.log"
    log.write_text("")
    start = time.monotonic()
    try:
        python = build_env(version, frameworks, log)
        installed, result.python = probe(python)
        if installed.split("+")[0] != version:
            raise RuntimeError(f"the env has torch {installed}, not {version}")
        print(f"  torch {installed}, Python {result.python}", flush=True)
        check = [str(python), "-m", "distplateau.install_horovod", "--check"]
        if not horovod:
            result.horovod = "not built (--horovod)"
        elif subprocess.run(check, capture_output=True, timeout=300, check=False).returncode == 0:
            result.horovod = "ok (kept env)"
        else:
            try:
                seconds = step("build Horovod (--cpu-only)", [str(python), "-m", "distplateau.install_horovod",
                                                             "--cpu-only"], log, 2400)
                result.horovod = f"ok ({seconds / 60:.0f} min)"
            except RuntimeError as err:
                print(f"  {err}", flush=True)
                result.horovod = "FAILED: " + _last_line(str(err))
        # Without Horovod, its tests are left out: the Horovod column says why, they are no failures.
        deselect = [] if result.horovod.startswith("ok") or pytest_args else ["-k", "not horovod"]
        run_pytest(result, python, "lightning.pytorch,pytorch_lightning", timeout,
                   (pytest_args or SINGLE + RANKS) + deselect)
        result.recompiles = recompiles(python.parent.parent / "junit.xml")
        shutil.copy(python.parent.parent / "pytest.log", LOGS / f"{version}-pytest.log")
        if frameworks and not pytest_args:
            # A column of their own: a framework that does not run on this torch is its limit, not ours.
            seen = Result(version)
            run_pytest(seen, python, "lightning.pytorch,pytorch_lightning", timeout, FRAMEWORK_TESTS + deselect)
            result.frameworks = f"{seen.passed} passed, {seen.failed} failed, {seen.skipped} skipped"
            result.failures += [f"(frameworks) {failure}" for failure in seen.failures]
            shutil.copy(python.parent.parent / "pytest.log", LOGS / f"{version}-frameworks-pytest.log")
    except (RuntimeError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        print(f"  {err}", flush=True)
        result.status = "FAILED: " + _last_line(str(err))
    finally:
        result.wall_s = time.monotonic() - start
        if not keep:
            shutil.rmtree(ENVS / version, ignore_errors=True)
    return result


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}")[:200] if lines else "?"


def table(results: list[Result], date: str) -> str:
    lines = ["| date | torch | Python | passed | failed | skipped | Horovod build | recompiles (tensor/float lr) "
             "| Lightning, Fabric, Accelerate | wall | result |",
             "|---|---|---|---:|---:|---:|---|---|---|---:|---|"]
    for r in results:
        lines.append(f"| {date} | {r.version} | {r.python} | {r.passed} | {r.failed} | {r.skipped} | {r.horovod} "
                     f"| {r.recompiles} | {r.frameworks} | {r.wall_s / 60:.1f} min | {r.status} |")
    failures = [f"- torch {r.version}: {f}" for r in results for f in r.failures]
    return "\n".join(lines + ([""] + failures if failures else [])) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", default=",".join(VERSIONS),
                        help=f"comma-separated torch releases (default: {','.join(VERSIONS)})")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                        help="releases that also get Lightning, Fabric and Accelerate and their tests "
                             f"(default: {','.join(FRAMEWORKS)}; '' for none)")
    parser.add_argument("--horovod", default="all",
                        help="releases to build Horovod for and run the horovodrun tests on (default: all; '' "
                             "for none): a build takes 5-15 min on 2 busy cores")
    parser.add_argument("--timeout", type=int, default=2400, help="seconds per pytest run before it is killed")
    parser.add_argument("--keep", action="store_true",
                        help="keep each environment (about 5 GB each), and use a kept one again")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to pytest instead of the default tests")
    args = parser.parse_args(argv)
    if not shutil.which("timeout"):
        parser.error("needs timeout(1) (coreutils)")
    LOGS.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    frameworks = [v for v in args.frameworks.split(",") if v]
    versions = args.versions.split(",")
    horovod = versions if args.horovod == "all" else [v for v in args.horovod.split(",") if v]
    results = []
    for version in versions:
        print(f"== torch {version}", flush=True)
        results.append(run_release(version, version in frameworks, version in horovod, args.timeout,
                                   args.pytest_args, args.keep))
        report = table(results, date)
        (ENVS / "results.md").write_text(report)  # after every release: a long run can be read as it goes
    print("\n" + report + f"\n(also in {ENVS / 'results.md'}; logs in {LOGS})")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
