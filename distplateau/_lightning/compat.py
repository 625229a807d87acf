"""Every use of a private Lightning API by distplateau, in one place.

Checked against ``lightning`` and ``pytorch-lightning`` 2.1.0, 2.4.0 and 2.6.6, the releases
that ``bash dev.sh compat`` tests (docs/compatibility.md). Each function names the private
attribute it uses and raises :class:`LightningChangedError` when a Lightning release no longer
has it, so that such a release breaks here, loudly, and not as a rank left waiting in a
collective.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

CHECKED = "2.1.0, 2.4.0 and 2.6.6"


class LightningChangedError(RuntimeError):
    """This Lightning release lacks a private API that distplateau relies on."""


def _private(obj: Any, name: str) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError:
        raise LightningChangedError(
            f"distplateau: {type(obj).__name__}.{name} is gone in this Lightning release (distplateau was checked "
            f"against Lightning {CHECKED}); DistributedReduceLROnPlateau cannot be kept in step under this Trainer. "
            "Please report it, and pin an earlier Lightning meanwhile."
        ) from None


def check(trainer: Any) -> None:
    """Raise :class:`LightningChangedError` now, at the start of ``fit``, if any private API
    below is missing from this ``trainer``'s loops."""
    epoch_loop = trainer.fit_loop.epoch_loop
    for name in ("_get_monitor_value", "_num_ready_batches_reached", "val_loop", "_batches_that_stepped"):
        _private(epoch_loop, name)
    _private(epoch_loop.val_loop, "setup_data")


def shadow(obj: Any, name: str, replacement: Callable[..., Any]) -> Callable[[], None]:
    """Replace the method ``name`` of ``obj`` alone with ``replacement`` (an instance attribute
    shadows the class's method, as LightningCLI does for ``configure_optimizers``); returns the
    function that undoes it."""
    before = obj.__dict__.get(name)
    setattr(obj, name, replacement)

    def undo() -> None:
        if before is not None:
            setattr(obj, name, before)
        else:
            obj.__dict__.pop(name, None)

    return undo


def on_monitor_lookup(trainer: Any, lookup: Callable[[Callable[[str], Any], str], Any]) -> Callable[[], None]:
    """Route the training epoch loop's look-up of a plateau scheduler's monitored metric
    (``_TrainingEpochLoop._get_monitor_value(key)``, called on every rank at the same point,
    just before Lightning steps or skips the scheduler) through ``lookup(original, key)``."""
    epoch_loop = trainer.fit_loop.epoch_loop
    original = _private(epoch_loop, "_get_monitor_value")
    return shadow(epoch_loop, "_get_monitor_value", lambda key: lookup(original, key))


def logged_step(trainer: Any) -> int:
    """The step Lightning's loggers get now (``_TrainingEpochLoop._batches_that_stepped``, as
    its ``LearningRateMonitor`` uses)."""
    return int(_private(trainer.fit_loop.epoch_loop, "_batches_that_stepped"))


def epoch_finished(trainer: Any) -> bool:
    """Whether the current training epoch has run all its batches
    (``_TrainingEpochLoop._num_ready_batches_reached()``)."""
    return bool(_private(trainer.fit_loop.epoch_loop, "_num_ready_batches_reached")())


def after_validation_data_setup(trainer: Any, then: Callable[[], None]) -> Callable[[], None]:
    """Call ``then()`` each time the fit loop's validation loop has built its dataloaders
    (``_EvaluationLoop.setup_data()``: Lightning has added its samplers, and no batch has been
    drawn yet)."""
    val_loop = trainer.fit_loop.epoch_loop.val_loop
    setup_data = _private(val_loop, "setup_data")

    def setup_then() -> None:
        setup_data()
        then()

    return shadow(val_loop, "setup_data", setup_then)
