"""The Lightning tests against several Lightning releases, one environment per release.

    python -m tests.compat                 # bash dev.sh compat: both packages, every version below
    python -m tests.compat --packages pytorch-lightning --versions 2.1.0 -- tests/test_lightning.py

For each package (``lightning``, imported as ``lightning.pytorch``; ``pytorch-lightning``,
imported as ``pytorch_lightning``) and each version, builds ``.venv-compat/<package>-<version>``:
a venv that sees every package of the venv running this script (torch, Horovod, distplateau,
pytest) except its Lightning, and into which pip installs that one release and whatever older
dependencies it asks for. torch is pinned to the running one, so pip fails rather than download
another. Then runs pytest there with ``DISTPLATEAU_LIGHTNING_PACKAGES`` set to the package under
test, under a hard timeout that kills its process group, and ends with a Markdown table (also
written to ``.venv-compat/results.md``). Exits 1 if any environment failed, or ran no test.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import re
import subprocess
import sys
import sysconfig
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPAT = ROOT / ".venv-compat"
# The oldest release setup.cfg claims (lightning>=2.1,<2.7), the last of every minor after it.
VERSIONS = ["2.1.0", "2.2.5", "2.3.3", "2.4.0", "2.5.6", "2.6.6"]
MODULES = {"lightning": "lightning.pytorch", "pytorch-lightning": "pytorch_lightning"}
# Hidden from every compat env, so that only the release under test (and what it depends on) is there.
LIGHTNING_DISTRIBUTIONS = ["lightning", "pytorch-lightning", "lightning-fabric"]
# Lightning 2.1-2.3 calls pkg_resources.declare_namespace at import, and setuptools 82 no
# longer ships pkg_resources; torch 2.13 wants setuptools>=77.0.3.
OLD_SETUPTOOLS = "setuptools<82"
TESTS = ["tests/test_lightning.py", "tests/test_lightning_ranks.py"]
# Prints what `import <module>` and `import torch` resolve to in a compat env.
PROBE = ("import importlib, sys, torch; m = importlib.import_module(sys.argv[1]); "
         "print(m.__version__, m.__file__, torch.__version__, torch.__file__, sep='\\n')")


@dataclasses.dataclass
class Result:
    package: str
    version: str
    imported: str = "-"
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    wall_s: float = 0.0
    status: str = "ok"
    failures: list[str] = dataclasses.field(default_factory=list)


def site_packages(python: Path | str) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip())


def build_view(view: Path) -> None:
    """Fill ``view`` with a symlink to every entry of the main venv's site-packages (the one
    running this script) but Lightning's.

    A .pth line cannot leave packages out of a directory, and pip must not see the main venv's
    Lightning either (lightning 2.6.6 would take its pytorch-lightning as satisfied). pip never
    uninstalls outside the env it installs into, so nothing here is touched by a compat install.
    """
    main_site = Path(sysconfig.get_paths()["purelib"])
    hidden = set()
    for name in LIGHTNING_DISTRIBUTIONS:
        try:
            files = importlib.metadata.distribution(name).files or []
        except importlib.metadata.PackageNotFoundError:
            continue
        hidden |= {f.parts[0] for f in files if f.parts[0] != ".."}
    view.mkdir(parents=True, exist_ok=True)
    for link in view.iterdir():  # rebuilt every run: this venv may have changed since
        link.unlink()
    for entry in main_site.iterdir():
        if entry.name not in hidden and entry.name != "__pycache__":
            (view / entry.name).symlink_to(entry)


def build_env(package: str, version: str, view: Path) -> Path:
    """Create ``.venv-compat/<package>-<version>`` unless it is already complete; return its python."""
    env = COMPAT / f"{package}-{version}"
    python = env / "bin" / "python"
    requirements = [f"{package}=={version}", f"torch=={importlib.metadata.version('torch')}", OLD_SETUPTOOLS]
    stamp, want = env / ".distplateau-compat", " ".join(requirements)
    if stamp.exists() and stamp.read_text() == want:
        return python
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    # Appended after the env's own site-packages (addsitedir also runs the view's .pth files,
    # which is how the editable distplateau is found), so the env's own packages come first.
    (site_packages(python) / "distplateau-compat.pth").write_text(f"import site; site.addsitedir({str(view)!r})\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    *requirements], check=True)
    stamp.write_text(want)
    return python


def probe(python: Path, module: str, version: str) -> str:
    """What ``module`` resolves to in the env; raises if it is not ``version`` from the env itself."""
    held = subprocess.run([str(python), "-m", "pip", "list", "--format", "freeze", "--path",
                           str(site_packages(python))], capture_output=True, text=True, check=True).stdout
    print(f"  the env's own packages: {' '.join(held.split())}", flush=True)
    out = subprocess.run([str(python), "-c", PROBE, module], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"import {module} failed:\n{out.stderr[-2000:]}")
    got, path, torch_version, torch_path = out.stdout.split("\n")[:4]
    print(f"  {module} {got} from {path}\n  torch {torch_version} from {torch_path}", flush=True)
    env = str(python.parent.parent.resolve())
    if got != version or not str(Path(path).resolve()).startswith(env):
        raise RuntimeError(f"{module} is {got} from {path}, not {version} from {env}")
    if str(Path(torch_path).resolve()).startswith(env):
        raise RuntimeError(f"torch was installed into {env}; it must come from the main venv")
    return f"{module} {got}"


def run_pytest(result: Result, python: Path, module: str, timeout: int, args: list[str]) -> None:
    """Run pytest in the env whose python is ``python``; fill in ``result``."""
    env_dir = python.parent.parent
    xml, log = env_dir / "junit.xml", env_dir / "pytest.log"
    xml.unlink(missing_ok=True)
    env = dict(os.environ, DISTPLATEAU_LIGHTNING_PACKAGES=module, VIRTUAL_ENV=str(env_dir),
               PATH=os.pathsep.join([str(python.parent), os.path.dirname(sys.executable), os.environ["PATH"]]))
    # timeout(1) runs pytest in its own process group and signals the whole group: DDP ranks too.
    cmd = ["timeout", "-k", "30", str(timeout), str(python), "-m", "pytest", "-p", "no:cacheprovider",
           f"--junitxml={xml}", *args]
    start = time.monotonic()
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as p, log.open("w") as f:
        assert p.stdout is not None
        for line in p.stdout:
            sys.stdout.write(line)
            f.write(line)
    result.wall_s = time.monotonic() - start
    if p.returncode in (124, 137):
        result.status = f"timeout after {timeout} s"
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                result.failed += 1
                result.failures.append(f"{case.get('classname')}::{case.get('name')}: {_gist(bad.get('message'))}")
            elif case.find("skipped") is not None:
                result.skipped += 1
            else:
                result.passed += 1
    if result.status == "ok" and not (result.passed or result.failed):
        result.status = "FAILED (no test ran)"
    elif result.status == "ok" and (p.returncode != 0 or result.failed):
        result.status = f"FAILED (pytest exit {p.returncode})"


def _gist(message: str | None) -> str:
    """The last line of a failure message that names an exception (a rank's traceback ends
    with one), else its first line."""
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    named = [line for line in lines if re.match(r"[\w.]+(Error|Exception): ", line)]
    return (named[-1] if named else lines[0] if lines else "")[:300]


def table(results: list[Result]) -> str:
    lines = ["| package | version | imported | passed | failed | skipped | wall | result |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r.package} | {r.version} | {r.imported} | {r.passed} | {r.failed} | {r.skipped} "
                     f"| {r.wall_s:.0f} s | {r.status} |")
    failures = [f"- {r.package} {r.version}: {f}" for r in results for f in r.failures]
    return "\n".join(lines + ([""] + failures if failures else [])) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packages", default=",".join(MODULES),
                        help=f"comma-separated, from {', '.join(MODULES)} (default: both)")
    parser.add_argument("--versions", default=",".join(VERSIONS),
                        help=f"comma-separated releases (default: {','.join(VERSIONS)})")
    parser.add_argument("--timeout", type=int, default=1500, help="seconds per pytest run before it is killed")
    parser.add_argument("pytest_args", nargs="*", help=f"after --: passed to pytest (default: {' '.join(TESTS)})")
    args = parser.parse_args(argv)
    packages = args.packages.split(",")
    unknown = [p for p in packages if p not in MODULES]
    if unknown:
        parser.error(f"unknown package {', '.join(unknown)}: must be one of {', '.join(MODULES)}")
    view = COMPAT / "main-without-lightning"
    build_view(view)
    results = []
    for package in packages:
        module = MODULES[package]
        for version in args.versions.split(","):
            print(f"== {package} {version}", flush=True)
            try:
                python = build_env(package, version, view)
                imported = probe(python, module, version)
            except subprocess.CalledProcessError as e:
                print(f"  {e}", flush=True)
                results.append(Result(package, version, status="FAILED (building the env failed, see above)"))
                continue
            except RuntimeError as e:
                print(f"  {e}", flush=True)
                last = str(e).strip().splitlines()[-1]
                results.append(Result(package, version, status=f"FAILED ({last[:200]})"))
                continue
            result = Result(package, version, imported)
            run_pytest(result, python, module, args.timeout, args.pytest_args or TESTS)
            results.append(result)
    report = table(results)
    (COMPAT / "results.md").write_text(report)
    print("\n" + report + f"\n(also in {COMPAT / 'results.md'}; pytest logs in {COMPAT}/<package>-<version>/)")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
