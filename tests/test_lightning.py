"""distplateau.lightning and distplateau.pytorch_lightning in one process: imports,
registration, the entry points, the monitor hook, LightningCLI in and out of ``fit``.

Every test that takes ``pl`` runs once per Lightning package (tests/conftest.py).
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings
from types import ModuleType
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from distplateau import DistributedReduceLROnPlateau

from .conftest import DISTPLATEAU_MODULE


@pytest.fixture(scope="module")
def pl(lightning_package: str) -> ModuleType:
    return importlib.import_module(lightning_package)


@pytest.fixture(scope="module")
def dp(lightning_package: str) -> ModuleType:
    return importlib.import_module(DISTPLATEAU_MODULE[lightning_package])


def test_importing_distplateau_imports_no_lightning_package() -> None:
    code = "import sys, distplateau; assert not {'lightning', 'pytorch_lightning', 'horovod'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_each_module_imports_its_own_lightning_package_only(lightning_package: str) -> None:
    other = _other(lightning_package)
    code = (f"import sys, {DISTPLATEAU_MODULE[lightning_package]}; assert {lightning_package!r} in sys.modules; "
            f"assert {other!r} not in sys.modules; assert 'horovod' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _other(lightning_package: str) -> str:
    return "pytorch_lightning" if lightning_package == "lightning.pytorch" else "lightning.pytorch"


def _trainer_error(pl_name: str, strategy: str, more: str = "") -> str:
    """Code that builds ``{pl_name}.Trainer(strategy=...)`` (``more``: further arguments) and
    prints ``ValueError``'s message."""
    return (f"import {pl_name} as pl\n"
            f"try:\n    pl.Trainer(strategy={strategy}, accelerator='cpu', logger=False{more})\n"
            "except ValueError as err:\n    print('ValueError:', err)\nelse:\n    print('no error')\n")


def test_strategy_horovod_works_after_the_other_packages_module_when_the_package_came_first(
        lightning_package: str) -> None:
    # The snippet copied across package names: `import pytorch_lightning as pl; import distplateau.lightning`.
    mine, other = DISTPLATEAU_MODULE[lightning_package], DISTPLATEAU_MODULE[_other(lightning_package)]
    code = (f"import sys, {lightning_package} as pl, {other}\n"
            f"assert {mine!r} in sys.modules\n"
            "trainer = pl.Trainer(strategy='horovod', accelerator='cpu', logger=False, enable_progress_bar=False)\n"
            f"assert type(trainer.strategy) is sys.modules[{mine!r}].HorovodStrategy, type(trainer.strategy)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=180)


def test_num_nodes_that_contradicts_horovodrun_is_refused_and_the_default_is_the_host_count() -> None:
    pytest.importorskip("lightning")
    code = ("import lightning.pytorch as pl, distplateau.lightning\n"
            "trainer = pl.Trainer(strategy='horovod', accelerator='cpu', logger=False)\n"
            "assert (trainer.num_nodes, trainer.node_rank) == (1, 0), (trainer.num_nodes, trainer.node_rank)\n"
            + _trainer_error("lightning.pytorch", "'horovod'", ", num_nodes=2"))
    out = subprocess.run([sys.executable, "-c", code], check=True, timeout=180, capture_output=True, text=True).stdout
    assert ("ValueError: Trainer(num_nodes=2) but horovodrun started 1 rank on 1 node; leave num_nodes out "
            "with strategy='horovod' (horovodrun -H decides)") in out, out


def test_a_package_imported_after_the_other_packages_module_rejects_horovod_with_lightnings_error(
        lightning_package: str) -> None:
    # Pins the documented limit (docs/troubleshooting.md): nothing of ours runs between the import
    # of the package and its Trainer's check of the strategy name.
    other = DISTPLATEAU_MODULE[_other(lightning_package)]
    code = f"import {other}\n" + _trainer_error(lightning_package, "'horovod'")
    out = subprocess.run([sys.executable, "-c", code], check=True, timeout=180, capture_output=True, text=True).stdout
    assert "ValueError: You selected an invalid strategy name: `strategy='horovod'`" in out, out


def test_a_strategy_object_of_the_other_package_is_rejected_naming_the_class_to_use(lightning_package: str) -> None:
    mine, other = DISTPLATEAU_MODULE[lightning_package], DISTPLATEAU_MODULE[_other(lightning_package)]
    code = f"import {other}\n" + _trainer_error(lightning_package, f"{other}.HorovodStrategy()")
    out = subprocess.run([sys.executable, "-c", code], check=True, timeout=180, capture_output=True, text=True).stdout
    assert (f"`strategy=<{other}.HorovodStrategy, for {_other(lightning_package)}; a {lightning_package} Trainer "
            f"needs {mine}.HorovodStrategy>`") in out, out


def test_strategy_horovod_is_registered_with_the_packages_own_strategy_class(pl: ModuleType, dp: ModuleType) -> None:
    assert pl.strategies.StrategyRegistry["horovod"]["strategy"] is dp.HorovodStrategy
    assert issubclass(dp.HorovodStrategy, pl.strategies.Strategy)
    assert issubclass(dp.DistributedPlateauCallback, pl.callbacks.Callback)


class _Horovod:
    """What ``_node_layout`` asks of ``horovod.torch``, on a job whose ranks have these local ranks."""

    def __init__(self, local_ranks: list[int], rank: int) -> None:
        self.local_ranks, self.this = local_ranks, rank

    def allgather(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        return torch.tensor(self.local_ranks)

    def local_rank(self) -> int:
        return self.local_ranks[self.this]

    def rank(self) -> int:
        return self.this


@pytest.mark.parametrize("local_ranks,layout", [
    ([0, 0, 1], [(0, 2), (1, 2), (1, 2)]),  # -H a:1,b:2 (hvd.cross_rank() of rank 2 is 0)
    ([0, 1, 0, 1], [(0, 2), (0, 2), (1, 2), (1, 2)]),
    ([0, 1, 2, 0, 0, 1], [(0, 3), (0, 3), (0, 3), (1, 3), (2, 3), (2, 3)]),
    ([0], [(0, 1)]),
])
def test_horovod_node_rank_counts_hosts_in_rank_order_whatever_their_slots(local_ranks: list[int],
                                                                          layout: list[tuple[int, int]]) -> None:
    from distplateau._lightning.horovod import _node_layout

    assert [_node_layout(_Horovod(local_ranks, rank)) for rank in range(len(local_ranks))] == layout


def test_horovod_ranks_not_placed_host_by_host_raise_naming_the_layout() -> None:
    from distplateau._lightning.horovod import _node_layout

    with pytest.raises(RuntimeError, match=r"on Horovod rank 3: the ranks are not placed host by host \(local rank "
                                           r"of each rank: \[0, 0, 1, 1\]\)"):
        _node_layout(_Horovod([0, 0, 1, 1], 3))


def test_every_trainer_gets_the_callback_of_its_package_from_the_entry_point(pl: ModuleType, dp: ModuleType,
                                                                             tmp_path: Any) -> None:
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    ours = [c for c in trainer.callbacks if "DistributedPlateauCallback" in type(c).__name__]
    assert [type(c) for c in ours] == [dp.DistributedPlateauCallback]


def test_an_explicit_callback_is_the_one_that_acts(pl: ModuleType, dp: ModuleType, tmp_path: Any) -> None:
    mine = dp.DistributedPlateauCallback(weight_by_samples=False)
    trainer = pl.Trainer(callbacks=[mine], logger=False, enable_progress_bar=False, default_root_dir=tmp_path,
                         max_epochs=1, num_sanity_val_steps=0, enable_checkpointing=False)
    trainer.fit(cli_model(pl)(scheduler=True))
    assert trainer.callbacks.index(mine) < trainer.callbacks.index(
        next(c for c in trainer.callbacks if isinstance(c, dp.DistributedPlateauCallback) and c is not mine))
    assert trainer.lr_scheduler_configs[0].scheduler.last_global_metric == 1.0


def _scheduler(monitor: str | None = "val_loss") -> DistributedReduceLROnPlateau:
    opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
    return DistributedReduceLROnPlateau(opt, monitor=monitor)


def test_attach_monitor_fills_in_the_schedulers_monitor_in_every_form(dp: ModuleType) -> None:
    sched = _scheduler()
    opt = sched.optimizer
    assert dp.attach_monitor(([opt], [sched])) == ([opt], [{"scheduler": sched, "monitor": "val_loss"}])
    # One scheduler or lr_scheduler dict in the second place, as darts returns it
    assert dp.attach_monitor(([opt], sched)) == ([opt], {"scheduler": sched, "monitor": "val_loss"})
    assert dp.attach_monitor(([opt], {"scheduler": sched})) == ([opt], {"scheduler": sched, "monitor": "val_loss"})
    assert dp.attach_monitor({"optimizer": opt, "lr_scheduler": sched}) == {
        "optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss"}}
    assert dp.attach_monitor([{"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}]) == [
        {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch", "monitor": "val_loss"}}]


def test_attach_monitor_leaves_explicit_monitors_and_other_schedulers_alone(dp: ModuleType) -> None:
    sched = _scheduler()
    opt = sched.optimizer
    explicit = {"optimizer": opt, "lr_scheduler": sched, "monitor": "train_loss"}
    assert dp.attach_monitor(explicit) is explicit
    inner = {"scheduler": sched, "monitor": "train_loss"}
    assert dp.attach_monitor(([opt], [inner])) == ([opt], [inner])
    no_monitor = _scheduler(monitor=None)
    assert dp.attach_monitor(([opt], [no_monitor])) == ([opt], [no_monitor])
    assert dp.attach_monitor(opt) is opt


def test_monitor_is_not_state_and_default_weight_is_not_saved() -> None:
    sched = _scheduler()
    sched.default_weight = 7
    assert "default_weight" not in sched.state_dict()
    assert sched.state_dict()["monitor"] == "val_loss"


def cli_model(pl: ModuleType) -> Any:
    class CliModel(pl.LightningModule):
        def __init__(self, scheduler: bool = False) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)
            self.scheduler = scheduler

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.layer(batch[0]).pow(2).mean()

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val_loss", torch.tensor(1.0))

        def train_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(torch.ones(4, 2)), batch_size=2)

        def val_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(torch.ones(4, 2)), batch_size=2)

        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            return [opt], [DistributedReduceLROnPlateau(opt, monitor="val_loss")] if self.scheduler else [opt]

    return CliModel


def _cli_args(tmp_path: Any) -> list[str]:
    return ["--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.1",
            "--lr_scheduler", "distplateau.DistributedReduceLROnPlateau", "--lr_scheduler.monitor", "val_loss",
            "--lr_scheduler.patience", "0", "--trainer.max_epochs", "3", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_checkpointing", "false"]


def test_lightning_cli_fit_takes_the_scheduler_with_its_monitor(pl: ModuleType, dp: ModuleType, tmp_path: Any) -> None:
    cli = pl.cli.LightningCLI(cli_model(pl), save_config_callback=None, args=["fit", *_cli_args(tmp_path)])
    config = cli.trainer.lr_scheduler_configs[0]
    assert isinstance(config.scheduler, DistributedReduceLROnPlateau)
    assert config.monitor == "val_loss" and config.reduce_on_plateau
    assert config.scheduler.last_epoch == 3 and config.scheduler.last_global_metric == 1.0
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.1 * 0.1)


def test_lightning_cli_configure_optimizers_carries_the_monitor_outside_fit(pl: ModuleType, dp: ModuleType,
                                                                           tmp_path: Any) -> None:
    # As Lightning's own CLI tests do: build the CLI without running, then call the model's hook.
    cli = pl.cli.LightningCLI(cli_model(pl), save_config_callback=None, run=False, args=_cli_args(tmp_path))
    conf = cli.model.configure_optimizers()
    assert isinstance(conf, dict) and isinstance(conf["lr_scheduler"]["scheduler"], DistributedReduceLROnPlateau)
    assert conf["lr_scheduler"]["monitor"] == "val_loss"
    assert conf["optimizer"] is conf["lr_scheduler"]["scheduler"].optimizer


def test_lightning_cli_still_returns_other_schedulers_as_lightning_does(pl: ModuleType, dp: ModuleType,
                                                                        tmp_path: Any) -> None:
    args = [a if a != "distplateau.DistributedReduceLROnPlateau" else "torch.optim.lr_scheduler.StepLR"
            for a in _cli_args(tmp_path)]
    args[args.index("--lr_scheduler.monitor"):args.index("--lr_scheduler.monitor") + 4] = ["--lr_scheduler.step_size",
                                                                                           "1"]
    cli = pl.cli.LightningCLI(cli_model(pl), save_config_callback=None, run=False, args=args)
    optimizers, schedulers = cli.model.configure_optimizers()
    assert isinstance(schedulers[0], torch.optim.lr_scheduler.StepLR)


# ------------------------------------------------------------------ which boundaries are plateau steps


def scripted_model(pl: ModuleType, values: list[float], scheduler: type = DistributedReduceLROnPlateau,
                   **lr_scheduler: Any) -> Any:
    """Logs ``values[k]`` as ``val_loss`` at the k-th validation run (sanity check excluded) and
    records each plateau step as (metric, learning rate after it)."""

    class Scripted(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.runs = 0
            self.steps: list[tuple[float, float]] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.layer(batch[0]).sum() * 0.0

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            pass

        def on_validation_epoch_end(self) -> None:
            if not self.trainer.sanity_checking:
                self.log("val_loss", float(values[self.runs]))
                self.runs += 1

        def lr_scheduler_step(self, sched: Any, metric: Any) -> None:
            super().lr_scheduler_step(sched, metric)
            self.steps.append((float(metric), sched.optimizer.param_groups[0]["lr"]))

        def train_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(torch.ones(8, 1)), batch_size=2)  # 4 batches an epoch

        def val_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(torch.ones(2, 1)), batch_size=2)

        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=1.0)
            sched = scheduler(opt, factor=0.5, patience=0, **lr_scheduler.pop("scheduler_kwargs", {}))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss", **lr_scheduler}}

    return Scripted()


def _fit(pl: ModuleType, model: Any, tmp_path: Any, epochs: int, **trainer_kwargs: Any) -> Any:
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path, **trainer_kwargs)
    trainer.fit(model)
    return trainer


def _torch_lrs(values: list[float], patience: int = 0) -> list[float]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=patience)
    lrs = []
    for value in values:
        sched.step(value)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_lightning_steps_torchs_scheduler_again_on_a_stale_value(pl: ModuleType, tmp_path: Any) -> None:
    # What the default does for the user: pinned, so that a Lightning release that fixes it shows here.
    model = scripted_model(pl, [9.0, 8.0, 7.0], torch.optim.lr_scheduler.ReduceLROnPlateau, strict=False)
    _fit(pl, model, tmp_path, epochs=6, check_val_every_n_epoch=2)
    assert [m for m, _ in model.steps] == [9.0, 9.0, 8.0, 8.0, 7.0], f"Lightning {pl.__version__} changed"
    assert model.steps[-1][1] == 0.25  # two cuts for a metric that improved at every validation


def test_a_fit_without_our_scheduler_never_reads_a_validation_batch(pl: ModuleType, tmp_path: Any) -> None:
    # Batches with no tensor: Lightning cannot infer their size. The callback counts validation
    # samples only for DistributedReduceLROnPlateau, so nothing warns here (neuralforecast's
    # batches made Lightning's "ambiguous collection" warning appear in fits with torch's class).
    model = scripted_model(pl, [9.0, 8.0], torch.optim.lr_scheduler.ReduceLROnPlateau)
    model.val_dataloader = lambda: DataLoader(["a", "b"], batch_size=2)  # type: ignore[method-assign]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _fit(pl, model, tmp_path, epochs=2)
    assert not [w for w in seen if "batch size" in str(w.message) or "batch_size" in str(w.message)]
    ours = scripted_model(pl, [9.0, 8.0])
    ours.val_dataloader = lambda: DataLoader(["a", "b"], batch_size=2)  # type: ignore[method-assign]
    with pytest.warns(UserWarning, match="distplateau: cannot find the batch size of a validation batch"):
        _fit(pl, ours, tmp_path, epochs=2)


def test_an_epoch_without_a_new_value_is_no_plateau_step_and_no_error(pl: ModuleType, tmp_path: Any) -> None:
    model = scripted_model(pl, [9.0, 8.0, 7.0])  # strict=True, Lightning's default
    trainer = _fit(pl, model, tmp_path, epochs=6, check_val_every_n_epoch=2)
    assert model.steps == [(9.0, 1.0), (8.0, 1.0), (7.0, 1.0)]
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert (sched.last_epoch, sched.num_bad_epochs, sched.best) == (3, 0, 7.0)


def test_a_metric_never_logged_still_raises_after_the_first_validation(pl: ModuleType, tmp_path: Any) -> None:
    model = scripted_model(pl, [9.0, 8.0])
    model.configure_optimizers = lambda: {  # type: ignore[method-assign]
        "optimizer": (opt := torch.optim.SGD(model.parameters(), lr=1.0)),
        "lr_scheduler": {"scheduler": DistributedReduceLROnPlateau(opt), "monitor": "val_los"}}
    with pytest.raises(pl.utilities.exceptions.MisconfigurationException, match="val_los which is not available"):
        _fit(pl, model, tmp_path, epochs=2)


def test_interval_validation_steps_once_after_each_validation_run(pl: ModuleType, tmp_path: Any) -> None:
    values = [5.0, 4.0, 4.0, 4.0, 3.0, 3.0, 3.0, 3.0, 2.0, 2.0, 2.0, 2.0]
    model = scripted_model(pl, values, interval="validation")
    trainer = _fit(pl, model, tmp_path, epochs=3, val_check_interval=0.25)
    assert model.runs == 12
    assert model.steps == list(zip(values, _torch_lrs(values)))
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 12


def test_interval_validation_comes_from_the_scheduler_and_frequency_counts_validation_runs(pl: ModuleType,
                                                                                          tmp_path: Any) -> None:
    values = [5.0, 4.0, 4.0, 4.0, 3.0, 3.0]
    model = scripted_model(pl, values, frequency=2, scheduler_kwargs={"interval": "validation"})
    _fit(pl, model, tmp_path, epochs=3, val_check_interval=0.5)
    assert model.steps == list(zip(values[1::2], _torch_lrs(values[1::2])))


def test_interval_validation_stops_at_the_step_that_decides_it(pl: ModuleType, tmp_path: Any) -> None:
    model = scripted_model(pl, [5.0, 4.0, 4.0, 4.0, 4.0, 4.0], interval="validation",
                           scheduler_kwargs={"stop_patience": 1})
    trainer = _fit(pl, model, tmp_path, epochs=3, val_check_interval=0.5)
    assert [m for m, _ in model.steps] == [5.0, 4.0, 4.0]
    assert trainer.should_stop and model.runs == 3
    assert trainer.global_step == 6  # mid-epoch: after 2 of the second epoch's 4 batches


@pytest.mark.parametrize("interval", ["epoch", "validation"])
def test_under_manual_optimization_only_the_module_steps_the_scheduler(pl: ModuleType, tmp_path: Any,
                                                                       interval: str) -> None:
    # A module that optimizes by hand steps its schedulers itself (nequip's ConFIG training module
    # does); Lightning then steps none, and the callback must not step ours either.
    values = [5.0, 4.0, 4.0, 4.0]

    class Manual(type(scripted_model(pl, values))):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> None:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(self.layer(batch[0]).sum() * 0.0)
            opt.step()

        def on_validation_epoch_end(self) -> None:
            if not self.trainer.sanity_checking:
                self.log("val_loss", values[self.runs])
                self.lr_schedulers().step(values[self.runs])
                self.runs += 1

    model = Manual()
    model.configure_optimizers = lambda: {  # type: ignore[method-assign]
        "optimizer": (opt := torch.optim.SGD(model.parameters(), lr=1.0)),
        "lr_scheduler": {"scheduler": DistributedReduceLROnPlateau(opt, factor=0.5, patience=0),
                         "monitor": "val_loss", "interval": interval}}
    trainer = _fit(pl, model, tmp_path, epochs=4)
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert (sched.last_epoch, sched.optimizer.param_groups[0]["lr"]) == (4, _torch_lrs(values)[-1])


def test_interval_validation_with_torchs_scheduler_names_ours(pl: ModuleType, tmp_path: Any) -> None:
    model = scripted_model(pl, [5.0], torch.optim.lr_scheduler.ReduceLROnPlateau, interval="validation")
    with pytest.raises(pl.utilities.exceptions.MisconfigurationException,
                       match='"interval": "validation" .* only distplateau.DistributedReduceLROnPlateau does'):
        _fit(pl, model, tmp_path, epochs=1)


def test_lightning_cli_carries_the_validation_interval(pl: ModuleType, dp: ModuleType, tmp_path: Any) -> None:
    args = [*_cli_args(tmp_path), "--lr_scheduler.interval", "validation", "--trainer.val_check_interval", "0.5"]
    cli = pl.cli.LightningCLI(cli_model(pl), save_config_callback=None, args=["fit", *args])
    sched = cli.trainer.lr_scheduler_configs[0].scheduler
    assert sched.interval == "validation"
    assert sched.last_epoch == 6  # two validation runs in each of 3 epochs
    conf = cli.model.configure_optimizers()
    assert conf["lr_scheduler"]["interval"] == "validation"
