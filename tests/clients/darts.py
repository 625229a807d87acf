"""darts (time series): an ``NLinearModel`` trained by darts' own ``fit`` under Lightning DDP, 2 CPU ranks.

What darts does with the metric (read in darts 0.48.1 with pytorch-lightning 2.6.6):

- ``darts/models/forecasting/pl_forecasting_module.py``, ``PLForecastingModule._train_val_step``
  (called by ``validation_step``): ``self.log("val_loss", loss, batch_size=batch.past_target.shape[0],
  prog_bar=True, sync_dist=True)``. Lightning averages the batch means of this rank weighted by
  batch size, then ``sync_dist`` all-reduces the ranks' means (unweighted) at the epoch end: every
  rank holds the same ``val_loss``. The metric is synced, not gathered exactly: with an odd number
  of validation windows it is the mean of two per-rank means, not the mean over the windows.
- ``PLForecastingModule.configure_optimizers`` (``_create_from_cls_and_kwargs``): the scheduler
  is ``lr_scheduler_cls(**lr_scheduler_kwargs, optimizer=optimizer)``, after popping Lightning's
  config keys (``monitor``, ``interval``, ``frequency``, ``strict``, ``name``; defaults
  ``"val_loss"``, ``"epoch"``, 1, True, None) out of ``lr_scheduler_kwargs``; it returns
  ``[optimizer], {"scheduler": scheduler, **config}``. No isinstance or exact-class test: our
  class builds and is stepped by Lightning (distplateau's callback, with each rank's validation
  window count as weight) once per epoch.
- ``darts/models/forecasting/torch_forecasting_model.py``: ``fit`` hands darts' ``TorchDataModule``
  (train ``shuffle=True``, val ``shuffle=False``, ``num_workers`` 0) to ``pl.Trainer(**pl_trainer_kwargs)``;
  Lightning adds its ``DistributedSampler``, which interleaves the windows between the ranks.

The seam is ``lr_scheduler_cls=``: ``DistributedReduceLROnPlateau`` instead of torch's
``ReduceLROnPlateau``, the same ``lr_scheduler_kwargs`` (``"monitor": "val_loss"`` as darts
documents).

Baseline: synced. Each rank validates other windows (one calm and one noisy series, interleaved),
but darts' ``sync_dist=True`` gives torch's class the same value on every rank, so it does not
diverge, and ours, stepping on those equal values, gives exactly torch's learning rates. There are
10 validation windows (5 per rank): an even count, so torch's padded shards and ours (distplateau's
callback stops the padding) hold the same windows.

Resume, through darts' own checkpoints: ``save_checkpoints=True`` makes darts add two
``ModelCheckpoint``s (``last-{epoch}`` and ``best-...``) under ``<work_dir>/<model_name>/checkpoints``
and pickle the model itself to ``_model.pth.tar``; ``NLinearModel.load_from_checkpoint(model_name,
work_dir, best=False)`` loads both and sets ``load_ckpt_path``, and the next ``fit`` passes it to
``trainer.fit(ckpt_path=...)``: Lightning restores epoch, optimizer and the scheduler's
``state_dict``, and training continues (not restarts). ``fit(epochs=n)`` is the *total* number of
epochs here (darts sets ``max_epochs=n``), although darts' docstring says "additional": measured,
``epochs=4`` after 4 epochs trains nothing. Two things a user of our class meets:

- darts' safe loading (``darts/utils/serialization/base.py``, ``is_allowed_global``) allows only
  classes under darts/torch/Lightning/... prefixes, so ``load_from_checkpoint`` refuses the pickled
  ``lr_scheduler_cls``: ``UnpicklingError: Safe loading failed as global
  `distplateau.scheduler.DistributedReduceLROnPlateau` is not allow-listed``. darts' documented
  fix, used here: ``darts.utils.serialization.add_safe_globals([DistributedReduceLROnPlateau])``.
- ``ModelCheckpoint`` saves at the end of the training epoch, before Lightning's epoch-end plateau
  step; distplateau's callback stores that pending step in the checkpoint and "resume-2" takes it
  first (rank 0 with the gathered value and weight 1, rank 1 with NaN and weight 0). "resume-1"
  recorded that same step after the save, so its last row and "resume-2"'s first are the same step.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

LIBRARY = "darts"
FIELD = "time series"
SEAM = "`lr_scheduler_cls=`"
REQUIREMENTS = ["darts==0.48.1"]
EXTRAS = "pytorch-lightning"  # darts imports `pytorch_lightning`, not `lightning.pytorch`
LAUNCHER = "python"  # darts' Trainer(strategy="ddp", devices=2) starts rank 1 itself
BASELINE = "synced"
RESUME = "exact"
TIMEOUT = 600

EPOCHS = 8  # "ours" and, split 4 + 4, "resume-1" and "resume-2"
FIRST_PART = 4
INPUT, OUTPUT = 8, 2  # NLinear's input and output chunk lengths
MODEL_NAME = "nlinear"


def _series(seed: int, length: int, noise: float) -> Any:
    """A noisy sine with a trend, as a float32 darts ``TimeSeries``."""
    import numpy as np
    from darts import TimeSeries

    rng = np.random.default_rng(seed)
    t = np.arange(length, dtype=np.float64)
    values = np.sin(t / 3.0) + 0.02 * t + noise * rng.standard_normal(length)
    return TimeSeries.from_values(values.astype(np.float32))


def _data() -> tuple[list[Any], list[Any]]:
    """Training and validation series, the same on every rank (darts hands them to Lightning,
    whose DistributedSampler splits the windows between the ranks)."""
    train = [_series(seed, 40, noise) for seed, noise in ((0, 0.05), (1, 0.3))]
    # 2 series of 14 points: 14 - 8 - 2 + 1 = 5 windows each, 10 in all, 5 per rank. An even
    # count keeps torch's padded shards and ours (unpadded) the same samples.
    val = [_series(seed, 14, noise) for seed, noise in ((2, 0.05), (3, 0.6))]
    return train, val


def _model(variant: str, work_dir: Path) -> Any:
    from darts.models import NLinearModel

    if variant == "torch":
        from torch.optim.lr_scheduler import ReduceLROnPlateau as scheduler_cls
    else:  # the whole swap: the class handed to darts
        from distplateau import DistributedReduceLROnPlateau as scheduler_cls
    return NLinearModel(
        # random_state: darts seeds torch, so both ranks and every launch start from the same
        # weights (the resumed run must equal the uninterrupted one).
        input_chunk_length=INPUT, output_chunk_length=OUTPUT, batch_size=4, n_epochs=EPOCHS, random_state=0,
        optimizer_kwargs={"lr": 0.05},
        lr_scheduler_cls=scheduler_cls,
        # patience 0 and a 5 % threshold: several cuts within 8 epochs, so the lrs say something
        lr_scheduler_kwargs={"monitor": "val_loss", "mode": "min", "factor": 0.5, "patience": 0, "threshold": 0.05},
        # Each launch has a fresh work_dir. force_reset=False: rank 1 re-runs main() and builds the
        # model again, which must not wipe what rank 0 wrote there.
        save_checkpoints=True, work_dir=str(work_dir), model_name=MODEL_NAME, force_reset=False,
        # logger=False: nothing written into the repository (Lightning's default lightning_logs/)
        pl_trainer_kwargs={"accelerator": "cpu", "devices": 2, "strategy": "ddp", "logger": False,
                           "enable_progress_bar": False, "enable_model_summary": False},
    )


def main() -> None:
    variant, out = sys.argv[1:3]
    from tests.clients import record

    # On both ranks: Lightning's DDP launcher re-runs this module (python -m) for rank 1.
    record.install(out, variant)
    train, val = _data()
    checkpoints = Path(out) / "ckpt"  # resume-1 writes darts' checkpoints there, resume-2 reads them
    if variant == "resume-2":
        from darts.models import NLinearModel
        from darts.utils.serialization import add_safe_globals

        from distplateau import DistributedReduceLROnPlateau

        # darts' safe loading refuses classes outside its allow-list, our lr_scheduler_cls included
        add_safe_globals([DistributedReduceLROnPlateau])
        model = NLinearModel.load_from_checkpoint(MODEL_NAME, work_dir=str(checkpoints), best=False)
        # epochs is the total when resuming (max_epochs): epochs 4 to 7 run
        model.fit(train, val_series=val, epochs=EPOCHS, verbose=False)
        return
    model = _model(variant, checkpoints if variant == "resume-1" else Path(out) / f"work-{variant}")
    model.fit(train, val_series=val, epochs=FIRST_PART if variant == "resume-1" else EPOCHS, verbose=False)


if __name__ == "__main__":
    main()
