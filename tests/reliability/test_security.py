"""Nothing from another rank is unpickled, and scheduler state loads with ``weights_only=True``.

The equivalence workers also count every unpickling call made inside ``step()`` on real ranks
(see ``equivalence_worker.py``); these tests pin the same promise statically and in one process.
"""

from __future__ import annotations

import ast
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from distplateau import DistributedReduceLROnPlateau

PACKAGE = Path(__file__).resolve().parents[2] / "distplateau"


def _calls_and_imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            if not (isinstance(node.value, ast.Name) and node.value.id == "json"):  # json.loads runs no code
                names.append(node.attr)
        elif isinstance(node, ast.Name):
            names.append(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names += [a.name for a in node.names] + [getattr(node, "module", None) or ""]
    return names


STEP_PATH = ["_gather.py", "scheduler.py", "_decide.py", "_record.py", "_messages.py", "_accelerate.py"]


@pytest.mark.parametrize("module", STEP_PATH)
def test_gather_path_uses_no_object_collective_and_no_pickle(module: str) -> None:
    names = _calls_and_imports(PACKAGE / module)
    forbidden = [n for n in names if n.endswith("_object") or n.endswith("_object_list")
                 or n.split(".")[0] in ("pickle", "cloudpickle", "dill", "marshal") or n in ("loads", "load")]
    assert not forbidden, f"{module} uses {forbidden}"


@pytest.mark.parametrize("kind", ["float", "numpy", "numpy32", "tensor", "int"])
@pytest.mark.parametrize("backend", ["none", "auto"])
def test_state_dict_loads_with_weights_only_whatever_the_metric_type(kind: str, backend: str) -> None:
    convert = {"float": float, "numpy": np.float64, "numpy32": np.float32, "tensor": torch.tensor,
               "int": lambda v: v if math.isnan(v) else int(v * 10)}[kind]
    s = DistributedReduceLROnPlateau(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0),
                                     patience=0, nan_policy="last", backend=backend)
    for v in (1.0, 0.5, math.nan, 0.75):
        s.step(convert(v))
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["best"] == s.best and type(state["best"]) is float
    fresh = DistributedReduceLROnPlateau(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0))
    fresh.load_state_dict(state)
    assert fresh.last_finite_metric == s.last_finite_metric and fresh.nan_policy == "last"
