"""Scripted validation losses on uneven shards with one NaN, and the learning rates torch's own
``ReduceLROnPlateau`` takes in one process on their exact global mean: what the framework
checks (``tests/fabric_checks.py``, ``tests/ray_checks.py``) run on real ranks and what their
tests compare every rank with.

Each sample's loss at each epoch is scripted so that the exact global mean is known. On 2 ranks
the shards are uneven (rank 0 holds samples 0-5, rank 1 samples 6 and 7); rank 0's mean
worsens while rank 1's improves, so a per-rank scheduler, a mean of the ranks' means and the
global mean all take different schedules; one sample of rank 1 is NaN at epoch ``NAN_EPOCH``.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

EPOCHS = 8
RESUME_AT = 4  # runs that checkpoint stop after epochs 0-3; the resumed run does epochs 4-7
NAN_EPOCH = 5
LR, FACTOR, PATIENCE = 0.1, 0.5, 1
# Per epoch, the mean loss of samples 0-5 and of samples 6-7; each sample is its group's mean
# plus or minus SPREAD, so that every mean here is exact in float32 and float64.
GROUP_MEANS = [(2.0, 2.0), (1.75, 1.5), (1.875, 1.0), (2.0, 0.75), (2.125, 0.5), (1.5, 0.25), (2.25, 0.25),
               (2.25, 0.25)]
SPREAD = 0.125
VAL_LOSSES = [[a + SPREAD * (-1) ** i for i in range(6)] + [b + SPREAD, b - SPREAD] for a, b in GROUP_MEANS]
VAL_LOSSES[NAN_EPOCH][7] = math.nan
SHARDS = {1: [range(0, 8)], 2: [range(0, 6), range(6, 8)]}  # world size -> each rank's sample indices


def local_val_loss(epoch: int, rank: int, world: int) -> tuple[torch.Tensor, int]:
    """Rank ``rank``'s mean validation loss at ``epoch`` and its number of samples."""
    losses = torch.tensor([VAL_LOSSES[epoch][i] for i in SHARDS[world][rank]])
    return losses.mean(), len(losses)


def shard_losses(epoch: int, world: int) -> list[list[float]]:
    return [[VAL_LOSSES[epoch][i] for i in shard] for shard in SHARDS[world]]


def global_mean(epoch: int, world: int) -> float:
    """The mean over every sample of the ranks whose mean is finite (NaN if there is none)."""
    finite = [losses for losses in shard_losses(epoch, world) if math.isfinite(sum(losses))]
    count = sum(len(losses) for losses in finite)
    return sum(sum(losses) for losses in finite) / count if count else math.nan


def schedule(metrics: list[float]) -> list[float]:
    """The learning rates torch's ReduceLROnPlateau takes in one process on ``metrics``."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    scheduler = ReduceLROnPlateau(optimizer, factor=FACTOR, patience=PATIENCE)
    lrs = []
    for metric in metrics:
        scheduler.step(metric)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def reference(worlds: list[int]) -> tuple[list[float], list[float]]:
    """The global metrics of a run whose epoch ``e`` ran on ``worlds[e]`` ranks, and the
    learning rates torch's scheduler takes on them."""
    metrics = [global_mean(epoch, world) for epoch, world in enumerate(worlds)]
    return metrics, schedule(metrics)


def same(a: list[float | None], b: list[float]) -> bool:
    """Equal lists, where NaN equals NaN."""
    return len(a) == len(b) and all(x == y or (x is not None and math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))
