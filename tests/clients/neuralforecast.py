"""neuralforecast (Nixtla): ``NeuralForecast(models=[MLP(...)]).fit(df, val_size=...)`` on 2 CPU ranks.

Read in neuralforecast 3.3.0, ``neuralforecast/common/_base_model.py`` (with pytorch_lightning 2.6.6):

- ``BaseModel.__init__`` takes ``lr_scheduler=`` (a class, checked with ``issubclass(...,
  torch.optim.lr_scheduler.LRScheduler)``: ours passes, it subclasses torch's class) and
  ``lr_scheduler_kwargs=``; there is no ``config_optimizers=`` in this version.
- ``BaseModel.configure_optimizers`` builds ``lr_scheduler(optimizer=optimizer, **lr_scheduler_kwargs)`` and
  returns ``{"optimizer": ..., "lr_scheduler": {"scheduler": ..., "frequency": 1, "interval": "step"}}``: no
  ``"monitor"``. For torch's ``ReduceLROnPlateau`` Lightning's ``_configure_schedulers_automatic_opt`` refuses
  that at ``fit``: ``MisconfigurationException: The lr scheduler dict must include a monitor when a
  `ReduceLROnPlateau` scheduler is used.`` So ``lr_scheduler=ReduceLROnPlateau`` cannot be used at all, and a
  user of torch's class today subclasses the model and adds the key (variant "torch" below). Ours carries its
  monitor: ``lr_scheduler=DistributedReduceLROnPlateau, lr_scheduler_kwargs={"monitor": "valid_loss", ...}``
  works as it is, since distplateau's callback adds the scheduler's ``monitor`` to a dict that lacks one.
- ``"interval": "step"``: Lightning steps a plateau scheduler after every training batch, on whatever
  ``trainer.callback_metrics`` holds. torch's class would count each training batch since the last
  validation as a bad epoch on the same stale value; ours steps only on a value logged since its last step,
  i.e. once per validation. The case validates after every training batch (``val_check_steps=1``) so that the
  two step equally often.
- The metric: ``validation_step`` logs ``"valid_loss"`` (this rank's window-weighted mean, ``on_epoch=True``,
  no ``sync_dist``): per rank. ``on_validation_epoch_end`` logs ``"ptl/val_loss"`` after an ``all_gather`` of
  every rank's (loss sum, window count): the exact global, window-weighted mean, the same on every rank (the
  default ``val_monitor`` of its early stopping). The case monitors ``"valid_loss"`` (the one in the progress
  bar, and the one whose name a Lightning user expects). Monitored on ``"ptl/val_loss"`` (measured with this
  case's data), torch's class does not diverge and ours gives its learning rates; the values differ slightly,
  since with 7 series Lightning's ``DistributedSampler`` pads rank 1 with a repeat of series 0 and the
  library's mean counts it twice, while distplateau's callback un-pads validation when our class is in use.
- Data: Lightning's ``DistributedSampler`` deals the series to the ranks (``shuffle=False`` for validation:
  rank 0 the even series, rank 1 the odd ones). The odd series here are noisy, the even ones clean, so rank 1's
  validation loss stops improving two validations before rank 0's: torch's class cuts rank 1's learning rate
  at step 14 and rank 0's at step 16, and after 20 steps rank 0 trains at 0.00125, rank 1 at 0.000625.
  Ours weighs each rank by its validation series (the callback's ``extract_batch_size``), not by windows.
- Resume: none that keeps the scheduler. ``NeuralForecast.save``/``load`` keep weights and hyperparameters
  (safetensors), ``fit(use_init_models=False)`` continues from the weights with a new ``Trainer``, optimizer
  and scheduler, and ``trainer.fit`` is called without ``ckpt_path``. Saving a model built with our class
  needs ``neuralforecast.register_lr_scheduler(DistributedReduceLROnPlateau)`` first (a closed registry).
"""

from __future__ import annotations

import sys
from typing import Any

LIBRARY = "neuralforecast"
FIELD = "time series"
SEAM = '`lr_scheduler=` + `lr_scheduler_kwargs={"monitor": ...}`'
REQUIREMENTS = ["neuralforecast==3.3.0"]
EXTRAS = "pytorch-lightning"  # neuralforecast imports pytorch_lightning
LAUNCHER = "python"  # Lightning's CPU DDP starts rank 1 by running this module again
BASELINE = "diverges"
RESUME = ""  # see the docstring: no path through the library keeps the scheduler's state
TIMEOUT = 600

MONITOR = "valid_loss"
SERIES = 7  # validation: 4 on rank 0, 3 on rank 1 with ours (unpadded), 4 + 4 with torch's (padded)
LENGTH = 64
H = 4
VAL_SIZE = 8
STEPS = 20
SCHEDULER_KWARGS: dict[str, Any] = {"mode": "min", "factor": 0.5, "patience": 1, "threshold": 0.02}


def series() -> Any:
    """SERIES daily series: even ones a clean sine wave, odd ones the same wave under heavy noise (fixed seed)."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    t = np.arange(LENGTH)
    frames = []
    for i in range(SERIES):
        y = 10.0 + 3.0 * np.sin(2 * np.pi * (t + i) / 8)
        if i % 2:
            y = y + rng.normal(0.0, 8.0, LENGTH)
        frames.append(pd.DataFrame({"unique_id": f"s{i}", "ds": pd.date_range("2024-01-01", periods=LENGTH),
                                    "y": y}))
    return pd.concat(frames, ignore_index=True)


def model(variant: str) -> Any:
    """The library's MLP with torch's class (through the subclass a user needs today) or ours (as it is)."""
    import torch
    from neuralforecast.models import MLP

    from distplateau import DistributedReduceLROnPlateau

    class MonitoredMLP(MLP):  # what a user of torch's class writes: Lightning needs a monitor
        def configure_optimizers(self) -> Any:
            config = super().configure_optimizers()
            config["lr_scheduler"]["monitor"] = MONITOR
            return config

    common: dict[str, Any] = dict(
        h=H, input_size=2 * H, hidden_size=16, num_layers=2, max_steps=STEPS, val_check_steps=1,
        batch_size=(SERIES + 1) // 2, valid_batch_size=SERIES, windows_batch_size=32, learning_rate=5e-3,
        scaler_type="identity", random_seed=1, dataloader_kwargs={"num_workers": 0},
        # Trainer kwargs, handed on by the model
        accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    if variant == "torch":
        return MonitoredMLP(lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau,
                            lr_scheduler_kwargs=SCHEDULER_KWARGS, **common)
    # The swap: our class, and the monitor that neuralforecast's config lacks.
    return MLP(lr_scheduler=DistributedReduceLROnPlateau, lr_scheduler_kwargs={**SCHEDULER_KWARGS, "monitor": MONITOR},
               **common)


def main() -> None:
    variant, out = sys.argv[1:3]
    if variant not in ("torch", "ours"):
        raise SystemExit(f"neuralforecast has no resume variant; got {variant!r}")
    from tests.clients import record

    record.install(out, variant)
    from neuralforecast import NeuralForecast

    forecaster = NeuralForecast(models=[model(variant)], freq="D")
    forecaster.fit(df=series(), val_size=VAL_SIZE)


if __name__ == "__main__":
    main()
