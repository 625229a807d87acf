"""Regenerate ``docs/figures/replay_metrics.csv`` and ``docs/figures/replay.png``:
``python docs/figures/make_replay.py`` (Lightning, matplotlib; about a minute on 2 CPU cores).

A real 2-rank Lightning DDP fit (CPU, gloo) of a small noisy regression, its validation loss
logged by each rank without ``sync_dist``, with ``DistributedReduceLROnPlateau(patience=3,
factor=0.5)``; Lightning's ``CSVLogger`` writes rank 0's ``val_loss`` and the callback's
``val_loss/global``, ``/best``, ``/bad_steps``. Then, on rank 0, the replay of that file with
the run's settings and two others draws the figure::

    python -m distplateau.replay docs/figures/replay_metrics.csv --column val_loss/global \\
        --lr 0.05 --factor 0.5 --sweep patience=1,3,6 --plot docs/figures/replay.png
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from distplateau import DistributedReduceLROnPlateau

HERE = Path(__file__).resolve().parent
LR = 0.05


def data(n: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    y = x @ torch.linspace(-1, 1, 8) + 0.5 * torch.randn(n, generator=gen)
    return TensorDataset(x, y)


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(8, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x).squeeze(-1), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x).squeeze(-1), y), batch_size=len(x))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(data(256, 1), batch_size=16, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(data(48, 2), batch_size=16)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)
        sched = DistributedReduceLROnPlateau(opt, patience=3, factor=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss"}}


def main() -> None:
    warnings.filterwarnings("ignore")
    out = Path(tempfile.mkdtemp(prefix="distplateau-replay-")) if len(sys.argv) < 2 else Path(sys.argv[1])
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=30, num_sanity_val_steps=0,
                         logger=pl.loggers.CSVLogger(str(out), name="", version=0), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Regression())
    if trainer.global_rank != 0:
        return
    csv = HERE / "replay_metrics.csv"
    shutil.copyfile(out / "version_0" / "metrics.csv", csv)
    subprocess.run([sys.executable, "-m", "distplateau.replay", str(csv.relative_to(HERE.parent.parent)),
                    "--column", "val_loss/global", "--lr", str(LR), "--factor", "0.5", "--sweep", "patience=1,3,6",
                    "--plot", "docs/figures/replay.png"], check=True, cwd=HERE.parent.parent)


if __name__ == "__main__":
    main()
