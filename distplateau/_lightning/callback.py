"""The callback that makes ``DistributedReduceLROnPlateau`` a one-class swap under Lightning,
written once for both Lightning packages.

Lightning steps a plateau scheduler with ``scheduler.step(trainer.callback_metrics[monitor])``
on each rank on its own. This callback adds what only the trainer knows: each rank's
number of validation samples (the weight that makes ``reduction="mean"`` the exact
global mean), the scheduler's own ``monitor`` (for ``LightningCLI``), and a guarantee that
every rank calls ``step`` when the monitored metric is missing on some ranks only.

:class:`PlateauCallbackBase` imports no Lightning package: ``distplateau.lightning`` and
``distplateau.pytorch_lightning`` each combine it with their package's ``Callback``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler

from .._decide import decide
from .._messages import ranks_text
from .._record import make_record
from ..scheduler import DistributedReduceLROnPlateau
from . import compat

# Lightning's class comes in through each package's subclass; to mypy it is Any.
_Callback: Any = object

__all__ = ["PlateauCallbackBase", "attach_monitor", "add_monitor_to_cli"]

_CHECKPOINT_KEY = "distplateau_pending_steps"


class PlateauCallbackBase(_Callback):
    """Keep every :class:`~distplateau.DistributedReduceLROnPlateau` of a ``Trainer`` in step
    on every rank, with each rank's number of validation samples as its weight.

    Attached to every ``Trainer`` automatically (entry points
    ``lightning.pytorch.callbacks_factory`` and ``pytorch_lightning.callbacks_factory``) when
    distplateau is pip-installed; pass one in ``Trainer(callbacks=[...])`` to change its
    settings or where entry points are not installed, from the module of your package:
    ``distplateau.lightning`` for ``lightning.pytorch``, ``distplateau.pytorch_lightning`` for
    ``pytorch_lightning``. Only the first instance in ``trainer.callbacks`` acts. It does
    nothing unless a ``DistributedReduceLROnPlateau`` is configured. During ``fit`` it:

    * counts this rank's validation samples (``extract_batch_size`` of each validation
      batch, sanity check excluded) and sets them as the scheduler's
      ``default_weight`` before each plateau step, so that ``reduction="mean"`` of
      per-rank means logged without ``sync_dist`` is the exact mean over all samples,
      also on uneven shards;
    * stops the ``DistributedSampler`` that Lightning adds to each validation dataloader
      from padding the shards with repeated samples (when the dataset size is not divisible
      by the world size), so that every sample is validated exactly once and the mean is the
      mean over the dataset (``unpad_validation``);
    * accepts ``configure_optimizers`` returning a scheduler built with
      ``monitor="..."`` without a ``"monitor"`` key (what ``LightningCLI`` returns);
    * checks, in one extra all-gather of two numbers per rank and plateau step, which ranks
      have the monitored metric. On every rank: if all have it, Lightning steps as usual;
      if none has it, Lightning's own ``strict`` handling applies (an error, or a skipped
      step with ``strict=False``); if only some have it, ``strict=True`` raises
      ``MisconfigurationException`` naming the ranks (a rank that validated no sample is not
      counted as missing it), and ``strict=False`` steps with the others' metrics, the ranks
      without it contributing weight 0;
    * stops training on every rank, at the same epoch, once a scheduler built with
      ``stop_patience`` says :attr:`~distplateau.DistributedReduceLROnPlateau.should_stop`
      (``trainer.should_stop = True`` right after the plateau step, with no collective of its
      own: every rank holds the same scheduler state);
    * makes a run resumed from a checkpoint saved at the end of an epoch (by
      ``ModelCheckpoint``, before that epoch's plateau step) continue exactly as the
      uninterrupted run: at save time every rank's metric and weight for the pending step
      are gathered (one all-gather) into the checkpoint, and the resumed run takes that
      step when training starts, at any world size. Lightning alone skips it.

    Args:
        weight_by_samples (bool): use each rank's number of validation samples as its
            weight. With ``False`` every rank weighs 1. Default: ``True``.
        unpad_validation (bool): let each rank validate only its share of the dataset, so that
            shards differ by at most one sample instead of being padded with repeats. Only
            torch's own ``DistributedSampler`` (the one Lightning adds) without ``drop_last`` is
            changed, and only where every rank keeps at least one sample. Set ``False`` if your
            ``validation_step`` runs a collective of its own on every batch (e.g.
            ``self.log(..., on_step=True, sync_dist=True)``), which needs the same number of
            batches on every rank. Default: ``True``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from distplateau.lightning import DistributedPlateauCallback
        >>> trainer = Trainer(callbacks=[DistributedPlateauCallback(weight_by_samples=False)],
        ...                   logger=False, enable_progress_bar=False, enable_model_summary=False)
    """

    # What differs between the two Lightning packages; set by each package's subclass.
    misconfiguration_error: ClassVar[type[Exception]]

    @staticmethod
    def extract_batch_size(batch: Any) -> int:
        """The package's ``lightning.pytorch.utilities.data.extract_batch_size``."""
        raise NotImplementedError

    def __init__(self, weight_by_samples: bool = True, unpad_validation: bool = True) -> None:
        self.weight_by_samples = weight_by_samples
        self.unpad_validation = unpad_validation
        self._samples: int | None = None  # this rank's samples in the last validation run
        self._counting: int | None = None
        self._undo: list[Callable[[], None]] = []
        self._first = False  # the first instance in trainer.callbacks: the one that acts
        self._active = False  # ... and a DistributedReduceLROnPlateau is configured
        self._stepped_epoch = -1  # the last epoch whose plateau step Lightning reached
        self._pending: dict[str, Any] | None = None  # from a checkpoint, for on_train_start

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        callbacks = trainer.callbacks
        self._first = stage == "fit" and next(c for c in callbacks if isinstance(c, PlateauCallbackBase)) is self
        if not self._first:
            return
        self._samples = None
        self._stepped_epoch = -1
        configure = pl_module.configure_optimizers
        self._undo.append(compat.shadow(pl_module, "configure_optimizers", lambda: attach_monitor(configure())))

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # The strategy has configured the schedulers by now, and no validation has run.
        self._active = self._first and any(_ours(c) for c in trainer.lr_scheduler_configs)
        if not self._active:
            return
        compat.check(trainer)
        monitor_value = self._monitor_value
        self._undo.append(compat.on_monitor_lookup(trainer, lambda lookup, key: monitor_value(trainer, lookup, key)))
        step = pl_module.lr_scheduler_step  # the LightningModule hook that steps each scheduler

        def step_then_stop(scheduler: Any, metric: Any) -> None:
            step(scheduler, metric)
            _stop_if_asked(trainer, scheduler)

        self._undo.append(compat.shadow(pl_module, "lr_scheduler_step", step_then_stop))
        if self.unpad_validation:
            self._undo.append(compat.after_validation_data_setup(trainer, lambda: _stop_padding(trainer)))

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        while self._undo:
            self._undo.pop()()
        self._first = self._active = False

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        # Every rank runs this hook at the same point (only rank 0 writes the file).
        if not self._active or self._stepped_epoch == trainer.current_epoch:
            return
        if not compat.epoch_finished(trainer):
            return  # mid-epoch: the resumed run repeats the rest of the epoch and its step
        pending = {}
        for index, config in enumerate(trainer.lr_scheduler_configs):
            epoch_due = config.interval == "epoch" and (trainer.current_epoch + 1) % config.frequency == 0
            if not (_ours(config) and epoch_due and config.monitor):
                continue
            value = trainer.callback_metrics.get(config.monitor)
            weight = self._samples if self.weight_by_samples and self._samples is not None else 1
            row = [math.nan if value is None else float(value), float(weight), float(value is not None)]
            local = torch.tensor(row, dtype=torch.float64, device=trainer.strategy.root_device)
            table = trainer.strategy.all_gather(local).reshape(-1, 3).tolist()
            pending[str(index)] = {"epoch": trainer.current_epoch, "table": table, "strict": config.strict}
        if pending:
            checkpoint[_CHECKPOINT_KEY] = pending

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self._pending = checkpoint.get(_CHECKPOINT_KEY)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        pending, self._pending = self._pending, None
        if not self._active or not pending:
            return
        for index, step in pending.items():
            scheduler = trainer.lr_scheduler_configs[int(index)].scheduler
            if isinstance(scheduler, DistributedReduceLROnPlateau):
                _take_pending_step(scheduler, step["table"], trainer.global_rank)
                _stop_if_asked(trainer, scheduler)

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._counting = 0

    def on_validation_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        if self._counting is None:
            return
        try:
            self._counting += self.extract_batch_size(batch)
        except (self.misconfiguration_error, RecursionError):
            rank_zero_warn(
                "distplateau: cannot find the batch size of a validation batch, so every rank weighs 1 in "
                "DistributedReduceLROnPlateau; call scheduler.step(metric, weight=n) yourself for exact weights"
            )
            self._counting = None

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self._samples = self._counting

    def _monitor_value(self, trainer: Any, lookup: Callable[[str], Any], key: str) -> Any:
        value = lookup(key)
        configs = [c for c in trainer.lr_scheduler_configs if c.monitor == key and _ours(c)]
        if not configs:
            return value
        self._stepped_epoch = trainer.current_epoch
        weight = self._samples if self.weight_by_samples else None
        if trainer.world_size > 1:
            # Lightning is about to step on every rank or skip on every rank, at the same point:
            # every rank takes part in this all-gather, so the ranks learn who has the metric.
            samples = -1.0 if self._samples is None else float(self._samples)
            mine = torch.tensor([float(value is not None), samples], device=trainer.strategy.root_device)  # NCCL: GPU
            table = trainer.strategy.all_gather(mine).cpu().reshape(-1, 2).tolist()
            without = [rank for rank, (has, _) in enumerate(table) if not has]
            if without and len(without) < len(table):
                missing = [rank for rank in without if table[rank][1] != 0]  # a rank with no sample has nothing
                if missing and any(c.strict for c in configs):
                    raise self.misconfiguration_error(
                        f"DistributedReduceLROnPlateau monitors {key!r}, which is missing on "
                        f"{ranks_text(missing)} but present on "
                        "the others. Log it on every rank, or set \"strict\": False in the lr_scheduler config to "
                        "let the ranks without it contribute nothing to the step."
                    )
                if value is None:
                    value, weight = math.nan, 0
        for config in configs:
            config.scheduler.default_weight = weight
        return value


def _ours(config: Any) -> bool:
    return isinstance(config.scheduler, DistributedReduceLROnPlateau)


def _stop_if_asked(trainer: Any, scheduler: Any) -> None:
    if isinstance(scheduler, DistributedReduceLROnPlateau) and scheduler.should_stop and not trainer.should_stop:
        trainer.should_stop = True
        rank_zero_info(
            f"distplateau: no improvement of the global metric in the last {scheduler.steps_since_best} plateau "
            f"steps (stop_patience={scheduler.stop_patience}); best {scheduler.best}. Stopping on every rank."
        )


def _dataloaders(loaders: Any) -> list[Any]:
    """The dataloaders in ``trainer.val_dataloaders``: one, or a list, tuple or dict of them."""
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return [d for item in loaders for d in _dataloaders(item)]
    return [loaders] if isinstance(loaders, DataLoader) else []


def _stop_padding(trainer: Any) -> None:
    """Make each validation ``DistributedSampler`` (torch's own class, without ``drop_last``)
    yield only this rank's share of the dataset, ``len(range(rank, n, world_size))`` samples,
    instead of padding every shard to the same length with repeated samples: what Lightning's
    ``UnrepeatedDistributedSampler`` does for prediction. The shards may then differ by one
    sample; the sample counts weigh the ranks. A dataset smaller than the world stays padded:
    a rank without a sample would log nothing, and ``sync_dist`` would wait for it."""
    for loader in _dataloaders(trainer.val_dataloaders):
        sampler = loader.sampler
        if type(sampler) is not DistributedSampler or sampler.drop_last:
            continue
        size = len(sampler.dataset)  # type: ignore[arg-type]
        if size < sampler.num_replicas:
            continue
        sampler.total_size = size
        sampler.num_samples = len(range(sampler.rank, size, sampler.num_replicas))


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


def add_monitor_to_cli(cli_class: Any) -> None:
    """Make ``cli_class.configure_optimizers`` (``LightningCLI``'s, which adds a ``monitor`` only
    for Lightning's own ``ReduceLROnPlateau``) return a
    :class:`~distplateau.DistributedReduceLROnPlateau` built with a ``monitor`` the way it
    returns Lightning's, ``{"optimizer": ..., "lr_scheduler": {"scheduler": ..., "monitor": ...}}``,
    so that the model's ``configure_optimizers()`` carries it in and out of ``fit``. A subclass
    that overrides ``configure_optimizers`` keeps its own."""
    configure = cli_class.__dict__["configure_optimizers"].__func__
    if getattr(configure, "_distplateau", False):
        return

    def configure_optimizers(lightning_module: Any, optimizer: Any, lr_scheduler: Any = None) -> Any:
        monitor = _monitor_of(lr_scheduler)
        if monitor is None:
            return configure(lightning_module, optimizer, lr_scheduler)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "monitor": monitor}}

    configure_optimizers.__doc__ = configure.__doc__
    configure_optimizers._distplateau = True  # type: ignore[attr-defined]
    cli_class.configure_optimizers = staticmethod(configure_optimizers)


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
