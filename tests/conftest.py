import importlib.util
import os

import pytest

# Scripts that run on the ranks of a launch (they read sys.argv and initialise a backend at
# import) are never imported by pytest, not even for --doctest-modules.
collect_ignore_glob = ["*_checks.py", "*_worker.py", "lightning_*.py", "workers/*"]

# The two Lightning packages, and the distplateau module built on each.
DISTPLATEAU_MODULE = {
    "lightning.pytorch": "distplateau.lightning",
    "pytorch_lightning": "distplateau.pytorch_lightning",
}


def _lightning_params() -> list[object]:
    """Every Lightning test runs once per package: both by default, or those named in
    DISTPLATEAU_LIGHTNING_PACKAGES (comma-separated; `bash dev.sh compat` sets it)."""
    wanted = os.environ.get("DISTPLATEAU_LIGHTNING_PACKAGES", ",".join(DISTPLATEAU_MODULE)).split(",")
    params = []
    for package in wanted:
        if package not in DISTPLATEAU_MODULE:
            raise ValueError(f"DISTPLATEAU_LIGHTNING_PACKAGES: unknown package {package!r}; "
                             f"use {', '.join(DISTPLATEAU_MODULE)}")
        missing = importlib.util.find_spec(package.split(".")[0]) is None
        params.append(pytest.param(package, marks=pytest.mark.skipif(missing, reason=f"{package} is not installed")))
    return params


@pytest.fixture(scope="module", params=_lightning_params())
def lightning_package(request: pytest.FixtureRequest) -> str:
    """``"lightning.pytorch"`` or ``"pytorch_lightning"``."""
    return str(request.param)
