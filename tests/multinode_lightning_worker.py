"""One rank of a Lightning fit spread over several "hosts" (``tests/netns.py``).

    torchrun --nnodes 2 --nproc-per-node 2 ... tests/multinode_lightning_worker.py ddp OUT --num-nodes 2 --devices 2
    horovodrun -np 4 -H A:2,B:2 --gloo ... python tests/multinode_lightning_worker.py horovod OUT
    ... OUT2 --ckpt OUT/ckpt/epoch=2.ckpt       # resume that run's checkpoint, at another node count

``DISTPLATEAU_LIGHTNING_PACKAGE`` names the Lightning package (``lightning.pytorch``, default, or
``pytorch_lightning``). One fit of :data:`EPOCHS` epochs, ``ModelCheckpoint`` every epoch, the
scheduler swapped for ``DistributedReduceLROnPlateau``; Lightning adds the validation
``DistributedSampler``, distplateau's callback (attached through its entry point) weighs each rank
by its sample count. The validation loss of sample ``i`` at epoch ``e`` is ``GLOBAL[e] +
OFFSET[i % 4]``: 10 samples make uneven shards (3, 3, 2, 2 on 4 ranks; 5, 5 on 2), the offsets
cancel over the dataset, so the exact global mean is ``GLOBAL[e]`` at every world size while a
mean of the ranks' means is not (every value and every mean is exact in float32).

Each rank writes ``OUT/rank{r}.json``: where Lightning thinks it runs (global, local and node
rank, world size, cluster environment, hostname), the learning rate and global metric after each
epoch's plateau step, the scheduler state restored at the start and at the end, the weights.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from tests.lightning_checks import DISTPLATEAU_MODULE

GLOBAL = [2.0, 1.5, 1.5, 1.5, 1.0, 1.0]
OFFSET = [1.0, 0.0, -0.25, -1.25]  # by sample index mod 4; 3 * 1.0 + 3 * 0 + 2 * -0.25 + 2 * -1.25 = 0
VALIDATION = 10
EPOCHS = len(GLOBAL)
LR0 = 0.1
KWARGS: dict[str, Any] = {"factor": 0.5, "patience": 1}


def expected_lrs() -> list[float]:
    """The learning rate after each epoch's plateau step: torch's own scheduler on ``GLOBAL``."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **KWARGS)
    lrs = []
    for value in GLOBAL:
        sched.step(value)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("strategy", choices=["ddp", "horovod"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--ckpt", default=None)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", ".*(does not have many workers|GPU available|TPU available|sync_dist).*")

    package = os.environ.get("DISTPLATEAU_LIGHTNING_PACKAGE", "lightning.pytorch")
    pl: Any = importlib.import_module(package)
    importlib.import_module(DISTPLATEAU_MODULE[package])  # registers strategy="horovod"
    from distplateau import DistributedReduceLROnPlateau

    class Values(Dataset):
        """Read in this process at validation time: the module's epoch is the current one."""

        def __init__(self, module: Any) -> None:
            self.module = module

        def __len__(self) -> int:
            return VALIDATION

        def __getitem__(self, i: int) -> torch.Tensor:
            return torch.tensor(GLOBAL[self.module.current_epoch] + OFFSET[i % 4])

    class Model(pl.LightningModule):  # type: ignore[name-defined]
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.layer = torch.nn.Linear(3, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self.layer(x).squeeze(-1), y)

        def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
            self.log("val_loss", batch.mean(), batch_size=len(batch))

        def train_dataloader(self) -> DataLoader:
            gen = torch.Generator().manual_seed(0)
            x = torch.rand(16, 3, generator=gen)
            return DataLoader(TensorDataset(x, x @ torch.tensor([1.0, -2.0, 0.5]) + 0.25), batch_size=2)

        def val_dataloader(self) -> DataLoader:
            return DataLoader(Values(self), batch_size=2)

        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=LR0)
            sched = DistributedReduceLROnPlateau(opt, **KWARGS)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss"}}

    record: dict[str, Any] = {"hostname": socket.gethostname(), "package": f"{package} {pl.__version__}",
                              "lrs": [], "globals": []}

    class Record(pl.Callback):  # type: ignore[name-defined]
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            strategy = trainer.strategy
            env = getattr(strategy, "cluster_environment", None)
            record.update(global_rank=trainer.global_rank, local_rank=trainer.local_rank,
                          node_rank=trainer.node_rank, world_size=trainer.world_size, num_nodes=trainer.num_nodes,
                          strategy=f"{type(strategy).__module__}.{type(strategy).__name__}",
                          cluster_environment=type(env).__name__ if env is not None else None,
                          restored=_plain(trainer.lr_scheduler_configs[0].scheduler.state_dict()))

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            if trainer.current_epoch > 0:
                self._after_step(trainer)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self._after_step(trainer)

        def _after_step(self, trainer: Any) -> None:
            # called once per epoch, after the previous epoch's plateau step
            sched = trainer.lr_scheduler_configs[0].scheduler
            record["lrs"].append(float(trainer.optimizers[0].param_groups[0]["lr"]))
            record["globals"].append(sched.last_global_metric)

    trainer = pl.Trainer(
        strategy=args.strategy, accelerator="cpu", devices=args.devices, num_nodes=args.num_nodes,
        max_epochs=args.epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=str(args.out / "run"),
        callbacks=[Record(), pl.callbacks.ModelCheckpoint(dirpath=str(args.out / "ckpt"), save_top_k=-1,
                                                          every_n_epochs=1, filename="{epoch}")],
    )
    try:
        trainer.fit(Model(), ckpt_path=args.ckpt)
        record["state"] = _plain(trainer.lr_scheduler_configs[0].scheduler.state_dict())
        record["state"]["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        record["weights"] = {k: v.tolist() for k, v in trainer.lightning_module.state_dict().items()}
    except Exception:  # noqa: BLE001
        record["error"] = traceback.format_exc()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{record.get('global_rank', os.environ.get('RANK', 'x'))}.json").write_text(
        json.dumps(record, indent=1, default=repr))


def _plain(state: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, type(None), list)) else repr(v)) for k, v in state.items()}


if __name__ == "__main__":
    main()
