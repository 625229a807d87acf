"""The Horovod install path and the README's demo, run for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from harness.launch import ROOT, run_horovod


def test_check_reports_the_working_horovod_build():
    out = subprocess.run([sys.executable, "-m", "distplateau.install_horovod", "--check"], capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert "horovod 0.28.1 with gloo is ready" in out.stdout


def test_missing_cmake_and_compiler_are_named_before_any_build(tmp_path: Path):
    # An empty PATH: neither cmake nor g++ can be found.
    env = {**os.environ, "PATH": str(tmp_path), "CXX": "no-such-compiler"}
    out = subprocess.run([sys.executable, "-m", "distplateau.install_horovod", "--force"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, check=False)
    assert out.returncode == 1
    assert "cannot build Horovod, missing:" in out.stderr
    assert "cmake (>= 3.13)" in out.stderr and "a C++17 compiler" in out.stderr
    assert "building Horovod" not in out.stdout


def test_cpu_only_refuses_gpu_operations_before_any_build():
    env = {**os.environ, "HOROVOD_GPU_OPERATIONS": "NCCL"}
    out = subprocess.run([sys.executable, "-m", "distplateau.install_horovod", "--force", "--cpu-only"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, check=False)
    assert out.returncode == 1
    assert "--cpu-only builds no GPU operations, but HOROVOD_GPU_OPERATIONS is set" in out.stderr
    assert "building Horovod" not in out.stdout


def test_demo_shows_plain_scheduler_diverging_and_ours_identical():
    proc = run_horovod(2, [str(ROOT / "examples" / "horovod_demo.py"), "--epochs", "12"], timeout=180)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "ReduceLROnPlateau: learning rates DIVERGED across ranks" in proc.stdout
    assert "DistributedReduceLROnPlateau: learning rates identical on every rank; model weights differ across " \
           "ranks by up to 0\n" in proc.stdout.replace("\r", "")
    assert "metric is NaN or Inf on rank 1 at step 5" in proc.stdout
