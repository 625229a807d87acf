"""skorch (general training): ``LRScheduler(policy=...)`` under skorch's own ``AccelerateMixin`` on 2 CPU ranks.

What skorch does with the metric (read in skorch 1.4.0):

- ``skorch/net.py``, ``NeuralNet.validation_step`` and ``run_single_epoch``: each rank computes
  the loss of its own validation batches and records it per batch with the batch size;
  ``skorch/callbacks/scoring.py``, ``PassthroughScoring.get_avg_score``, turns them into the
  epoch's ``valid_loss``, the batch-size-weighted mean *of this rank's batches only*.
- ``skorch/hf.py``, ``AccelerateMixin``: ``get_iterator`` hands every DataLoader to
  ``accelerator.prepare``, so each rank iterates its own shard of the validation set (batch ``i``
  goes to rank ``i % 2``); ``evaluation_step`` gathers predictions (``gather_for_metrics``), but
  that is the ``predict``/``forward`` path, not ``validation_step``: ``valid_loss`` is never
  gathered or synced. ``_initialize_accelerator`` calls ``accelerator.prepare(callback.policy_)``
  on each ``LRScheduler`` callback, but ``policy_`` is the *class*, which Accelerate returns
  unchanged: the scheduler is never wrapped in ``AcceleratedScheduler``.
- ``skorch/callbacks/lr_scheduler.py``, ``LRScheduler``: ``on_train_begin`` builds the policy
  in ``_get_scheduler`` as ``policy(net.optimizer_, **kwargs)`` and adds
  ``last_epoch=len(net.history) - 1`` for every policy but torch's own
  (``policy not in [ReduceLROnPlateau]``, an exact-class test: ``-1`` on a fresh net, the number of
  epochs already in the history on a resumed one; ``DistributedReduceLROnPlateau`` needs its
  ``last_epoch`` argument for this). ``on_epoch_end`` reads ``net.history[-1, monitor]`` and,
  because ``isinstance(self.lr_scheduler_, ReduceLROnPlateau)`` holds for our subclass too,
  calls ``_step`` -> ``lr_scheduler.step(score)``: positionally, no weight (so weight 1 per rank,
  right where shards are equal, as Accelerate's ``even_batches`` makes them).

The seam is the ``policy=`` argument: ``LRScheduler(policy=DistributedReduceLROnPlateau,
monitor="valid_loss", ...)`` instead of ``policy=ReduceLROnPlateau`` (or ``"ReduceLROnPlateau"``).

Baseline: every rank gets the same synthetic data and skorch/Accelerate shard it; the validation
set is built so that the batches Accelerate hands to rank 1 have targets of the opposite sign.
Rank 0's ``valid_loss`` falls while rank 1's rises as the model fits, so torch's class cuts rank
1's learning rate and not rank 0's: the baseline diverges.

No resume: ``LRScheduler.on_train_begin`` builds a fresh scheduler at every ``fit``/``partial_fit``
and the callback has no state of its own that ``save_params``/``load_params`` or the
``Checkpoint``/``LoadInitState`` callbacks save (they save module, optimizer, criterion and
history). After a resume the optimizer's learning rate is back, but ``best``, ``num_bad_epochs``
and ``cooldown_counter`` start over, with torch's class or ours (ours only gets ``last_epoch``).
"""

from __future__ import annotations

import sys
from typing import Any

LIBRARY = "skorch"
FIELD = "general training"
SEAM = "`LRScheduler(policy=...)`"
REQUIREMENTS = ["skorch==1.4.0"]
EXTRAS = "accelerate"
LAUNCHER = "torchrun"  # Accelerate reads torchrun's RANK/WORLD_SIZE/MASTER_* and starts gloo with cpu=True
BASELINE = "diverges"
RESUME = ""  # skorch rebuilds the scheduler at every fit and saves none of its state
TIMEOUT = 240

EPOCHS = 8
BATCH = 8
N_TRAIN = 64
N_VALID = 32  # 4 validation batches: Accelerate gives batches 0, 2 to rank 0 and 1, 3 to rank 1
FEATURES = 4


def data() -> tuple[Any, Any, Any, Any]:
    """The same arrays on every rank: a linear target, and a validation set whose odd batches
    (rank 1's shard under Accelerate) have the opposite sign, so their loss grows as the fit improves."""
    import numpy as np

    rng = np.random.default_rng(0)
    weights = rng.normal(size=(FEATURES, 1)).astype(np.float32)
    x_train = rng.normal(size=(N_TRAIN, FEATURES)).astype(np.float32)
    y_train = x_train @ weights + np.float32(0.1) * rng.normal(size=(N_TRAIN, 1)).astype(np.float32)
    x_valid = rng.normal(size=(N_VALID, FEATURES)).astype(np.float32)
    sign = np.where((np.arange(N_VALID) // BATCH) % 2 == 1, -1.0, 1.0).astype(np.float32)[:, None]
    y_valid = sign * (x_valid @ weights)
    return x_train, y_train, x_valid, y_valid


def main() -> None:
    variant, out = sys.argv[1:3]
    from tests.clients import record

    record.install(out, variant)  # before skorch builds the scheduler (at fit's on_train_begin)

    import torch
    from accelerate import Accelerator
    from skorch import NeuralNetRegressor
    from skorch.callbacks import LRScheduler
    from skorch.dataset import Dataset
    from skorch.helper import predefined_split
    from skorch.hf import AccelerateMixin
    from torch.optim.lr_scheduler import ReduceLROnPlateau

    from distplateau import DistributedReduceLROnPlateau

    class AcceleratedNet(AccelerateMixin, NeuralNetRegressor):  # skorch's documented recipe
        """NeuralNetRegressor with Accelerate."""

    class MeanSquaredError:
        """``torch.nn.MSELoss`` as a plain callable. ``AccelerateMixin`` prepares every criterion
        that is a ``torch.nn.Module``, and Accelerate 1.15's CPU branch of ``prepare_model`` wraps it
        in DDP without checking for trainable parameters (its GPU branch checks), which raises for a
        parameterless loss; skorch leaves a criterion that is not a Module alone."""

        def __call__(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.mse_loss(y_pred, y_true)

    torch.set_num_threads(1)  # 2 ranks on 2 cores
    torch.manual_seed(0)  # the same initial weights on both ranks (DDP broadcasts rank 0's anyway)
    accelerator = Accelerator(cpu=True)
    policy = ReduceLROnPlateau if variant == "torch" else DistributedReduceLROnPlateau  # the swap
    x_train, y_train, x_valid, y_valid = data()
    net = AcceleratedNet(
        torch.nn.Linear,
        module__in_features=FEATURES,
        module__out_features=1,
        accelerator=accelerator,
        criterion=MeanSquaredError,
        optimizer=torch.optim.SGD,
        lr=0.05,
        max_epochs=EPOCHS,
        batch_size=BATCH,
        train_split=predefined_split(Dataset(x_valid, y_valid)),
        iterator_train__shuffle=False,  # the same batches in every run
        callbacks=[LRScheduler(policy=policy, monitor="valid_loss", patience=1, factor=0.5)],
    )
    net.fit(x_train, y_train)
    accelerator.end_training()


if __name__ == "__main__":
    main()
