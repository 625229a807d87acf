"""Hugging Face Accelerate: one plateau step per ``scheduler.step()`` under ``Accelerator.prepare``.

``Accelerator.prepare`` wraps every scheduler in ``accelerate.scheduler.AcceleratedScheduler``,
whose ``step()`` calls the wrapped ``step()`` once per process (``num_processes`` times) unless
``split_batches=True`` or ``step_scheduler_with_optimizer=False``, and not at all while gradients
are being accumulated or after a skipped optimizer step. That suits a scheduler stepped with
the optimizer; a plateau scheduler is stepped once per evaluation, and for ours every inner
call is also a collective.

``DistributedReduceLROnPlateau`` therefore carries Accelerate's own "already prepared" mark,
``_is_accelerate_prepared = True``: ``Accelerator.prepare_scheduler`` returns a scheduler so
marked as it is (appended to ``accelerator._schedulers``, so ``save_state``/``load_state``
still cover it), where it would otherwise build the wrapper. Accelerate uses the mark so that
``prepare`` can be called twice on the same objects; we rely on it from Accelerate 0.34.2 to
1.15.0, and ``tests/test_accelerate.py`` fails, naming the version, if Accelerate stops
honouring it. Should a future Accelerate wrap the scheduler anyway, :func:`refuse_wrapper`
turns the wrong number of steps into an error on every rank. Accelerate is never imported
here: it is looked up in ``sys.modules``, where a script that built an ``Accelerator`` has it.
"""

from __future__ import annotations

import sys

__all__ = ["PREPARED_MARK", "refuse_wrapper"]

#: The attribute ``Accelerator.prepare_scheduler`` checks before it wraps a scheduler.
PREPARED_MARK = "_is_accelerate_prepared"


def refuse_wrapper() -> None:
    """Raise if the caller's caller, i.e. the caller of ``DistributedReduceLROnPlateau.step``, is
    ``AcceleratedScheduler.step``: the step would be repeated once per process, or skipped.

    Costs one ``sys.modules`` look-up without Accelerate, a frame look-up with it; every rank
    is wrapped alike, so every rank raises, before the collective.

    Raises:
        RuntimeError: ``step`` was called by Accelerate's ``AcceleratedScheduler``.
    """
    module = sys.modules.get("accelerate.scheduler")
    if module is None:
        return
    wrapper_step = getattr(getattr(module, "AcceleratedScheduler", None), "step", None)
    caller = sys._getframe(1).f_back  # sys._getframe(2) would raise where step() has no Python caller
    if caller is None or caller.f_code is not getattr(wrapper_step, "__code__", None):
        return
    version = getattr(sys.modules.get("accelerate"), "__version__", "unknown")
    raise RuntimeError(
        f"DistributedReduceLROnPlateau.step() was called by Accelerate's AcceleratedScheduler (accelerate "
        f"{version}), which would step it once per process, or not at all between gradient-sync points. "
        f"distplateau marks its scheduler {PREPARED_MARK} so that Accelerator.prepare() returns it unwrapped, "
        "and this Accelerate version wrapped it anyway. Keep the scheduler out of prepare() and pass it to "
        "accelerator.register_for_checkpointing(scheduler) instead, so that save_state()/load_state() still "
        "cover it; and please report this Accelerate version to distplateau."
    )
