"""ReduceLROnPlateau in a Ray Train ``TorchTrainer``: every worker on the schedule of the global mean.

Run it (2 CPU workers on a local Ray instance; needs ``pip install "ray[train]"``):

    python examples/ray_train.py --epochs 4    # reports a checkpoint after every epoch
    python examples/ray_train.py --epochs 8    # the same run name: resumes from its last checkpoint

The validation shards are uneven (38 and 37 samples of 75): each worker passes its number of
samples as the weight, so every worker steps on the mean over all 75.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from distplateau import DistributedReduceLROnPlateau


def regression(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 4, generator=gen) * 2 - 1
    return x, x @ torch.tensor([3.0, -2.0, 0.5, 1.0]) + 0.3 + 0.5 * torch.randn(n, generator=gen)


def train_loop(config: dict) -> None:
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(torch.nn.Linear(4, 1))  # DDP over Ray's process group
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    scheduler = DistributedReduceLROnPlateau(optimizer, factor=0.5, patience=1, threshold=0.01)
    start = 0
    if checkpoint := ray.train.get_checkpoint():  # on every worker
        with checkpoint.as_directory() as directory:
            state = torch.load(os.path.join(directory, "state.pt"), weights_only=True)
        model.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["epoch"]

    x_train, y_train = regression(256, 0)
    x_val, y_val = regression(75, 1)
    x_val, y_val = x_val[rank::world], y_val[rank::world]  # this worker's validation shard
    for epoch in range(start, config["epochs"]):
        model.train()
        for i in range(rank * 32, len(x_train), world * 32):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x_train[i:i + 32]).squeeze(-1), y_train[i:i + 32]).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            val_loss = torch.nn.functional.mse_loss(model(x_val).squeeze(-1), y_val)
        scheduler.step(val_loss, weight=len(y_val))  # every worker, every evaluation
        metrics = {"epoch": epoch, "val_loss": scheduler.last_global_metric, "lr": scheduler.get_last_lr()[0]}
        with tempfile.TemporaryDirectory() as directory:
            if rank == 0:  # the state is the same on every worker: rank 0's copy is the checkpoint
                torch.save({"model": model.module.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "epoch": epoch + 1},
                           os.path.join(directory, "state.pt"))
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))
            else:
                ray.train.report(metrics)  # every worker reports, as often as rank 0
        print(f"rank {rank} epoch {epoch}: global val loss {metrics['val_loss']:.4f}, lr {metrics['lr']:g}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--storage", default=os.path.abspath("ray_results"))
    args = parser.parse_args()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"epochs": args.epochs},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        # A run with the name and storage of an earlier one resumes from its latest checkpoint;
        # max_failures=1: after a worker dies, the whole group restarts from that checkpoint.
        run_config=RunConfig(name="plateau", storage_path=args.storage, failure_config=FailureConfig(max_failures=1)),
    )
    result = trainer.fit()
    print("final:", result.metrics)


if __name__ == "__main__":
    main()
