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
#   bash dev.sh clients  the real-client suite: darts, neuralforecast, schnetpack, MACE, timm, skorch, pytorch-ignite,
#                       each library's own training path on 2 ranks with torch's class and ours (and its resume), one
#                       venv each in .venv-clients/ (torch pinned in the same pip command), a table; e.g. `--only darts`
#   bash dev.sh release-check  build the sdist and wheel, twine check, install the wheel (not the checkout) into a
#                       fresh venv and use it there: quickstart, API doctests, entry points (~1 min)
# The first run builds .venv (torch 2.13.0 CPU, Horovod 0.28.1 with gloo, Lightning, Accelerate, DeepSpeed),
# one progress line per part, their output in .venv/setup.log (shown only when a part fails); later runs reuse it.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${DISTPLATEAU_VENV:-.venv}
PY="$VENV/bin/python"

# One part of setup: a progress line, its output into the setup log, the end of that log shown only
# if it fails (on a fresh clone pip's Horovod build alone printed ~100 lines above the demo's table).
setup_step() {
  local what=$1 start=$SECONDS
  shift
  printf 'setup: %s ... ' "$what"
  if "$@" >>"$SETUP_LOG" 2>&1; then
    echo "done ($((SECONDS - start)) s)"
  else
    echo "FAILED"
    echo "--- the last 80 lines of $SETUP_LOG ---" >&2
    tail -n 80 "$SETUP_LOG" >&2
    echo "--- setup failed at: $what; whole log: $SETUP_LOG ---" >&2
    exit 1
  fi
}

setup() {
  local stamp="$VENV/.distplateau-setup" want start=$SECONDS
  want=$(cat setup.cfg dev.sh distplateau/install_horovod.py | sha256sum | cut -c1-16)
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$PY" -m distplateau.install_horovod --check >/dev/null 2>&1; then
    return
  fi
  mkdir -p "$VENV"
  SETUP_LOG="$VENV/setup.log"
  : >"$SETUP_LOG"
  if [[ -x "$PY" ]]; then
    echo "setup: updating $VENV (setup.cfg, dev.sh or distplateau/install_horovod.py changed since it was built)"
  else
    echo "setup: building $VENV (first run: 5-6 min on 2 idle cores; later runs reuse it)"
    setup_step "creating the virtual environment" python3 -m venv "$VENV"
  fi
  setup_step "upgrading pip" "$PY" -m pip install -q --upgrade pip
  # torch pinned: 2.13.0 is the CPU build; a bare `torch` would pull several GB of CUDA wheels.
  setup_step "installing torch 2.13.0 (CPU), distplateau and its extras" \
    "$PY" -m pip install -q "torch==2.13.0" -e ".[horovod,lightning,pytorch-lightning,accelerate,deepspeed,transformers,test,docs]"
  setup_step "building Horovod 0.28.1 against torch (about 3 minutes)" "$PY" -m distplateau.install_horovod
  # DeepSpeed compiles its CPU shared-memory op when its first process group starts (~100 s on 2
  # cores, cached in ~/.cache/torch_extensions): here, not inside tests/test_deepspeed.py's timeout.
  setup_step "compiling DeepSpeed's CPU op" env DS_ACCELERATOR=cpu "$PY" -c 'from deepspeed.accelerator import get_accelerator
get_accelerator().create_op_builder("ShareMemCommBuilder").load()'
  echo "$want" >"$stamp"
  echo "setup: ready in $((SECONDS - start)) s (log: $SETUP_LOG)"
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
    # Two pytest workers, a test file each at a time (its launches share module fixtures): the
    # single-process tests and the ranks waiting out a timeout leave a core idle a quarter of the
    # time otherwise (fresh clones on 2 idle cores: 773 s on one worker, 657 s on two).
    "$PY" -m pytest -n 2 --dist loadfile "$@"
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
  clients)
    setup
    exec "$PY" -m tests.clients.run "$@" ;;
  release-check)
    setup
    exec "$PY" -m tests.release_check "$@" ;;
  *) echo "usage: bash dev.sh {demo|test|setup|docs|lightning|compat|compat-torch|gpu|reliability|bench|multinode|ray|clients|release-check}" >&2; exit 2 ;;
esac
