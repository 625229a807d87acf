"""What a user gets from ``pip install distplateau-<version>-py3-none-any.whl``, checked from the
wheel itself, not from this checkout.

    python -m tests.release_check          # bash dev.sh release-check

1. builds the sdist and the wheel (``python -m build --no-isolation``: this venv's setuptools)
   into ``build/release-check/dist`` and runs ``twine check`` on both;
2. fails if the wheel lacks a file of the package that git tracks (a new module, ``py.typed``),
   either Lightning entry point, or if the metadata has a classifier PyPI would refuse;
3. creates ``build/release-check/venv``, a virtual environment that sees this venv's packages
   (the pinned torch, Lightning, Horovod: nothing is downloaded) but not its editable
   distplateau, and installs the wheel into it;
4. runs there, from a directory outside the checkout: the quickstart's doctest
   (``docs/quickstart.md``), the doctests of every module of the installed package, a ``Trainer``
   of each Lightning package (the entry point attaches the callback), and
   ``python -m distplateau.install_horovod --check``.

Prints one line per step and exits 1 at the first failure, with what failed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "release-check"
ENTRY_POINTS = {
    "lightning.pytorch.callbacks_factory": "distplateau.lightning:callbacks_factory",
    "pytorch_lightning.callbacks_factory": "distplateau.pytorch_lightning:callbacks_factory",
}
# Run in the release venv: which callback each package's Trainer gets, and from where.
TRAINERS = """
import importlib, json, sys
seen = {}
for package in ("lightning.pytorch", "pytorch_lightning"):
    pl = importlib.import_module(package)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False)
    ours = [c for c in trainer.callbacks if type(c).__name__ == "DistributedPlateauCallback"]
    seen[package] = [type(c).__module__ + " " + sys.modules[type(c).__module__].__file__ for c in ours]
print(json.dumps(seen))
"""


class CheckFailed(Exception):
    pass


def run(step: str, cmd: list[str], cwd: Path = ROOT, timeout: float = 600) -> str:
    """Run ``cmd``; raise ``CheckFailed`` with its output unless it exits 0."""
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        output = done.stdout[-4000:] + done.stderr[-4000:]
        raise CheckFailed(f"{step}: `{' '.join(cmd)}` exited {done.returncode}\n{output}")
    return done.stdout


def build() -> tuple[Path, Path]:
    dist = WORK / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    run("build", [sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(dist), "."])
    (wheel,), (sdist,) = dist.glob("*.whl"), dist.glob("*.tar.gz")
    run("twine check", [sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)])
    return wheel, sdist


def check_wheel(wheel: Path) -> str:
    """What the wheel must hold; returns its version."""
    import trove_classifiers

    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = run("git ls-files", ["git", "ls-files", "distplateau"]).split()
    missing = [path for path in tracked if path not in names]
    if missing:
        raise CheckFailed(f"the wheel lacks {', '.join(missing)}: check [options.packages.find] and "
                          "[options.package_data] in setup.cfg")
    info = next(name.split("/")[0] for name in names if name.endswith(".dist-info/METADATA"))
    entry_points = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    for group, target in ENTRY_POINTS.items():
        if f"[{group}]" not in entry_points or target not in entry_points:
            raise CheckFailed(f"the wheel's entry_points.txt lacks {group} = {target}:\n{entry_points}")
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    classifiers = [line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Classifier: ")]
    unknown = [c for c in classifiers if c not in trove_classifiers.classifiers]
    if unknown:
        raise CheckFailed(f"PyPI refuses classifiers that trove-classifiers does not list: {unknown}")
    return next(line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Version: "))


def release_venv(wheel: Path) -> Path:
    """A fresh venv seeing this venv's site-packages but its editable distplateau, with the wheel installed."""
    venv = WORK / "venv"
    shutil.rmtree(venv, ignore_errors=True)
    run("venv", [sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    own_site = Path(run("venv", [str(python), "-c", purelib]).strip())
    view = WORK / "view"
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if "distplateau" not in entry.name and entry.name != "__pycache__":
            (view / entry.name).symlink_to(entry)
    # After the venv's own site-packages, so the installed wheel comes first.
    (own_site / "release-check-view.pth").write_text(f"import site; site.addsitedir({str(view)!r})\n")
    run("install the wheel", [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)])
    return python


def use(python: Path, version: str) -> None:
    outside = WORK / "outside"  # the checkout must not be importable: not the cwd, not on sys.path
    shutil.rmtree(outside, ignore_errors=True)
    outside.mkdir()
    package_dir = Path(run("import", [str(python), "-c", "import distplateau, os; print(os.path.dirname("
                                      "distplateau.__file__)); assert distplateau.__version__ == "
                                      f"{version!r}, distplateau.__version__"], cwd=outside).strip())
    if python.parent.parent not in package_dir.parents:
        raise CheckFailed(f"the release venv imports distplateau from {package_dir}, not from the installed wheel")
    # The {doctest} blocks of the quickstart page, as a plain doctest file.
    page = (ROOT / "docs" / "quickstart.md").read_text()
    blocks = re.findall(r"```\{doctest\}\n(.*?)```", page, flags=re.S)
    (outside / "quickstart.txt").write_text("\n".join(blocks))
    pytest = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(outside / "none.ini"),
              "--rootdir", str(outside)]
    (outside / "none.ini").write_text("[pytest]\n")
    print("  quickstart:", run("quickstart", [*pytest, "--doctest-glob=*.txt", "quickstart.txt"],
                               cwd=outside).strip().splitlines()[-1], f"({len(blocks)} doctest blocks)")
    print("  API doctests:", run("doctests", [*pytest, "--doctest-modules", str(package_dir)],
                                 cwd=outside).strip().splitlines()[-1])
    seen = json.loads(run("entry points", [str(python), "-c", TRAINERS], cwd=outside).strip().splitlines()[-1])
    for package, callbacks in seen.items():
        module = "distplateau." + ("lightning" if package == "lightning.pytorch" else "pytorch_lightning")
        if len(callbacks) != 1 or not callbacks[0].startswith(f"{module} {package_dir}"):
            raise CheckFailed(f"a {package} Trainer got {callbacks}, not one {module}.DistributedPlateauCallback "
                              "from the installed wheel")
    print("  entry points: one DistributedPlateauCallback from the wheel in each package's Trainer")
    run("install_horovod --check", [str(python), "-m", "distplateau.install_horovod", "--check"], cwd=outside)
    print("  python -m distplateau.install_horovod --check: ok")


def main() -> int:
    try:
        wheel, sdist = build()
        print(f"built and twine-checked {wheel.name}, {sdist.name}")
        version = check_wheel(wheel)
        print("the wheel holds every tracked file of distplateau/, both entry points, known classifiers")
        python = release_venv(wheel)
        print(f"installed into {python.parent.parent} (this venv's torch and frameworks, no checkout)")
        use(python, version)
    except CheckFailed as failed:
        print(f"release-check FAILED: {failed}", file=sys.stderr)
        return 1
    print(f"release-check: distplateau {version} ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
