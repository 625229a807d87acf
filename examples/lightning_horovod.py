"""ReduceLROnPlateau with PyTorch Lightning and Horovod: one class swap, one schedule.

Run it (2 CPU processes, started by horovodrun):

    horovodrun -np 2 --gloo python examples/lightning_horovod.py

Written with ``import pytorch_lightning`` (package ``pytorch-lightning``), whose Horovod
strategy ``import distplateau.pytorch_lightning`` registers as ``Trainer(strategy="horovod")``
(Lightning 2.0 removed its own); with the ``lightning`` package write
``from lightning.pytorch import ...`` and ``import distplateau.lightning`` instead.

Each rank validates on its own shard and logs ``val_loss`` *without* ``sync_dist``, so the
ranks see different losses. ``configure_optimizers`` uses ``DistributedReduceLROnPlateau``
where a Lightning user would write ``ReduceLROnPlateau``; nothing else differs. Pass
``--plain`` to use torch's ``ReduceLROnPlateau`` and watch the ranks' learning rates part.
"""

from __future__ import annotations

import argparse

import torch
from pytorch_lightning import LightningModule, Trainer
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.data import DataLoader, TensorDataset

import distplateau.pytorch_lightning  # noqa: F401  (registers strategy="horovod")
from distplateau import DistributedReduceLROnPlateau


def regression(n: int, seed: int, noisy_odd: bool = False) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 4, generator=gen) * 2 - 1
    noise = torch.full((n,), 0.1)
    if noisy_odd:  # the sampler gives odd samples to rank 1: its loss sits on a noise floor
        noise[1::2] = 5.0
    y = x @ torch.tensor([3.0, -2.0, 0.5, 1.0]) + 0.3 + noise * torch.randn(n, generator=gen)
    return TensorDataset(x, y)


class Regression(LightningModule):
    def __init__(self, plain: bool = False) -> None:
        super().__init__()
        self.plain = plain
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x).squeeze(-1), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x).squeeze(-1), y))  # no sync_dist

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.02)
        Scheduler = ReduceLROnPlateau if self.plain else DistributedReduceLROnPlateau  # the one-class swap
        scheduler = Scheduler(optimizer, factor=0.5, patience=1, threshold=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss"}}

    def on_train_epoch_start(self) -> None:
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        lrs = self.all_gather(torch.tensor(lr, dtype=torch.float64)).tolist()
        if self.global_rank == 0:
            per_rank = "  ".join(f"{x:.4g}" for x in lrs)
            print(f"epoch {self.current_epoch}: learning rate per rank {per_rank}", flush=True)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(regression(256, seed=0), batch_size=32, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(regression(96, seed=1, noisy_odd=True), batch_size=32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plain", action="store_true", help="use torch's ReduceLROnPlateau on each rank")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    trainer = Trainer(strategy="horovod", accelerator="cpu", max_epochs=args.epochs, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Regression(plain=args.plain))


if __name__ == "__main__":
    main()
