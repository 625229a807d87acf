#!/usr/bin/env bash
# One entry point for a fresh machine that has python3, pip, cmake and g++:
#   bash dev.sh demo    2-rank horovodrun demo: plain ReduceLROnPlateau vs ours
#   bash dev.sh test    lint, type check and the whole test suite
#   bash dev.sh setup   only build the environment (.venv)
#   bash dev.sh lightning  the Lightning tests only (DDP and horovodrun fits on 2 ranks)
#   bash dev.sh compat  the Lightning tests against lightning and pytorch-lightning 2.1.0 to 2.6.6
#                       (the last release of each minor; ~8 min), one venv each in .venv-compat/ sharing .venv's torch
#                       and Horovod; e.g. `--versions 2.6.6 --packages lightning -- tests/test_lightning.py`
#   bash dev.sh compat-torch  the single-process, torch.distributed and horovodrun tests (Lightning, Fabric and
#                       Accelerate on the oldest and newest) against torch 2.1.2 to 2.15.0, one fresh env at a
#                       time in .venv-torch/ (~5 GB, deleted after), Horovod built --cpu-only in each; downloads
#                       cached in .cache/torch-wheels (~18 GB); e.g. `--versions 2.1.2 --keep -- tests/test_tensor_lr.py`
#   bash dev.sh gpu     on a GPU machine, with the python3 already there (or DISTPLATEAU_GPU_PYTHON), no registry
#                       needed: distplateau installed without deps, `pytest -m cuda`, bench/cuda_step.py, a results
#                       table (< 8 min; `--out DIR` for the logs)
#   bash dev.sh docs    build the documentation warning-free (docs/_build/html) and run its doctests
#   bash dev.sh reliability  the full reliability campaign on real ranks (~6 min idle), summary table
#   bash dev.sh bench   every benchmark (1-4 real ranks, Horovod and gloo; ~2.5 min), Markdown tables
#   bash dev.sh ray     Ray Train: a 2-worker CPU TorchTrainer, checkpoint resume and a worker failure (~2-3 min),
#                       in its own .venv-ray (torch 2.13.0 CPU, ray[train] 2.60.0; 1.5 GB, ~40 s to build)
#   bash dev.sh multinode  2 "hosts" x 2 ranks on network namespaces (root): torchrun, horovodrun, Lightning,
#                       network faults (link down, loss, freeze) with a summary table (~15 min)
# The first run builds .venv (torch 2.13.0 CPU, Horovod 0.28.1 with gloo, Lightning);
# later runs reuse it.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${DISTPLATEAU_VENV:-.venv}
PY="$VENV/bin/python"

setup() {
  local stamp="$VENV/.distplateau-setup" want
  want=$(cat setup.cfg dev.sh distplateau/install_horovod.py | sha256sum | cut -c1-16)
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$PY" -m distplateau.install_horovod --check >/dev/null 2>&1; then
    return
  fi
  [[ -x "$PY" ]] || python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
  # torch pinned: 2.13.0 is the CPU build; a bare `torch` would pull several GB of CUDA wheels.
  "$PY" -m pip install -q "torch==2.13.0" -e ".[horovod,lightning,accelerate,test,docs]"
  "$PY" -m distplateau.install_horovod
  echo "$want" >"$stamp"
}

# Warning-free (-W) HTML, then the doctests of the Markdown pages and of the API reference.
docs() {
  "$PY" -m sphinx -W --keep-going -q -d docs/_build/doctrees -b html docs docs/_build/html
  "$PY" -m sphinx -W --keep-going -q -d docs/_build/doctrees -b doctest docs docs/_build/doctest
  echo "docs: docs/_build/html/index.html"
}

cmd=${1:-test}
shift || true
case "$cmd" in
  setup) setup ;;
  demo)
    setup
    exec "$VENV/bin/horovodrun" -np 2 --gloo "$PY" examples/horovod_demo.py "$@" ;;
  test)
    setup
    "$PY" -m ruff check distplateau harness tests examples bench
    "$PY" -m mypy
    "$PY" -m pytest "$@"
    docs ;;
  docs)
    setup
    docs ;;
  lightning)
    setup
    exec "$PY" -m pytest tests/test_lightning.py tests/test_lightning_ranks.py "$@" ;;
  compat)
    setup
    exec "$PY" -m tests.compat "$@" ;;
  compat-torch)
    setup
    exec "$PY" -m tests.compat_torch "$@" ;;
  gpu)
    # No setup: a GPU machine has its own Python, torch and Lightning, and no registry.
    exec "${DISTPLATEAU_GPU_PYTHON:-python3}" -m tests.gpu_run "$@" ;;
  reliability)
    setup
    exec "$PY" -m tests.reliability.run "$@" ;;
  bench)
    setup
    exec "$PY" bench/run_all.py "$@" ;;
  ray)
    RAY_VENV=.venv-ray
    [[ -x "$RAY_VENV/bin/python" ]] || python3 -m venv "$RAY_VENV"
    # torch pinned as in setup(): a bare torch would pull several GB of CUDA wheels.
    "$RAY_VENV/bin/python" -m pip install -q "torch==2.13.0" -e ".[ray]" "pytest>=8" "pytest-timeout>=2.3"
    exec "$RAY_VENV/bin/python" -m pytest -p no:cacheprovider tests/test_ray.py "$@" ;;
  multinode)
    setup
    exec "$PY" -m tests.multinode "$@" ;;
  *) echo "usage: bash dev.sh {demo|test|setup|docs|lightning|compat|compat-torch|gpu|reliability|bench|multinode|ray}" >&2; exit 2 ;;
esac
