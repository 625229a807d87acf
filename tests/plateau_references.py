"""The two one-machine references of ``smoothing_factor`` and ``accumulation_size``, written
out here so that the tests compare with them without installing schnetpack (and its
dependencies) or JAX.

* :class:`SchnetpackReduceLROnPlateau`: ``schnetpack.train.lr_scheduler.ReduceLROnPlateau`` of
  schnetpack 2.2.0 (the release with their PR #751: the parent steps on the average; 2.1.1
  passed it the raw value), its ``__init__`` and ``step`` as released, ``verbose`` left out.
* :func:`optax_window_means`: the accumulation of optax 0.2.8's
  ``contrib.reduce_on_plateau`` (``update_fn``: ``avg_value`` and ``count``), in float64: the
  mean of each full window of ``accumulation_size`` values, computed as optax does, as a
  running mean. optax's plateau test on those means is not ours (it reduces after
  ``patience`` bad windows, torch after more than ``patience``); ours is torch's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["SchnetpackReduceLROnPlateau", "optax_window_means"]


class SchnetpackReduceLROnPlateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
    """schnetpack 2.2.0's ``ReduceLROnPlateau``: torch's, stepped on an exponential moving
    average of the metric, ``smoothing_factor`` the weight of the previous average."""

    def __init__(self, optimizer: Any, mode: str = "min", factor: float = 0.1, patience: int = 10,
                 threshold: float = 1e-4, threshold_mode: str = "rel", cooldown: int = 0,
                 min_lr: Any = 0, eps: float = 1e-8, smoothing_factor: float = 0.0) -> None:
        super().__init__(optimizer=optimizer, mode=mode, factor=factor, patience=patience, threshold=threshold,
                         threshold_mode=threshold_mode, cooldown=cooldown, min_lr=min_lr, eps=eps)
        self.smoothing_factor = smoothing_factor
        self.ema_loss: float | None = None

    def step(self, metrics: Any, epoch: Any = None) -> None:  # type: ignore[override]
        current = float(metrics)
        if self.ema_loss is None:
            self.ema_loss = current
        else:
            self.ema_loss = self.smoothing_factor * self.ema_loss + (1.0 - self.smoothing_factor) * current
        super().step(self.ema_loss, epoch)


def optax_window_means(values: Sequence[float], accumulation_size: int) -> list[float]:
    """The mean optax's ``reduce_on_plateau`` hands its plateau test at the end of each full
    window of ``accumulation_size`` calls (an unfinished last window has none)."""
    means = []
    count, avg_value = 0, 0.0
    for value in values:
        new_count = count + 1
        avg_value = (count * avg_value + value) / new_count
        count = new_count
        if count == accumulation_size:  # _update_scale, which resets count and avg_value
            means.append(avg_value)
            count, avg_value = 0, 0.0
    return means
