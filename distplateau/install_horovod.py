"""Build and install Horovod 0.28.1 against the torch that is already installed.

Horovod's last release asks CMake for C++14, but torch >= 2.1 headers need C++17 (C++20
from torch 2.14 on), so ``pip install horovod`` fails against current torch. This module
compiles every C++14 request as the standard the installed torch's headers demand (through a
CMake project include handed to Horovod's own build by a cmake wrapper named in
``HOROVOD_CMAKE``), builds the PyTorch and gloo parts only, and checks the result by
importing ``horovod.torch``.

Run it in the environment that will train::

    python -m distplateau.install_horovod             # build and install, then verify
    python -m distplateau.install_horovod --cpu-only  # the same without Horovod's CUDA support
    python -m distplateau.install_horovod --check     # only verify an existing install

Against a CUDA build of torch (what ``pip install torch`` gives on Linux) Horovod builds its
CUDA support, for which its CMake needs the CUDA toolkit (nvcc, headers, ``libcudart``), not
only torch's CUDA wheels. ``--cpu-only`` builds its CPU (gloo) operations alone, without the
toolkit, by hiding CUDA from Horovod's ``FindPytorch`` (a CMake module of the same name,
first on ``CMAKE_MODULE_PATH``, that runs Horovod's own with torch's ``CUDA_HOME`` unset).
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
# the standard torch's headers require, everywhere.
_CMAKE_INCLUDE = textwrap.dedent(
    """\
    set(CMAKE_CXX14_STANDARD_COMPILE_OPTION "-std=c++{standard}")
    set(CMAKE_CXX14_EXTENSION_COMPILE_OPTION "-std=gnu++{standard}")
    set(CMAKE_CXX_FLAGS_RELWITHDEBINFO "-O2 -DNDEBUG")
    set(CMAKE_C_FLAGS_RELWITHDEBINFO "-O2 -DNDEBUG")
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


# --cpu-only: found before Horovod's own cmake/Modules/FindPytorch.cmake (Horovod puts the
# CMAKE_MODULE_PATH it is given first), and runs that one with PY_EXE swapped for HIDE_CUDA.
_FIND_PYTORCH = textwrap.dedent(
    """\
    set(_distplateau_py_exe "${{PY_EXE}}")
    set(PY_EXE "{hide_cuda}")
    include("${{PROJECT_SOURCE_DIR}}/cmake/Modules/FindPytorch.cmake")
    set(PY_EXE "${{_distplateau_py_exe}}")
    """
)
# FindPytorch asks `python -c CODE` whether torch can build CUDA extensions (torch.version.cuda and
# torch.utils.cpp_extension.CUDA_HOME) and which headers and libraries an extension needs; with
# CUDA_HOME None it takes torch for a CPU build: a CppExtension, and no CUDA toolkit looked for.
_HIDE_CUDA = textwrap.dedent(
    """\
    #!/bin/sh
    if [ "$1" = "-c" ]; then
      exec "{python}" -c "import torch.utils.cpp_extension as e; e.CUDA_HOME = None
    $2"
    fi
    exec "{python}" "$@"
    """
)
_GPU_SETTINGS = ("HOROVOD_GPU", "HOROVOD_GPU_OPERATIONS", "HOROVOD_GPU_ALLREDUCE", "HOROVOD_GPU_ALLGATHER",
                 "HOROVOD_GPU_BROADCAST", "HOROVOD_GPU_ALLTOALL", "HOROVOD_GPU_REDUCESCATTER")


class InstallError(RuntimeError):
    """The build cannot start or did not produce a working ``horovod.torch``."""


def cxx_standard() -> str:
    """The C++ standard the installed torch's headers demand, read where they demand it
    (``#error C++20 or later compatible compiler is required to use PyTorch.`` in
    ``torch/all.h``): "17" up to torch 2.13, "20" from 2.14 on."""
    import torch

    header = Path(torch.__file__).parent / "include" / "torch" / "csrc" / "api" / "include" / "torch" / "all.h"
    found = re.search(r"C\+\+(\d+) or later", header.read_text()) if header.exists() else None
    return found[1] if found else "17"


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
        missing.append("a C++17 compiler (g++ >= 8; C++20, g++ >= 10, for torch >= 2.14): apt-get install g++, "
                       "or set CXX")
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


def install(*, force: bool = False, jobs: int | None = None, cpu_only: bool = False) -> str:
    """Build Horovod against the installed torch unless a working one is already there;
    ``cpu_only``: without Horovod's CUDA support, so without the CUDA toolkit."""
    if not force:
        try:
            return verify()
        except InstallError:
            pass
    gpu_settings = [name for name in _GPU_SETTINGS if os.environ.get(name)]
    if cpu_only and gpu_settings:
        raise InstallError(f"--cpu-only builds no GPU operations, but {', '.join(gpu_settings)} is set: "
                           "unset it, or build without --cpu-only")
    cmake = _check_prerequisites()
    with tempfile.TemporaryDirectory(prefix="distplateau-horovod-") as tmp:
        include = Path(tmp) / "cxx17.cmake"
        include.write_text(_CMAKE_INCLUDE.format(standard=cxx_standard()))
        options = f'-DCMAKE_PROJECT_INCLUDE="{include}"'
        if cpu_only:
            hide_cuda = Path(tmp) / "python-without-cuda"
            hide_cuda.write_text(_HIDE_CUDA.format(python=sys.executable))
            hide_cuda.chmod(0o755)
            (Path(tmp) / "modules").mkdir()
            (Path(tmp) / "modules" / "FindPytorch.cmake").write_text(_FIND_PYTORCH.format(hide_cuda=hide_cuda))
            options += f' -DCMAKE_MODULE_PATH="{Path(tmp) / "modules"}"'
        wrapper = Path(tmp) / "cmake"
        # Only the configure call takes the options; `cmake --build` rejects -D options.
        wrapper.write_text(
            textwrap.dedent(
                f"""\
                #!/bin/sh
                case "$1" in
                  --build|-E|--version|-P) exec "{cmake}" "$@" ;;
                esac
                exec "{cmake}" {options} "$@"
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
        print(f"distplateau: building Horovod {HOROVOD_VERSION} as C++{cxx_standard()}",
              "without CUDA support" if cpu_only else "", "(2-20 minutes)", flush=True)
        # pip's output is passed through as it comes, and read for the one failure whose cause
        # is not the compiler's: Horovod's CMake not finding the CUDA toolkit.
        toolkit_missing = False
        with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as pip:
            assert pip.stdout is not None
            for line in pip.stdout:
                sys.stdout.write(line)
                toolkit_missing = toolkit_missing or "Could NOT find CUDAToolkit" in line
        sys.stdout.flush()
        if pip.returncode != 0 and toolkit_missing:
            raise InstallError(_toolkit_missing_message())
        if pip.returncode != 0:
            raise InstallError(
                f"pip could not build horovod=={HOROVOD_VERSION}; the compiler output above "
                "says why. Check that cmake, g++ and the Python headers (python3-dev) are "
                "installed, then run `python -m distplateau.install_horovod --force`."
            )
    return verify()


def _toolkit_missing_message() -> str:
    import torch

    return (
        f"Horovod's CMake did not find the CUDA toolkit (\"Could NOT find CUDAToolkit\" above). torch "
        f"{torch.__version__} is a CUDA {torch.version.cuda} build, so Horovod builds its CUDA support, "
        "and that needs the toolkit (nvcc, its headers and libcudart), which torch's CUDA wheels and the "
        "GPU driver do not provide. Choose one:\n"
        "  - no GPU collectives in Horovod: `python -m distplateau.install_horovod --cpu-only` builds its "
        "CPU (gloo) operations only. Enough for CPU training and for DistributedReduceLROnPlateau, "
        "which gathers CPU tensors; hvd.allreduce of CUDA tensors (hvd.DistributedOptimizer on a GPU) "
        "then fails.\n"
        f"  - Horovod on GPUs: install the CUDA toolkit {torch.version.cuda} and make it findable "
        "(nvcc on PATH, or CUDAToolkit_ROOT / CUDA_HOME set to it), set HOROVOD_GPU_OPERATIONS=NCCL for "
        "NCCL collectives, then run `python -m distplateau.install_horovod --force`.\n"
        "  - a CPU-only machine: install torch's CPU build (the +cpu wheels) instead, then rerun this."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distplateau.install_horovod", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only verify the installed Horovod")
    parser.add_argument("--force", action="store_true", help="rebuild even if Horovod imports")
    parser.add_argument("--cpu-only", action="store_true",
                        help="build Horovod's CPU (gloo) operations only: no CUDA toolkit needed, also "
                             "against a CUDA build of torch")
    args = parser.parse_args(argv)
    try:
        version = verify() if args.check else install(force=args.force, cpu_only=args.cpu_only)
    except InstallError as err:
        print(f"distplateau: {err}", file=sys.stderr)
        return 1
    print(f"distplateau: horovod {version} with gloo is ready")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
