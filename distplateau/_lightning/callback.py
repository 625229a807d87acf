"""The callback that makes ``DistributedReduceLROnPlateau`` a one-class swap under Lightning,
written once for both Lightning packages.

Lightning steps a plateau scheduler with ``scheduler.step(trainer.callback_metrics[monitor])``
on each rank on its own, at every epoch (or step) boundary, whether the value is new or not.
This callback adds what only the trainer knows: each rank's number of validation samples (the
weight that makes ``reduction="mean"`` the exact global mean), the scheduler's own ``monitor``
and ``interval`` (for ``LightningCLI``), and when a boundary is a plateau step at all. Every
plateau step goes through :meth:`PlateauCallbackBase._plateau_step`: a boundary without a new
value is none, and every rank calls ``step`` when the metric is missing on some ranks only.

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

from .._decide import MetricMissingError, decide
from .._messages import ranks_text
from .._record import Missing, make_record
from ..scheduler import DistributedReduceLROnPlateau
from . import compat

# Lightning's class comes in through each package's subclass; to mypy it is Any.
_Callback: Any = object

__all__ = ["PlateauCallbackBase", "attach_monitor", "add_monitor_to_cli"]

_CHECKPOINT_KEY = "distplateau_pending_steps"
_VALIDATIONS_KEY = "distplateau_validations"


class PlateauCallbackBase(_Callback):
    """Keep every :class:`~distplateau.DistributedReduceLROnPlateau` of a ``Trainer`` in step
    on every rank, with each rank's number of validation samples as its weight.

    Attached to every ``Trainer`` automatically (entry points
    ``lightning.pytorch.callbacks_factory`` and ``pytorch_lightning.callbacks_factory``) when
    distplateau is pip-installed; pass one in ``Trainer(callbacks=[...])`` to change its
    settings or where entry points are not installed, from the module of your package:
    ``distplateau.lightning`` for ``lightning.pytorch``, ``distplateau.pytorch_lightning`` for
    ``pytorch_lightning``. Only the first instance in ``trainer.callbacks`` acts. It does
    nothing unless a ``DistributedReduceLROnPlateau`` is configured, nor under manual
    optimization, where the module steps its schedulers itself. During ``fit`` it:

    * counts this rank's validation samples (``extract_batch_size`` of each validation
      batch, sanity check excluded) and sets them as the scheduler's
      ``default_weight`` before each plateau step, so that ``reduction="mean"`` of
      per-rank means logged without ``sync_dist`` is the exact mean over all samples,
      also on uneven shards (at ``"interval": "step"``, a value logged by a training step,
      not by the last validation run, weighs 1 on every rank: the loss of one batch, of the
      same size on every rank);
    * stops the ``DistributedSampler`` that Lightning adds to each validation dataloader
      from padding the shards with repeated samples (when the dataset size is not divisible
      by the world size), so that every sample is validated exactly once and the mean is the
      mean over the dataset (``unpad_validation``);
    * accepts ``configure_optimizers`` returning a scheduler built with
      ``monitor="..."`` (or ``interval="..."``) without that key (what ``LightningCLI`` returns);
    * steps the scheduler only on a value of the monitored metric logged since its last step:
      a boundary without one (an epoch without validation under ``check_val_every_n_epoch=2``)
      is no plateau step on any rank, with no collective and no error;
    * steps a scheduler configured with ``"interval": "validation"`` once right after each
      validation run of ``fit`` (``"frequency"`` counts runs), before ``ModelCheckpoint`` saves;
    * tells every rank which ranks have the monitored metric inside the plateau step's own
      collective (one per step): a rank without it steps with a "missing" weight. On every
      rank: if all have it, the step is as usual; if none has it (after a validation run),
      Lightning's own ``strict`` handling applies (its error, or no step with
      ``strict=False``); if only some have it, ``strict=True`` raises
      ``MisconfigurationException`` naming the ranks (a rank that validated no sample is not
      counted as missing it), and ``strict=False`` steps with the others' metrics, the ranks
      without it contributing nothing;
    * stops training on every rank, at the same epoch, once a scheduler built with
      ``stop_patience`` says :attr:`~distplateau.DistributedReduceLROnPlateau.should_stop`
      (``trainer.should_stop = True`` right after the plateau step, with no collective of its
      own: every rank holds the same scheduler state);
    * makes a run resumed from a checkpoint saved at the end of an epoch (by
      ``ModelCheckpoint``, before that epoch's plateau step) continue exactly as the
      uninterrupted run: at save time every rank's metric and weight for the pending step
      are gathered (one all-gather) into the checkpoint, and the resumed run takes that
      step when training starts, at any world size. Lightning alone skips it;
    * logs, after each plateau step, the values the step used to the trainer's own loggers
      (TensorBoard, CSV, W&B, MLflow, ...), on rank 0, at the step of the monitored metric's
      own points (``log_global``): ``<monitor>/global``, the global value, the same on every
      rank (where ``<monitor>`` logged without ``sync_dist`` is rank 0's own);
      ``<monitor>/smoothed`` with ``smoothing_factor``; ``<monitor>/best``; ``<monitor>/bad_steps``
      (``num_bad_epochs`` after the step, ``0`` after a cut); and
      ``<monitor>/steps_since_best`` with ``stop_patience``. From the scheduler's state, with no
      collective; through ``logger.log_metrics``, as Lightning's ``LearningRateMonitor`` does
      (a plateau step runs where ``self.log`` is not allowed).

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
        log_global (bool): log the values of each plateau step to the trainer's loggers (see
            above). Default: ``True``.

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

    def __init__(self, weight_by_samples: bool = True, unpad_validation: bool = True, log_global: bool = True) -> None:
        self.weight_by_samples = weight_by_samples
        self.unpad_validation = unpad_validation
        self.log_global = log_global
        self._samples: int | None = None  # this rank's samples in the last validation run
        self._counting: int | None = None
        self._undo: list[Callable[[], None]] = []
        self._first = False  # the first instance in trainer.callbacks: the one that acts
        self._active = False  # ... and a DistributedReduceLROnPlateau is configured
        self._stepped_epoch = -1  # the last epoch whose plateau step Lightning reached
        self._pending: dict[str, Any] | None = None  # from a checkpoint, for on_train_start
        self._validations = 0  # validation runs of this fit, sanity check excluded; in checkpoints
        self._validated_at: int | None = None  # the training batch (total_batch_idx) of the last one
        self._after_validation: set[int] = set()  # ids of the schedulers configured "interval": "validation"
        self._plateaus: dict[int, _Plateau] = {}  # by id of the scheduler, during fit
        self._module_step: Callable[[Any, Any], None] = lambda scheduler, metric: None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        callbacks = trainer.callbacks
        self._first = stage == "fit" and next(c for c in callbacks if isinstance(c, PlateauCallbackBase)) is self
        if not self._first:
            return
        self._samples = None
        self._stepped_epoch = -1
        self._validations, self._validated_at = 0, None
        self._after_validation = set()
        configure = pl_module.configure_optimizers
        self._undo.append(compat.shadow(pl_module, "configure_optimizers",
                                        lambda: self._take_validation_intervals(attach_monitor(configure()))))

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # The strategy has configured the schedulers by now, and no validation has run. Under manual
        # optimization the module steps its schedulers itself and Lightning drops their "monitor":
        # the callback leaves them alone too (nequip's ConFIG module steps its own).
        self._active = (self._first and pl_module.automatic_optimization
                        and any(_ours(c) for c in trainer.lr_scheduler_configs))
        if not self._active:
            return
        compat.check(trainer)
        self._plateaus = {id(c.scheduler): _Plateau(c, id(c.scheduler) in self._after_validation)
                          for c in trainer.lr_scheduler_configs if _ours(c)}
        monitor_value = self._monitor_value
        self._undo.append(compat.on_monitor_lookup(trainer, lambda lookup, key: monitor_value(trainer, lookup, key)))
        step = pl_module.lr_scheduler_step  # the LightningModule hook that steps each scheduler
        self._module_step = step

        def lightning_steps(scheduler: Any, metric: Any) -> None:
            plateau = self._plateaus.get(id(scheduler))
            if plateau is None:
                step(scheduler, metric)
            elif not plateau.after_validation:  # those step in on_validation_end, not when Lightning says
                if plateau.config.interval == "epoch":
                    self._stepped_epoch = trainer.current_epoch
                self._plateau_step(trainer, plateau, None if metric is _ABSENT else metric)

        self._undo.append(compat.shadow(pl_module, "lr_scheduler_step", lightning_steps))
        if self.unpad_validation:
            self._undo.append(compat.after_validation_data_setup(trainer, lambda: _stop_padding(trainer)))

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        while self._undo:
            self._undo.pop()()
        self._first = self._active = False
        self._plateaus = {}

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        # Every rank runs this hook at the same point (only rank 0 writes the file).
        if not self._active:
            return
        checkpoint[_VALIDATIONS_KEY] = {"runs": self._validations, "batch": self._validated_at}
        if self._stepped_epoch == trainer.current_epoch or not compat.epoch_finished(trainer):
            return  # mid-epoch: the resumed run repeats the rest of the epoch and its step
        pending = {}
        for index, config in enumerate(trainer.lr_scheduler_configs):
            plateau = self._plateaus.get(id(config.scheduler))
            epoch_due = config.interval == "epoch" and (trainer.current_epoch + 1) % config.frequency == 0
            if plateau is None or plateau.after_validation or not epoch_due:
                continue
            value = trainer.callback_metrics.get(config.monitor)
            if not self._fresh(plateau, value):
                continue  # the epoch's boundary will not step: nothing is pending
            weight = self._samples if self.weight_by_samples and self._samples is not None else 1
            row = [math.nan if value is None else float(value), float(weight), float(value is not None)]
            local = torch.tensor(row, dtype=torch.float64, device=trainer.strategy.root_device)
            table = trainer.strategy.all_gather(local).reshape(-1, 3).tolist()
            pending[str(index)] = {"epoch": trainer.current_epoch, "table": table, "strict": config.strict}
        if pending:
            checkpoint[_CHECKPOINT_KEY] = pending

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self._pending = checkpoint.get(_CHECKPOINT_KEY)
        validations = checkpoint.get(_VALIDATIONS_KEY, {})
        self._validations, self._validated_at = validations.get("runs", 0), validations.get("batch")

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        pending, self._pending = self._pending, None
        if not self._active:
            return
        for plateau in self._plateaus.values():
            plateau.validations = self._validations  # a missing metric is stale until the next validation
        for index, step in (pending or {}).items():
            scheduler = trainer.lr_scheduler_configs[int(index)].scheduler
            if isinstance(scheduler, DistributedReduceLROnPlateau):
                steps = scheduler.last_epoch
                _take_pending_step(scheduler, step["table"], trainer.global_rank)
                if self.log_global and scheduler.last_epoch != steps:
                    _log_global(trainer, trainer.lr_scheduler_configs[int(index)].monitor, scheduler, epoch_end=True)
                _stop_if_asked(trainer, scheduler)

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        # Counted only for our schedulers: Lightning's batch-size inference warns on batches it
        # cannot read, which a fit without DistributedReduceLROnPlateau should never see from us.
        self._counting = 0 if self._active else None

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

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        # Before ModelCheckpoint saves (Lightning runs checkpoint callbacks last): the checkpoint
        # of this validation holds the scheduler after its step.
        if not self._active or trainer.sanity_checking:
            return
        batch = trainer.fit_loop.epoch_loop.total_batch_idx
        if batch == self._validated_at:
            # Lightning 2.1 resumed from a checkpoint saved in this validation run's end runs it
            # again (partly): its step is in the checkpoint already.
            return
        self._validations, self._validated_at = self._validations + 1, batch
        for plateau in self._plateaus.values():
            plateau.validated = trainer.callback_metrics.get(plateau.config.monitor)
        for plateau in self._plateaus.values():
            if plateau.after_validation and self._validations % plateau.config.frequency == 0:
                self._plateau_step(trainer, plateau, trainer.callback_metrics.get(plateau.config.monitor))

    def _monitor_value(self, trainer: Any, lookup: Callable[[str], Any], key: str) -> Any:
        """What Lightning hands ``lr_scheduler_step`` for ``key``: a missing metric of our
        schedulers becomes ``_ABSENT`` instead of ``None``, so that ``_plateau_step``, not
        Lightning's ``strict`` check, decides whether the boundary is a step at all."""
        value = lookup(key)
        plateau_configs = [c for c in trainer.lr_scheduler_configs if c.reduce_on_plateau and c.monitor == key]
        if value is None and plateau_configs and all(_ours(c) for c in plateau_configs):
            return _ABSENT
        return value

    def _fresh(self, plateau: _Plateau, value: Any) -> bool:
        """Whether ``value``, the monitored metric now in ``trainer.callback_metrics``, was logged
        since the scheduler's last step. Lightning puts a new tensor there each time it computes
        a logged value, so a value not logged again is the very object the last step used. A
        metric that is missing counts as new once a validation run has ended since that step
        (a rank without samples may never log it; the ranks that do decide)."""
        if value is None:
            return self._validations > plateau.validations
        return value is not plateau.stepped_on

    def _plateau_step(self, trainer: Any, plateau: _Plateau, value: Any) -> None:
        """Every plateau step of a DistributedReduceLROnPlateau under Lightning goes through here:
        nothing at all (no collective) unless the monitored value is new since the last step;
        else the module's ``lr_scheduler_step`` steps with this rank's sample count as its
        weight, or, where the metric is missing, with a ``Missing`` weight that makes the step's
        own collective tell every rank who lacks it."""
        if not self._fresh(plateau, value):
            return
        plateau.stepped_on, plateau.validations = value, self._validations
        config, scheduler = plateau.config, plateau.config.scheduler
        if value is None:
            # Every rank is here at the same point: each ran the same validations and logged the
            # same keys, or lacks the metric. It contributes nothing; with strict, the step raises.
            samples = -1 if self._samples is None else self._samples
            value, scheduler.default_weight = math.nan, Missing(samples, config.strict)
            if not config.strict:
                rank_zero_warn(f"ReduceLROnPlateau conditioned on metric {config.monitor} which is not available on "
                               "this rank but strict is set to `False`: it contributes nothing to the plateau step.",
                               category=RuntimeWarning)
        else:
            # At "interval": "step", a value that the last validation run did not log is a training
            # metric of this step's batch, of the same size on every rank: every rank weighs 1
            # (validation samples would weigh the calls of a window differently before and after
            # the first validation run).
            logged_in_training = config.interval == "step" and value is not plateau.validated
            scheduler.default_weight = self._samples if self.weight_by_samples and not logged_in_training else None
        steps = scheduler.last_epoch
        try:
            self._module_step(scheduler, value)
        except MetricMissingError as err:  # on every rank, from the gathered table
            raise self.misconfiguration_error(_missing_message(config.monitor, err, trainer)) from None
        if self.log_global and scheduler.last_epoch != steps:  # a step taken: not a window's call, nor skipped
            epoch_end = config.interval == "epoch" and not plateau.after_validation
            _log_global(trainer, config.monitor, scheduler, epoch_end)
        _stop_if_asked(trainer, scheduler)

    def _take_validation_intervals(self, optim_conf: Any) -> Any:
        """Hand Lightning ``"interval": "epoch"`` for each DistributedReduceLROnPlateau configured
        with ``"validation"`` (Lightning accepts only "step" and "epoch"), and remember it: those
        step in ``on_validation_end`` instead, and Lightning's epoch boundary leaves them alone."""

        def take(entry: Any, monitor: str | None) -> Any:
            if not isinstance(entry, dict) or entry.get("interval") != "validation":
                return entry
            if not isinstance(entry.get("scheduler"), DistributedReduceLROnPlateau):
                raise self.misconfiguration_error(
                    f'"interval": "validation" steps a plateau scheduler after each validation run, which only '
                    f"distplateau.DistributedReduceLROnPlateau does; {type(entry.get('scheduler')).__name__} steps at "
                    '"epoch" or "step". Use DistributedReduceLROnPlateau (a drop-in subclass of ReduceLROnPlateau).'
                )
            self._after_validation.add(id(entry["scheduler"]))
            return {**entry, "interval": "epoch"}

        return _map_schedulers(optim_conf, take)


class _Plateau:
    """What the callback keeps per DistributedReduceLROnPlateau of a fit."""

    def __init__(self, config: Any, after_validation: bool) -> None:
        self.config = config  # Lightning's LRSchedulerConfig
        self.after_validation = after_validation  # "interval": "validation"
        self.stepped_on: Any = None  # the callback_metrics value of the last step
        self.validated: Any = None  # the callback_metrics value at the end of the last validation run
        self.validations = 0  # the callback's validation count at the last step


_ABSENT = object()  # the monitored metric, when this rank has not logged it


def _missing_message(key: str, err: MetricMissingError, trainer: Any) -> str:
    if err.everywhere:  # Lightning's own words for a metric missing on one process
        return (f"ReduceLROnPlateau conditioned on metric {key} which is not available. Available metrics are: "
                f"{list(trainer.callback_metrics)}. Condition can be set using `monitor` key in lr scheduler dict")
    return (f"DistributedReduceLROnPlateau monitors {key!r}, which is missing on {ranks_text(err.ranks)} but present "
            "on the others. Log it on every rank, or set \"strict\": False in the lr_scheduler config to let the "
            "ranks without it contribute nothing to the step.")


def _ours(config: Any) -> bool:
    return isinstance(config.scheduler, DistributedReduceLROnPlateau)


def _stop_if_asked(trainer: Any, scheduler: Any) -> None:
    if isinstance(scheduler, DistributedReduceLROnPlateau) and scheduler.should_stop and not trainer.should_stop:
        trainer.should_stop = True
        rank_zero_info(
            f"distplateau: no improvement of the global metric in the last {scheduler.steps_since_best} plateau "
            f"steps (stop_patience={scheduler.stop_patience}); best {scheduler.best}. Stopping on every rank."
        )


def _log_global(trainer: Any, monitor: str, scheduler: DistributedReduceLROnPlateau, epoch_end: bool) -> None:
    """Log what the plateau step just taken used to the trainer's loggers, on rank 0, at the step of
    the monitored metric's own points: Lightning logs the metrics of an epoch's end at the step
    before its count of optimizer steps (``fit_loop``), and a validation run's at that count."""
    loggers = trainer.loggers
    if not loggers or trainer.global_rank != 0:
        return
    metrics: dict[str, float] = {}
    if scheduler.last_global_metric is not None:
        metrics[f"{monitor}/global"] = scheduler.last_global_metric
    if scheduler.smoothing_factor and scheduler.last_smoothed_metric is not None:
        metrics[f"{monitor}/smoothed"] = scheduler.last_smoothed_metric
    if math.isfinite(scheduler.best):  # inf during warmup
        metrics[f"{monitor}/best"] = float(scheduler.best)
    metrics[f"{monitor}/bad_steps"] = scheduler.num_bad_epochs
    if scheduler.stop_patience is not None:
        metrics[f"{monitor}/steps_since_best"] = scheduler.steps_since_best
    step = compat.logged_step(trainer)
    for logger in loggers:
        logger.log_metrics(metrics, step=max(step - 1, 0) if epoch_end else step)


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
        # With the ranks' total weight, a call inside a window (accumulation_size) weighs what
        # the ranks' calls would have; a step alone is the same with any weight.
        total = math.fsum(weight for value, weight in present if weight > 0 and math.isfinite(value))
        scheduler.step(decision.value, weight=total or 1)
    else:
        scheduler.step(math.nan, weight=0)


def attach_monitor(optim_conf: Any) -> Any:
    """Add the ``monitor`` and ``interval`` of each :class:`~distplateau.DistributedReduceLROnPlateau`
    built with them to the ``configure_optimizers`` output that lacks them; what the output
    says explicitly wins.

    Handles the forms that carry schedulers: ``([optimizers], [schedulers])`` (or one scheduler
    in the place of that list), a dict with
    ``"lr_scheduler"``, and a list of such dicts. Anything else is returned as it is.

    Example:
        >>> import torch
        >>> from distplateau import DistributedReduceLROnPlateau
        >>> opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
        >>> sched = DistributedReduceLROnPlateau(opt, monitor="val_loss", interval="validation")
        >>> config = attach_monitor(([opt], [sched]))[1][0]
        >>> config["monitor"], config["interval"]
        ('val_loss', 'validation')
    """
    return _map_schedulers(optim_conf, _attach_to_scheduler)


def _map_schedulers(optim_conf: Any, change: Callable[[Any, str | None], Any]) -> Any:
    """``optim_conf`` with each scheduler entry (a scheduler or an ``lr_scheduler`` dict) replaced
    by ``change(entry, monitor)``, ``monitor`` being the ``"monitor"`` of the optimizer dict
    that holds a bare scheduler (else ``None``)."""
    def optimizer_dict(conf: dict[str, Any]) -> dict[str, Any]:
        entry = conf.get("lr_scheduler")
        changed = entry if entry is None else change(entry, conf.get("monitor"))
        return conf if changed is entry else {**conf, "lr_scheduler": changed}

    if isinstance(optim_conf, dict):
        return optimizer_dict(optim_conf)
    if isinstance(optim_conf, (list, tuple)):
        if len(optim_conf) == 2 and isinstance(optim_conf[0], list):
            # Lightning takes the second element as a list of schedulers or as one (a scheduler or
            # an lr_scheduler dict: what darts' configure_optimizers returns).
            schedulers = optim_conf[1]
            one = not isinstance(schedulers, list)
            changed = change(schedulers, None) if one else [change(s, None) for s in schedulers]
            pair = [optim_conf[0], changed]
            return tuple(pair) if isinstance(optim_conf, tuple) else pair
        if optim_conf and all(isinstance(d, dict) for d in optim_conf):
            dicts = [optimizer_dict(d) for d in optim_conf]
            return tuple(dicts) if isinstance(optim_conf, tuple) else dicts
    return optim_conf


def add_monitor_to_cli(cli_class: Any) -> None:
    """Make ``cli_class.configure_optimizers`` (``LightningCLI``'s, which adds a ``monitor`` only
    for Lightning's own ``ReduceLROnPlateau``) return a
    :class:`~distplateau.DistributedReduceLROnPlateau` built with a ``monitor`` the way it
    returns Lightning's, ``{"optimizer": ..., "lr_scheduler": {"scheduler": ..., "monitor": ...}}``
    (with its ``"interval"`` if built with one), so that the model's ``configure_optimizers()``
    carries them in and out of ``fit``. A subclass
    that overrides ``configure_optimizers`` keeps its own."""
    configure = cli_class.__dict__["configure_optimizers"].__func__
    if getattr(configure, "_distplateau", False):
        return

    def configure_optimizers(lightning_module: Any, optimizer: Any, lr_scheduler: Any = None) -> Any:
        if _monitor_of(lr_scheduler) is None:
            return configure(lightning_module, optimizer, lr_scheduler)
        return {"optimizer": optimizer, "lr_scheduler": _attach_to_scheduler(lr_scheduler, None)}

    configure_optimizers.__doc__ = configure.__doc__
    configure_optimizers._distplateau = True  # type: ignore[attr-defined]
    cli_class.configure_optimizers = staticmethod(configure_optimizers)


def _monitor_of(scheduler: Any) -> str | None:
    return scheduler.monitor if isinstance(scheduler, DistributedReduceLROnPlateau) else None


def _attach_to_scheduler(entry: Any, monitor: str | None) -> Any:
    config = dict(entry) if isinstance(entry, dict) else {"scheduler": entry, "monitor": monitor}
    scheduler = config.get("scheduler")
    if not isinstance(scheduler, DistributedReduceLROnPlateau):
        return entry
    added = {key: getattr(scheduler, key) for key in ("monitor", "interval")
             if config.get(key) is None and getattr(scheduler, key) is not None}
    return {**config, **added} if added else entry
