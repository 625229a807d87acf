"""Rank script of ``bench/noisy.py``: does smoothing the plateau's metric help real training?

Launched as 2 torch.distributed gloo processes (``harness.launch.run_torch``):
``python bench/noisy_worker.py OUT.json --seeds 0 1 2 3 4 --epochs 40``. For every seed, every
configuration trains the same model from the same start: a 64-64-10 MLP on scikit-learn's
digits (1797 images, shipped with the package) under ``DistributedDataParallel``, SGD with
momentum 0.9 at learning rate ``--lr``, 1000 training images split over the ranks (500 each,
batches of 25: 20 steps an epoch), a share ``--label-noise`` of them with a random label instead
of theirs, a deliberately small validation set of 40 images on uneven shards (24 + 16) that
drives the plateau, and the remaining 757 images as the test set on which the run is judged.
What a seed changes: the split, the random labels, the initial weights and the order of the
batches.

The configurations (``factor=0.5``, ``min_lr=1e-4``, patience 3 decisions):

* ``constant``: no scheduler, the learning rate stays;
* ``val s=S``: ``DistributedReduceLROnPlateau`` stepped once an epoch on the validation loss
  (weight: the rank's validation images), ``smoothing_factor=S`` for S in 0, 0.5, 0.8, 0.9;
* ``train window``: stepped after every optimizer step on that step's training loss (weight:
  the batch size), ``accumulation_size`` = the steps of one epoch: one decision an epoch on the
  exact mean training loss of the epoch, one collective an epoch.

Rank 0 writes, per configuration and seed: the test loss and accuracy after the last epoch,
the number of learning-rate reductions and the epoch of the first one, and the learning rate
of every epoch (both ranks' must agree; the worker checks it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distplateau import DistributedReduceLROnPlateau  # noqa: E402

TRAIN, VAL = 1000, 40
VAL_SHARDS = (24, 16)
BATCH = 25
CONFIGS: dict[str, dict[str, Any]] = {
    "constant": {},
    "val s=0": {"smoothing_factor": 0.0},
    "val s=0.5": {"smoothing_factor": 0.5},
    "val s=0.8": {"smoothing_factor": 0.8},
    "val s=0.9": {"smoothing_factor": 0.9},
    "train window": {"accumulation_size": TRAIN // 2 // BATCH},
}


def split(seed: int, label_noise: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(x))
    x, y = x[order] / 16.0, y[order].copy()
    flipped = rng.rand(TRAIN) < label_noise  # training labels replaced by random ones; validation and test stay clean
    y[:TRAIN][flipped] = rng.randint(0, 10, int(flipped.sum()))
    xs, ys = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
    return {"train": (xs[:TRAIN], ys[:TRAIN]), "val": (xs[TRAIN:TRAIN + VAL], ys[TRAIN:TRAIN + VAL]),
            "test": (xs[TRAIN + VAL:], ys[TRAIN + VAL:])}


def run(name: str, seed: int, data: dict[str, tuple[torch.Tensor, torch.Tensor]], epochs: int, lr: float,
        rank: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=0.9)
    settings = CONFIGS[name]
    scheduler = None if name == "constant" else DistributedReduceLROnPlateau(
        optimizer, factor=0.5, patience=3, min_lr=1e-4, backend="torch", **settings)
    per_step = "accumulation_size" in settings
    x, y = data["train"]
    mine = slice(rank, None, 2)  # this rank's half of the training images
    x_train, y_train = x[mine], y[mine]
    start = sum(VAL_SHARDS[:rank])
    x_val, y_val = (t[start:start + VAL_SHARDS[rank]] for t in data["val"])
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    loss_fn = torch.nn.functional.cross_entropy
    lrs = []
    for _ in range(epochs):
        ddp.train()
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(order), BATCH):
            batch = order[i:i + BATCH]
            loss = loss_fn(ddp(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if per_step and scheduler is not None:
                scheduler.step(loss.item(), weight=len(batch))
        if scheduler is not None and not per_step:
            ddp.eval()
            with torch.no_grad():
                scheduler.step(loss_fn(model(x_val), y_val).item(), weight=len(y_val))
        lrs.append(optimizer.param_groups[0]["lr"])
    model.eval()
    with torch.no_grad():
        logits = model(data["test"][0])
        test_loss = loss_fn(logits, data["test"][1]).item()
        accuracy = (logits.argmax(1) == data["test"][1]).float().mean().item()
    cuts = [epoch for epoch, (before, after) in enumerate(zip([lr, *lrs], lrs), 1) if after < before]
    return {"test_loss": test_loss, "accuracy": accuracy, "reductions": len(cuts),
            "first_cut": cuts[0] if cuts else None, "lrs": lrs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--label-noise", type=float, default=0.0, help="share of training labels made random")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rank = dist.get_rank()
    assert dist.get_world_size() == 2, "bench/noisy_worker.py runs on 2 ranks"
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    for seed in args.seeds:
        data = split(seed, args.label_noise)
        for name in CONFIGS:  # every configuration of a seed in turn, from the same start
            result = run(name, seed, data, args.epochs, args.lr, rank)
            both: list[Any] = [None, None]
            dist.all_gather_object(both, result["lrs"])
            assert both[0] == both[1], f"{name}, seed {seed}: the ranks' learning rates differ"
            assert math.isfinite(result["test_loss"])
            results[name].append({"seed": seed, **result})
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"epochs": args.epochs, "lr": args.lr, "label_noise": args.label_noise, "results": results},
                      f, indent=1)
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # as bench/ranks.py: torch 2.13's gloo threads may abort interpreter shutdown


if __name__ == "__main__":
    main()
