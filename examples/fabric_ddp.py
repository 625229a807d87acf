"""ReduceLROnPlateau in a Lightning Fabric loop: every rank on the schedule of the global mean.

Run it (2 CPU processes; ``fabric.launch()`` starts the second one by running this script again):

    python examples/fabric_ddp.py --epochs 4    # checkpoints to fabric_ddp.ckpt after every epoch
    python examples/fabric_ddp.py --epochs 8    # resumes from it at epoch 4

The validation shards are uneven (38 and 37 samples of 75): each rank passes its number of
samples as the weight, so every rank steps on the mean over all 75.
"""

from __future__ import annotations

import argparse
import os

import torch
from lightning.fabric import Fabric  # package `lightning-fabric`: from lightning_fabric import Fabric
from torch.utils.data import DataLoader, TensorDataset

from distplateau import DistributedReduceLROnPlateau


def regression(n: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 4, generator=gen) * 2 - 1
    y = x @ torch.tensor([3.0, -2.0, 0.5, 1.0]) + 0.3 + 0.5 * torch.randn(n, generator=gen)
    return TensorDataset(x, y)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--checkpoint", default="fabric_ddp.ckpt")
    args = parser.parse_args()

    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    model, optimizer = fabric.setup(model, optimizer)
    scheduler = DistributedReduceLROnPlateau(optimizer, factor=0.5, patience=1, threshold=0.01)
    train = fabric.setup_dataloaders(DataLoader(regression(256, 0), batch_size=32))
    # Shard validation by index: setup_dataloaders' DistributedSampler would repeat a sample to
    # make 75 samples into 38 + 38.
    validation = regression(75, 1)
    x_val, y_val = validation[torch.arange(fabric.global_rank, len(validation), fabric.world_size)]

    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "epoch": 0}
    if os.path.exists(args.checkpoint):
        fabric.load(args.checkpoint, state)  # on every rank; sets state["epoch"] too
    for epoch in range(state["epoch"], args.epochs):
        model.train()
        for x, y in train:
            optimizer.zero_grad()
            fabric.backward(torch.nn.functional.mse_loss(model(x).squeeze(-1), y))
            optimizer.step()
        model.eval()
        with torch.no_grad():
            val_loss = torch.nn.functional.mse_loss(model(x_val).squeeze(-1), y_val)
        scheduler.step(val_loss, weight=len(y_val))  # every rank, every evaluation
        state["epoch"] = epoch + 1
        fabric.save(args.checkpoint, state)  # rank 0 writes; the scheduler's state is in it
        print(f"rank {fabric.global_rank} epoch {epoch}: global val loss {scheduler.last_global_metric:.4f}, "
              f"lr {scheduler.get_last_lr()[0]:g}", flush=True)


if __name__ == "__main__":
    main()
