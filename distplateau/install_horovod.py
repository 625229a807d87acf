"""Build and install Horovod 0.28.1 against the torch that is already installed.

Horovod's last release asks CMake for C++14, but torch >= 2.1 headers need C++17, so
``pip install horovod`` fails against current torch. This module compiles every C++14
request as C++17 (through a CMake project include handed to Horovod's own build by a
cmake wrapper named in ``HOROVOD_CMAKE``), builds the PyTorch and gloo parts only, and
checks the result by importing ``horovod.torch``.

Run it in the environment that will train::

    python -m distplateau.install_horovod          # build and install, then verify
    python -m distplateau.install_horovod --check  # only verify an existing install
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from pathlib import Path

HOROVOD_VERSION = "0.28.1"

# Horovod's CMakeLists sets CMAKE_CXX_STANDARD 14; these make CMake spell that request as
# C++17 everywhere, which is what torch's headers require.
_CMAKE_INCLUDE = textwrap.dedent(
    """\
    set(CMAKE_CXX14_STANDARD_COMPILE_OPTION "-std=c++17")
    set(CMAKE_CXX14_EXTENSION_COMPILE_OPTION "-std=gnu++17")
    """
)

_BUILD_ENV = {
    "HOROVOD_WITH_PYTORCH": "1",
    "HOROVOD_WITH_GLOO": "1",
    "HOROVOD_WITHOUT_MPI": "1",
    "HOROVOD_WITHOUT_TENSORFLOW": "1",
    "HOROVOD_WITHOUT_MXNET": "1",
    "HOROVOD_CPU_OPERATIONS": "gloo",
    # CMake 4 refuses projects that ask for CMake < 3.5, as some of Horovod's bundled
    # third-party projects do; this lets them configure. CMake 3.x ignores it.
    "CMAKE_POLICY_VERSION_MINIMUM": "3.5",
}


class InstallError(RuntimeError):
    """The build cannot start or did not produce a working ``horovod.torch``."""


def _check_prerequisites() -> str:
    """Return the path of cmake; raise InstallError naming whatever is missing."""
    missing = []
    cmake = shutil.which("cmake")
    if cmake is None:
        missing.append("cmake (>= 3.13): apt-get install cmake, or pip install cmake")
    else:
        found = subprocess.run([cmake, "--version"], capture_output=True, text=True, check=False).stdout
        version = re.search(r"(\d+)\.(\d+)", found)
        if version is None or (int(version[1]), int(version[2])) < (3, 13):
            missing.append(f"cmake >= 3.13 (found {found.splitlines()[0] if found else 'an unusable cmake'})")
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        missing.append("a C++17 compiler (g++ >= 8): apt-get install g++, or set CXX")
    try:
        import torch
    except ImportError:
        missing.append("torch: install it first (pip install torch), Horovod builds against it")
    else:
        major_minor = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
        if major_minor < (2, 1):
            missing.append(f"torch >= 2.1 (found {torch.__version__})")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        missing.append("the Python headers (Python.h): apt-get install python3-dev")
    for module in ("setuptools", "wheel", "packaging"):
        if importlib.util.find_spec(module) is None:
            missing.append(f"{module}: pip install 'distplateau[horovod]' (or pip install {module})")
    if missing:
        raise InstallError(
            "cannot build Horovod, missing:\n  - " + "\n  - ".join(missing)
        )
    assert cmake is not None
    return cmake


def verify() -> str:
    """Import horovod.torch in a fresh interpreter; return its version or raise InstallError."""
    probe = (
        "import horovod, horovod.torch as hvd;"
        "assert hvd.gloo_built(), 'Horovod was built without gloo';"
        "print(horovod.__version__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise InstallError(
            "horovod.torch does not import in this environment:\n" + result.stderr.strip()
        )
    return result.stdout.strip()


def install(*, force: bool = False, jobs: int | None = None) -> str:
    """Build Horovod against the installed torch unless a working one is already there."""
    if not force:
        try:
            return verify()
        except InstallError:
            pass
    cmake = _check_prerequisites()
    with tempfile.TemporaryDirectory(prefix="distplateau-horovod-") as tmp:
        include = Path(tmp) / "cxx17.cmake"
        include.write_text(_CMAKE_INCLUDE)
        wrapper = Path(tmp) / "cmake"
        # Only the configure call takes the include; `cmake --build` rejects -D options.
        wrapper.write_text(
            textwrap.dedent(
                f"""\
                #!/bin/sh
                case "$1" in
                  --build|-E|--version|-P) exec "{cmake}" "$@" ;;
                esac
                exec "{cmake}" -DCMAKE_PROJECT_INCLUDE="{include}" "$@"
                """
            )
        )
        wrapper.chmod(0o755)
        env = dict(os.environ, **_BUILD_ENV, HOROVOD_CMAKE=str(wrapper))
        env.setdefault("MAKEFLAGS", f"-j{jobs or os.cpu_count() or 1}")
        cmd = [
            sys.executable, "-m", "pip", "install", "--no-build-isolation",
            "--no-cache-dir", "--no-binary", "horovod", f"horovod=={HOROVOD_VERSION}",
        ]
        if force:
            cmd.insert(4, "--force-reinstall")
        print("distplateau: building Horovod", HOROVOD_VERSION, "(about 2 minutes)", flush=True)
        if subprocess.run(cmd, env=env, check=False).returncode != 0:
            raise InstallError(
                f"pip could not build horovod=={HOROVOD_VERSION}; the compiler output above "
                "says why. Check that cmake, g++ and the Python headers (python3-dev) are "
                "installed, then run `python -m distplateau.install_horovod --force`."
            )
    return verify()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distplateau.install_horovod", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only verify the installed Horovod")
    parser.add_argument("--force", action="store_true", help="rebuild even if Horovod imports")
    args = parser.parse_args(argv)
    try:
        version = verify() if args.check else install(force=args.force)
    except InstallError as err:
        print(f"distplateau: {err}", file=sys.stderr)
        return 1
    print(f"distplateau: horovod {version} with gloo is ready")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
