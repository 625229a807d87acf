"""Tensor learning rates (``lr=torch.tensor(...)``, as compiled and capturable optimizers take
them) stay the optimizer's own tensor, with its dtype and device, through warmup, the plateau's
reduction, ``sync_state`` and ``state_dict``, on every torch release we claim; and a
``torch.compile``d optimizer step is not compiled again when the scheduler cuts the rate
(pytorch #163093). The same on real ranks: ``sync_state_and_steps_keep_tensor_learning_rates_in_place``
in tests/distributed_checks.py.

torch's own ``ReduceLROnPlateau`` writes a cut rate into the tensor from torch 2.10 on; before,
it replaces the tensor by a float. So "the same as torch" means: the value torch computes,
rounded to the tensor's dtype, and on torch >= 2.10 exactly torch's tensors.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from distplateau import DistributedReduceLROnPlateau
from tests.reliability.cases import last_lr

TORCH = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")])]
DTYPES = [torch.float32, torch.float64]


def sgd(lr: Any, device: str = "cpu") -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.ones(2, device=device))], lr=lr)


def as_dtype(value: Any, dtype: torch.dtype) -> float:
    """``value`` (a float or a one-element tensor) rounded to ``dtype``, as a float."""
    return float(torch.tensor(float(value), dtype=dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_warmup_ramps_the_tensor_learning_rate_in_place(device: str, dtype: torch.dtype) -> None:
    lr = torch.tensor(0.1, dtype=dtype, device=device)
    s = DistributedReduceLROnPlateau(sgd(lr, device), warmup=2)
    seen = [float(lr)]
    for value in (1.0, 1.0):
        s.step(value)
        seen.append(float(lr))
    assert s.optimizer.param_groups[0]["lr"] is lr and lr.dtype == dtype and lr.device.type == device
    # 0.01, 0.055, then exactly the tensor's value at construction again: float32 rounding
    # (0.10000000149 as a float) does not leak into the rate.
    assert seen == [as_dtype(0.1 * 0.1, dtype), as_dtype(0.1 * (0.1 + 0.9 * 0.5), dtype), as_dtype(0.1, dtype)]
    assert torch.equal(lr, torch.tensor(0.1, dtype=dtype, device=device))
    assert [float(x) for x in s.get_last_lr()] == [seen[-1]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_cut_writes_torchs_value_into_the_tensor(device: str, dtype: torch.dtype) -> None:
    lr = torch.tensor(0.1, dtype=dtype, device=device)
    ours = DistributedReduceLROnPlateau(sgd(lr, device), patience=0, factor=0.5, min_lr=0.02)
    ref = ReduceLROnPlateau(sgd(torch.tensor(0.1, dtype=dtype, device=device)), patience=0, factor=0.5, min_lr=0.02)
    for value in (1.0, 1.0, 1.0, 1.0):  # cuts to 0.05, then 0.025, then min_lr
        ours.step(value)
        ref.step(value)
        torch_lr = ref.optimizer.param_groups[0]["lr"]
        assert ours.optimizer.param_groups[0]["lr"] is lr and lr.dtype == dtype and lr.device.type == device
        assert float(lr) == as_dtype(torch_lr, dtype)
        # get_last_lr(): what torch's own returns, as the tensor's type where torch keeps one
        mine, torchs = ours.get_last_lr(), last_lr(ref)
        assert [float(x) for x in mine] == [as_dtype(x, dtype) for x in torchs]
        assert all(isinstance(x, torch.Tensor) and x.dtype == dtype for x in mine)
        if TORCH >= (2, 10):
            assert all(isinstance(x, torch.Tensor) and torch.equal(x, y) for x, y in zip(torchs, mine))
    assert float(lr) == as_dtype(0.02, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_sync_state_and_state_dict_carry_tensor_learning_rates(device: str) -> None:
    lr = torch.tensor(0.1, device=device)
    s = DistributedReduceLROnPlateau(sgd(lr, device), patience=0, warmup=1)
    for value in (1.0, 1.0, 1.0):
        s.step(value)
    before = float(lr)
    s.sync_state(src=0)  # one process: sends its state (as JSON), keeps it
    assert s.optimizer.param_groups[0]["lr"] is lr and float(lr) == before
    buffer = io.BytesIO()
    torch.save(s.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    other_lr = torch.tensor(0.1, device=device)
    resumed = DistributedReduceLROnPlateau(sgd(other_lr, device), patience=0, warmup=1)
    resumed.load_state_dict(state)
    assert (resumed.best, resumed.last_epoch, resumed.warmup_lrs) == (s.best, s.last_epoch, s.warmup_lrs)
    assert [float(x) for x in resumed.get_last_lr()] == [before]


@pytest.mark.parametrize("device", DEVICES)
def test_capturable_adam_takes_the_cut_rate(device: str) -> None:
    param = torch.nn.Parameter(torch.ones(2, device=device))
    lr = torch.tensor(0.1, device=device)
    try:
        optimizer = torch.optim.Adam([param], lr=lr, capturable=True)
        param.grad = torch.ones_like(param)
        optimizer.step()
    except (RuntimeError, ValueError, AssertionError) as err:  # torch's own refusal, per release
        pytest.skip(f"torch {torch.__version__}: Adam(lr=tensor, capturable=True) on {device}: {err}")
    s = DistributedReduceLROnPlateau(optimizer, patience=0, factor=0.5)
    for value in (1.0, 1.0):
        s.step(value)
    assert optimizer.param_groups[0]["lr"] is lr and float(lr) == 0.05


def compiled_steps(lr: Any, cuts: int) -> tuple[int, int, list[float]]:
    """Frames dynamo compiled for a ``torch.compile``d ``optimizer.step`` (Adam)
    before and after ``cuts`` plateau cuts, and the learning rates it went through. The
    compile backend only counts (``CompileCounter``): what recompiles is dynamo's decision,
    the same with any backend, and no C compiler is needed."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    step = torch.compile(optimizer.step, backend=counter)
    scheduler = DistributedReduceLROnPlateau(optimizer, patience=0, factor=0.5)
    x = torch.ones(8, 4)
    lrs = []

    def train_step() -> None:
        model(x).square().mean().backward()
        step()
        optimizer.zero_grad()

    for _ in range(2):  # compile, and settle whatever a second call recompiles
        train_step()
    frames_before = counter.frame_count
    scheduler.step(1.0)
    for _ in range(cuts):
        scheduler.step(1.0)  # no improvement, patience 0: a cut at every step
        train_step()
        lrs.append(float(optimizer.param_groups[0]["lr"]))
    return frames_before, counter.frame_count, lrs


def compile_unavailable() -> str:
    try:
        import torch._dynamo
    except ImportError as err:
        return f"torch._dynamo does not import: {err}"
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile is not supported on this Python with torch {torch.__version__}"
    return ""


@pytest.mark.skipif(bool(compile_unavailable()), reason=compile_unavailable() or "-")
def test_a_compiled_optimizer_step_is_not_recompiled_when_the_rate_is_cut(record_property: Any) -> None:
    before, after, lrs = compiled_steps(torch.tensor(0.1), cuts=3)
    # With a float rate (the control), dynamo specializes on its value: each cut compiles again.
    float_before, float_after, float_lrs = compiled_steps(0.1, cuts=3)
    record_property("recompiles_tensor_lr", after - before)
    record_property("recompiles_float_lr", float_after - float_before)
    print(f"torch {torch.__version__}: frames compiled after 3 cuts: tensor lr {after - before} "
          f"(first compile {before}), float lr {float_after - float_before} (first compile {float_before})")
    assert float_lrs == [0.05, 0.025, 0.0125]
    assert lrs == [as_dtype(lr, torch.float32) for lr in float_lrs]
    assert after == before, f"tensor lr: {after - before} recompiles after 3 cuts"
