import importlib.util
import os

import pytest

from tests.lightning_checks import DISTPLATEAU_MODULE  # the test modules import it from here too

# Nothing is left out of collection: the scripts that run on the ranks of a launch
# (*_checks.py, *_worker.py) do their work in main() only, so --doctest-modules imports them
# like any module, and a rank script that started a backend or read sys.argv at import would
# fail collection. They import nothing the test modules do not (no Lightning, Horovod or Ray).


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
