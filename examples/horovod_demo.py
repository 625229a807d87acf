"""Plain ReduceLROnPlateau vs DistributedReduceLROnPlateau in a 2-rank Horovod training loop.

Run it with ``bash dev.sh demo`` or, in an environment with Horovod:

    horovodrun -np 2 --gloo python examples/horovod_demo.py

Each rank validates on its own, uneven shard (rank 0 holds three times as many validation
samples as rank 1), and at one epoch rank 1's validation loss comes out NaN (think of a
corrupt batch). Two identical models train side by side with Horovod's gradient averaging:
one is scheduled by torch's ``ReduceLROnPlateau`` on each rank's local loss, the other by
``DistributedReduceLROnPlateau`` with the local sample count as weight. Rank 0 prints the
learning rate each rank used at every epoch, and how far the two copies of each model
drifted apart across ranks.
"""

from __future__ import annotations

import argparse
import logging

import horovod.torch as hvd
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from distplateau import DistributedReduceLROnPlateau

VAL_SAMPLES = (192, 64)  # per rank: uneven shards


def make_data(rank: int, n: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1000 * rank)
    x = torch.rand(n, 4, generator=gen) * 2 - 1
    y = x @ torch.tensor([3.0, -2.0, 0.5, 1.0]) + 0.3 + noise * torch.randn(n, generator=gen)
    return x, y


def train(epochs: int, nan_epoch: int) -> dict[str, list[float]]:
    """Train both models on this rank; return the per-epoch learning rates and val losses."""
    rank = hvd.rank()
    torch.manual_seed(0)
    models, optimizers, schedulers = {}, {}, {}
    for name in ("plain", "distplateau"):
        model = torch.nn.Linear(4, 1)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        opt = hvd.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.2),
            named_parameters=[(f"{name}.{n}", p) for n, p in model.named_parameters()],
        )
        models[name], optimizers[name] = model, opt
    schedulers["plain"] = ReduceLROnPlateau(optimizers["plain"], factor=0.5, patience=1)
    schedulers["distplateau"] = DistributedReduceLROnPlateau(optimizers["distplateau"], factor=0.5, patience=1)

    x_train, y_train = make_data(rank, 256, noise=0.5, seed=1)
    x_val, y_val = make_data(rank, VAL_SAMPLES[rank % 2], noise=0.4 + 0.4 * rank, seed=2)
    history: dict[str, list[float]] = {"plain": [], "distplateau": [], "plain_loss": [], "distplateau_loss": []}
    for epoch in range(1, epochs + 1):
        for name, model in models.items():
            model.train()
            for i in range(0, len(x_train), 32):
                optimizers[name].zero_grad()
                loss = torch.nn.functional.mse_loss(model(x_train[i : i + 32]).squeeze(1), y_train[i : i + 32])
                loss.backward()
                optimizers[name].step()
            model.eval()
            with torch.no_grad():
                val_loss = torch.nn.functional.mse_loss(model(x_val).squeeze(1), y_val)
            if rank == 1 and epoch == nan_epoch:
                val_loss = torch.tensor(float("nan"))
            history[name].append(optimizers[name].param_groups[0]["lr"])  # the lr this epoch trained with
            history[f"{name}_loss"].append(float(val_loss))
            if name == "plain":
                schedulers[name].step(val_loss)
            else:
                schedulers[name].step(val_loss, weight=len(x_val))
    for name, model in models.items():
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        highest = hvd.allreduce(flat, op=hvd.Max, name=f"{name}.max")
        spread = highest - hvd.allreduce(flat, op=hvd.Min, name=f"{name}.min")
        history[f"{name}_weight_spread"] = [float(spread.abs().max())]
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--nan-epoch", type=int, default=5, help="epoch at which rank 1's val loss is NaN")
    args = parser.parse_args()
    logging.basicConfig(format="%(message)s")  # shows distplateau's NaN report, from rank 0 only
    hvd.init()
    history = train(args.epochs, args.nan_epoch)
    everyone = hvd.allgather_object(history)
    if hvd.rank() == 0:
        size = hvd.size()
        print(f"\nlearning rate used in each epoch, per rank ({size} ranks; "
              f"NaN val loss on rank 1 at epoch {args.nan_epoch})")
        head = " ".join(f"plain r{r:<4}" for r in range(size)) + " | " + " ".join(f"ours r{r:<5}" for r in range(size))
        print(f"epoch | {head}")
        for e in range(args.epochs):
            plain = " ".join(f"{h['plain'][e]:<10.4g}" for h in everyone)
            ours = " ".join(f"{h['distplateau'][e]:<10.4g}" for h in everyone)
            print(f"{e + 1:>5} | {plain} | {ours}")
        for name in ("plain", "distplateau"):
            same = all(h[name] == everyone[0][name] for h in everyone)
            spread = everyone[0][f"{name}_weight_spread"][0]
            label = "ReduceLROnPlateau" if name == "plain" else "DistributedReduceLROnPlateau"
            verdict = "identical on every rank" if same else "DIVERGED across ranks"
            print(f"{label:>28}: learning rates {verdict}; model weights differ across ranks by up to {spread:.3g}")
    hvd.shutdown()


if __name__ == "__main__":
    main()
