"""The callback that makes ``DistributedReduceLROnPlateau`` a one-class swap under Lightning.

Lightning steps a plateau scheduler with ``scheduler.step(trainer.callback_metrics[monitor])``
on each rank on its own. This callback adds what only the trainer knows: each rank's
number of validation samples (the weight that makes ``reduction="mean"`` the exact
global mean), the scheduler's own ``monitor`` (for ``LightningCLI``), and a guarantee that
every rank calls ``step`` when the monitored metric is missing on some ranks only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ..decide import decide
from ..record import make_record
from ..scheduler import DistributedReduceLROnPlateau

__all__ = ["DistributedPlateauCallback", "attach_monitor"]

_CHECKPOINT_KEY = "distplateau_pending_steps"


class DistributedPlateauCallback(Callback):
    """Keep every :class:`~distplateau.DistributedReduceLROnPlateau` of a ``Trainer`` in step
    on every rank, with each rank's number of validation samples as its weight.

    Attached to every ``Trainer`` automatically (entry point
    ``lightning.pytorch.callbacks_factory``) when distplateau is pip-installed; pass one in
    ``Trainer(callbacks=[...])`` to change its settings or where entry points are not
    installed. Only the first instance in ``trainer.callbacks`` acts. It does nothing for
    other schedulers. During ``fit`` it:

    * counts this rank's validation samples (``extract_batch_size`` of each validation
      batch, sanity check excluded) and sets them as the scheduler's
      ``default_weight`` before each plateau step, so that ``reduction="mean"`` of
      per-rank means logged without ``sync_dist`` is the exact mean over all samples,
      also on uneven shards;
    * accepts ``configure_optimizers`` returning a scheduler built with
      ``monitor="..."`` without a ``"monitor"`` key (what ``LightningCLI`` returns);
    * checks, in one extra all-gather of one number per rank and plateau step, which ranks
      have the monitored metric. On every rank: if all have it, Lightning steps as usual;
      if none has it, Lightning's own ``strict`` handling applies (an error, or a skipped
      step with ``strict=False``); if only some have it, ``strict=True`` raises
      ``MisconfigurationException`` naming the ranks, and ``strict=False`` steps with the
      others' metrics, the ranks without it contributing weight 0;
    * makes a run resumed from a checkpoint saved at the end of an epoch (by
      ``ModelCheckpoint``, before that epoch's plateau step) continue exactly as the
      uninterrupted run: at save time every rank's metric and weight for the pending step
      are gathered (one all-gather) into the checkpoint, and the resumed run takes that
      step when training starts, at any world size. Lightning alone skips it.

    Args:
        weight_by_samples (bool): use each rank's number of validation samples as its
            weight. With ``False`` every rank weighs 1. Default: ``True``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from distplateau.lightning import DistributedPlateauCallback
        >>> trainer = Trainer(callbacks=[DistributedPlateauCallback(weight_by_samples=False)],
        ...                   logger=False, enable_progress_bar=False, enable_model_summary=False)
    """

    def __init__(self, weight_by_samples: bool = True) -> None:
        self.weight_by_samples = weight_by_samples
        self._samples: int | None = None  # this rank's samples in the last validation run
        self._counting: int | None = None
        self._undo: list[Callable[[], None]] = []
        self._active = False
        self._stepped_epoch = -1  # the last epoch whose plateau step Lightning reached
        self._pending: dict[str, Any] | None = None  # from a checkpoint, for on_train_start

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
        if stage != "fit" or next(c for c in callbacks if isinstance(c, DistributedPlateauCallback)) is not self:
            return
        self._active = True
        self._samples = None
        self._stepped_epoch = -1
        configure = pl_module.configure_optimizers
        self._patch(pl_module, "configure_optimizers", lambda: attach_monitor(configure()))
        epoch_loop = trainer.fit_loop.epoch_loop
        if not hasattr(epoch_loop, "_get_monitor_value"):
            rank_zero_warn(
                "distplateau: this Lightning version has no `_get_monitor_value`; a metric missing on some "
                "ranks only will not be detected and can leave the other ranks waiting in step()"
            )
            return
        get_value = epoch_loop._get_monitor_value
        self._patch(epoch_loop, "_get_monitor_value", lambda key: self._monitor_value(trainer, get_value, key))

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        while self._undo:
            self._undo.pop()()
        self._active = False

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Every rank runs this hook at the same point (only rank 0 writes the file).
        if not self._active or self._stepped_epoch == trainer.current_epoch:
            return
        if not trainer.fit_loop.epoch_loop._num_ready_batches_reached():
            return  # mid-epoch: the resumed run repeats the rest of the epoch and its step
        pending = {}
        for index, config in enumerate(trainer.lr_scheduler_configs):
            epoch_due = config.interval == "epoch" and (trainer.current_epoch + 1) % config.frequency == 0
            if not (isinstance(config.scheduler, DistributedReduceLROnPlateau) and epoch_due and config.monitor):
                continue
            value = trainer.callback_metrics.get(config.monitor)
            weight = self._samples if self.weight_by_samples and self._samples is not None else 1
            row = [math.nan if value is None else float(value), float(weight), float(value is not None)]
            local = torch.tensor(row, dtype=torch.float64, device=trainer.strategy.root_device)
            table = trainer.strategy.all_gather(local).reshape(-1, 3).tolist()
            pending[str(index)] = {"epoch": trainer.current_epoch, "table": table, "strict": config.strict}
        if pending:
            checkpoint[_CHECKPOINT_KEY] = pending

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._pending = checkpoint.get(_CHECKPOINT_KEY)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pending, self._pending = self._pending, None
        if not self._active or not pending:
            return
        for index, step in pending.items():
            scheduler = trainer.lr_scheduler_configs[int(index)].scheduler
            if not isinstance(scheduler, DistributedReduceLROnPlateau):
                continue
            _take_pending_step(scheduler, step["table"], trainer.global_rank)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._counting = 0

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._counting is None:
            return
        try:
            self._counting += extract_batch_size(batch)
        except (MisconfigurationException, RecursionError):
            rank_zero_warn(
                "distplateau: cannot find the batch size of a validation batch, so every rank weighs 1 in "
                "DistributedReduceLROnPlateau; call scheduler.step(metric, weight=n) yourself for exact weights"
            )
            self._counting = None

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._samples = self._counting

    def _patch(self, obj: Any, name: str, replacement: Callable[..., Any]) -> None:
        # An instance attribute shadows the method, as LightningCLI does for configure_optimizers.
        before = obj.__dict__.get(name)
        setattr(obj, name, replacement)
        self._undo.append(lambda: setattr(obj, name, before) if before is not None else obj.__dict__.pop(name, None))

    def _monitor_value(self, trainer: Trainer, get_value: Callable[[str], Any], key: str) -> Any:
        value = get_value(key)
        schedulers = [
            c.scheduler for c in trainer.lr_scheduler_configs
            if c.monitor == key and isinstance(c.scheduler, DistributedReduceLROnPlateau)
        ]
        strict = any(c.strict for c in trainer.lr_scheduler_configs if c.scheduler in schedulers)
        if not schedulers:
            return value
        self._stepped_epoch = trainer.current_epoch
        weight = self._samples if self.weight_by_samples else None
        if trainer.world_size > 1:
            # Lightning is about to step on every rank or skip on every rank, at the same point:
            # every rank takes part in this all-gather, so the ranks learn who has the metric.
            has = torch.tensor([float(value is not None)], device=trainer.strategy.root_device)  # NCCL: on the GPU
            flags = trainer.strategy.all_gather(has).cpu()
            missing = [rank for rank, flag in enumerate(flags.flatten().tolist()) if not flag]
            if missing and len(missing) < len(flags.flatten()):
                if strict:
                    raise MisconfigurationException(
                        f"DistributedReduceLROnPlateau monitors {key!r}, which is missing on "
                        f"{'rank' if len(missing) == 1 else 'ranks'} {', '.join(map(str, missing))} but present on "
                        "the others. Log it on every rank, or set \"strict\": False in the lr_scheduler config to "
                        "let the ranks without it contribute nothing to the step."
                    )
                if value is None:
                    value, weight = math.nan, 0
        for scheduler in schedulers:
            scheduler.default_weight = weight
        return value


def _take_pending_step(scheduler: DistributedReduceLROnPlateau, table: list[list[float]], rank: int) -> None:
    """Take the step an interrupted run was about to take, from its ranks' (value, weight,
    present) rows. The world size may have changed: every rank reduces the old rows the same
    way, then rank 0 alone contributes the result."""
    present = [(value, weight) for value, weight, has in table if has]
    if not present:
        return  # the metric was missing on every rank: Lightning skipped this step
    records = [make_record(value, weight, 0.0) for value, weight in present]
    decision = decide(records, reduction=scheduler.reduction, nan_policy=scheduler.nan_policy,
                      last_finite=scheduler.last_finite_metric)
    if decision.value is None:
        return
    if rank == 0:
        scheduler.step(decision.value, weight=1)
    else:
        scheduler.step(math.nan, weight=0)


def attach_monitor(optim_conf: Any) -> Any:
    """Add the ``monitor`` of each :class:`~distplateau.DistributedReduceLROnPlateau` built with
    one to the ``configure_optimizers`` output that lacks it; an explicit monitor wins.

    Handles the forms that carry schedulers: ``([optimizers], [schedulers])``, a dict with
    ``"lr_scheduler"``, and a list of such dicts. Anything else is returned as it is.

    Example:
        >>> import torch
        >>> from distplateau import DistributedReduceLROnPlateau
        >>> opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
        >>> sched = DistributedReduceLROnPlateau(opt, monitor="val_loss")
        >>> attach_monitor(([opt], [sched]))[1][0]["monitor"]
        'val_loss'
    """
    if isinstance(optim_conf, dict):
        return _attach_to_optimizer_dict(optim_conf)
    if isinstance(optim_conf, (list, tuple)):
        if len(optim_conf) == 2 and isinstance(optim_conf[0], list) and isinstance(optim_conf[1], list):
            pair = [optim_conf[0], [_attach_to_scheduler(s) for s in optim_conf[1]]]
            return tuple(pair) if isinstance(optim_conf, tuple) else pair
        if optim_conf and all(isinstance(d, dict) for d in optim_conf):
            dicts = [_attach_to_optimizer_dict(d) for d in optim_conf]
            return tuple(dicts) if isinstance(optim_conf, tuple) else dicts
    return optim_conf


def _monitor_of(scheduler: Any) -> str | None:
    return scheduler.monitor if isinstance(scheduler, DistributedReduceLROnPlateau) else None


def _attach_to_scheduler(scheduler: Any) -> Any:
    if isinstance(scheduler, dict):
        monitor = _monitor_of(scheduler.get("scheduler"))
        if monitor is not None and scheduler.get("monitor") is None:
            return {**scheduler, "monitor": monitor}
        return scheduler
    monitor = _monitor_of(scheduler)
    return scheduler if monitor is None else {"scheduler": scheduler, "monitor": monitor}


def _attach_to_optimizer_dict(conf: dict[str, Any]) -> dict[str, Any]:
    scheduler = conf.get("lr_scheduler")
    if scheduler is None or conf.get("monitor") is not None:
        return conf
    return {**conf, "lr_scheduler": _attach_to_scheduler(scheduler)}
