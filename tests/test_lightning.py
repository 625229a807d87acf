"""distplateau.lightning in one process: imports, registration, the monitor hook, LightningCLI."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from distplateau import DistributedReduceLROnPlateau

lightning = pytest.importorskip("lightning.pytorch")

from distplateau.lightning import DistributedPlateauCallback, HorovodStrategy, attach_monitor  # noqa: E402


def test_importing_distplateau_lightning_imports_lightning_but_not_horovod() -> None:
    code = ("import sys, distplateau; assert 'lightning' not in sys.modules; import distplateau.lightning; "
            "assert 'lightning' in sys.modules; assert 'horovod' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_strategy_horovod_is_registered() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    assert StrategyRegistry["horovod"]["strategy"] is HorovodStrategy


def test_every_trainer_gets_the_callback_from_the_entry_point(tmp_path: Any) -> None:
    trainer = lightning.Trainer(logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    assert sum(isinstance(c, DistributedPlateauCallback) for c in trainer.callbacks) == 1


def _scheduler(monitor: str | None = "val_loss") -> DistributedReduceLROnPlateau:
    opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
    return DistributedReduceLROnPlateau(opt, monitor=monitor)


def test_attach_monitor_fills_in_the_schedulers_monitor_in_every_form() -> None:
    sched = _scheduler()
    opt = sched.optimizer
    assert attach_monitor(([opt], [sched])) == ([opt], [{"scheduler": sched, "monitor": "val_loss"}])
    assert attach_monitor({"optimizer": opt, "lr_scheduler": sched}) == {
        "optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss"}}
    assert attach_monitor([{"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}]) == [
        {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch", "monitor": "val_loss"}}]


def test_attach_monitor_leaves_explicit_monitors_and_other_schedulers_alone() -> None:
    sched = _scheduler()
    opt = sched.optimizer
    explicit = {"optimizer": opt, "lr_scheduler": sched, "monitor": "train_loss"}
    assert attach_monitor(explicit) is explicit
    inner = {"scheduler": sched, "monitor": "train_loss"}
    assert attach_monitor(([opt], [inner])) == ([opt], [inner])
    no_monitor = _scheduler(monitor=None)
    assert attach_monitor(([opt], [no_monitor])) == ([opt], [no_monitor])
    assert attach_monitor(opt) is opt


def test_monitor_is_not_state_and_default_weight_is_not_saved() -> None:
    sched = _scheduler()
    sched.default_weight = 7
    assert "default_weight" not in sched.state_dict()
    assert sched.state_dict()["monitor"] == "val_loss"


class CliModel(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", torch.tensor(1.0))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.ones(4, 2)), batch_size=2)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.ones(4, 2)), batch_size=2)


def test_lightning_cli_takes_the_scheduler_with_its_monitor(tmp_path: Any) -> None:
    from lightning.pytorch.cli import LightningCLI

    cli = LightningCLI(CliModel, save_config_callback=None, args=[
        "fit", "--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.1",
        "--lr_scheduler", "distplateau.DistributedReduceLROnPlateau", "--lr_scheduler.monitor", "val_loss",
        "--lr_scheduler.patience", "0", "--trainer.max_epochs", "3", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.num_sanity_val_steps", "0", "--trainer.enable_checkpointing", "false",
    ])
    config = cli.trainer.lr_scheduler_configs[0]
    assert isinstance(config.scheduler, DistributedReduceLROnPlateau)
    assert config.monitor == "val_loss" and config.reduce_on_plateau
    assert config.scheduler.last_epoch == 3 and config.scheduler.last_global_metric == 1.0
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.1 * 0.1)
