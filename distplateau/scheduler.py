"""``DistributedReduceLROnPlateau``: the thin glue between gather, decide and torch."""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import math
from typing import Any, Literal, SupportsFloat

from torch import Tensor
from torch import __version__ as torch_version
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau

from ._accelerate import PREPARED_MARK, refuse_wrapper
from ._decide import NAN_POLICIES, REDUCTIONS, NanPolicy, Reduction, decide
from ._gather import BACKENDS, BROADCAST_BYTES, Backend, Gather, resolve, select, world
from ._messages import check_choice, ranks_text
from ._record import Window, make_record
from .elastic import register_horovod_handler

__all__ = ["DistributedReduceLROnPlateau"]

logger = logging.getLogger("distplateau")

# Deployment, not state: never saved, never restored from a checkpoint.
_NOT_STATE = frozenset({"optimizer", "backend", "_process_set", "_group", "_gather", "default_weight", PREPARED_MARK})
_DEPLOYMENT = ("backend", "default_weight", "_process_set", "_group")  # what pickle and copies keep of it
#: The Lightning intervals: Lightning's own two, and distplateau's after each validation run.
Interval = Literal["epoch", "step", "validation"]
INTERVALS: tuple[Interval, ...] = ("epoch", "step", "validation")
_FINGERPRINT_MASK = (1 << 53) - 1  # a float64 holds integers up to 2**53 exactly


def _is_state(key: str, value: Any) -> bool:
    """Whether an entry of ``__dict__`` is scheduler state. Deployment is not, and neither is a
    method set on the instance: pytorch-ignite's ``ReduceLROnPlateauScheduler`` assigns its own
    ``_reduce_lr`` to the scheduler it wraps; saved, that bound method would carry ignite's
    scheduler and the optimizer into the checkpoint (``torch.load(weights_only=True)`` refuses it),
    and loaded, it would replace the live one with the saved copy's."""
    return key not in _NOT_STATE and not inspect.ismethod(value)


class _NoMetric:
    """The default of ``step``'s ``metrics``. Without a default, ``step()`` would raise Python's
    own ``TypeError``, and DeepSpeed's engine, which catches ``TypeError``, would step again on
    its batch size: the default lets ``step()`` raise an error that says so instead."""

    def __repr__(self) -> str:
        return "<required>"


_NO_METRIC: Any = _NoMetric()


class _NotInThisTorch:
    """The default of ``verbose`` where this torch's ``ReduceLROnPlateau`` has no ``verbose``."""

    def __repr__(self) -> str:
        return "<not in this torch>"


_NOT_IN_THIS_TORCH: Any = _NotInThisTorch()
# torch 2.1's ReduceLROnPlateau takes verbose=False as its 10th argument; later releases default it
# to "deprecated" (warning when it is set), then drop it. Ours takes it in the same place, with this
# torch's default, and hands it on only where the parent has it.
_PARENT_VERBOSE = inspect.signature(ReduceLROnPlateau.__init__).parameters.get("verbose")
_VERBOSE_DEFAULT: Any = _NOT_IN_THIS_TORCH if _PARENT_VERBOSE is None else _PARENT_VERBOSE.default


def _check_smoothing(smoothing_factor: Any, accumulation_size: Any) -> None:
    """Refuse settings of ``smoothing_factor`` and ``accumulation_size`` that mean nothing."""
    if isinstance(smoothing_factor, bool) or not isinstance(smoothing_factor, (int, float)) or not (
            0 <= smoothing_factor < 1):
        raise ValueError(f"smoothing_factor must be a number in [0, 1) (the weight of the previous average; "
                         f"0: no smoothing); got {smoothing_factor!r}")
    if isinstance(accumulation_size, bool) or not isinstance(accumulation_size, int) or accumulation_size < 1:
        raise ValueError(f"accumulation_size must be a whole number of calls >= 1 (1: every call is a step); "
                         f"got {accumulation_size!r}")


def _no_metric_message(rank: int) -> str:
    """What ``step()`` without a metric raises on ``rank``."""
    return (
        f"DistributedReduceLROnPlateau.step() was called without a metric on rank {rank}. A plateau "
        "scheduler steps on a validation metric; DeepSpeed's engine calls step() without one after every "
        "optimizer step when the scheduler was passed to deepspeed.initialize(lr_scheduler=...). Keep the "
        "scheduler out of deepspeed.initialize (build it on the torch optimizer you pass there) and call "
        "scheduler.step(val_loss, weight=n_local_samples) on every rank after each validation; or, for one "
        'plateau step per optimizer step, pass the metric to every engine.step(lr_kwargs={"metrics": loss}).'
    )


class DistributedReduceLROnPlateau(ReduceLROnPlateau):
    """Reduce the learning rate on a plateau of a metric gathered from every rank.

    A drop-in subclass of :class:`torch.optim.lr_scheduler.ReduceLROnPlateau`. Each
    :meth:`step` gathers every rank's metric (and weight) in exactly one collective, then
    every rank applies the same reduction and NaN policy to the same gathered data and
    hands the result to the parent's ``step``. Learning rates, ``best``,
    ``num_bad_epochs`` and ``cooldown_counter`` therefore stay bit-identical on every rank.
    Call :meth:`step` on every rank, the same number of times.

    Args:
        optimizer (Optimizer): wrapped optimizer.
        mode (str): ``"min"`` or ``"max"``. Default: ``"min"``.
        factor (float): factor by which the learning rate is reduced. Default: 0.1.
        patience (int): bad epochs tolerated before the learning rate is reduced.
            Default: 10.
        threshold (float): minimum change that counts as an improvement. Default: 1e-4.
        threshold_mode (str): ``"rel"`` or ``"abs"``. Default: ``"rel"``.
        cooldown (int): epochs to wait after a reduction. Default: 0.
        min_lr (float or list): lower bound on the learning rate(s). Default: 0.
        eps (float): smaller updates of the learning rate are ignored. Default: 1e-8.
        verbose: handed on to the parent where this torch's ``ReduceLROnPlateau`` has it (torch
            2.1: ``False``, a message per reduction; then deprecated, then removed), with the
            parent's default; where it has none, passing it raises the parent's ``TypeError``.
        last_epoch (int): the count of steps already taken, as generic scheduler factories pass it
            to every torch scheduler (``-1``: none, a fresh run). The scheduler starts with
            :attr:`last_epoch` ``= last_epoch + 1``, as torch's ``LRScheduler`` does after
            construction; ``warmup`` counts on from there. It restores no other state (``best``,
            the counters, learning rates): :meth:`load_state_dict` does. Default: -1.
        reduction (str): how the ranks' metrics become one: ``"mean"`` (weighted by each
            rank's ``weight``), ``"sum"``, ``"min"`` or ``"max"``. Ranks with weight 0 are
            left out of every reduction. Default: ``"mean"``.
        nan_policy (str): what a NaN or +/-Inf metric on a contributing rank does.
            ``"drop"``: leave those ranks out; if none is finite the step is a bad epoch.
            ``"raise"``: ``FloatingPointError`` on every rank. ``"skip"``: the step changes
            nothing. ``"bad"``: the step is a bad epoch. ``"last"``: step on the last finite
            global value (if there is none yet, as ``"skip"``). ``"zero"``: count
            non-finite metrics as 0 (misleading in ``"min"`` mode, where 0 looks like a
            record low). Default: ``"drop"``.
        backend (str): ``"auto"`` (Horovod if ``horovod.torch`` is initialized, else
            torch.distributed if initialized, else a single process), ``"horovod"``,
            ``"torch"`` or ``"none"``. Chosen at the first :meth:`step`; the group's size
            and ranks are read again after an elastic reset. Default: ``"auto"``.
        process_set: Horovod process set to gather over. Default: all ranks.
        group: torch.distributed process group to gather over. Default: the world.
        monitor (str or None): name of the metric to step on, for frameworks that read it
            from the scheduler (Lightning's ``LightningCLI``,
            :class:`distplateau.lightning.DistributedPlateauCallback`). Unused by
            :meth:`step` itself. Default: ``None``.
        interval (str or None): when Lightning steps the scheduler, for ``LightningCLI`` and
            :class:`distplateau.lightning.DistributedPlateauCallback` (the ``"interval"`` of the
            ``lr_scheduler`` dict, which wins when both are given): ``"epoch"``, ``"step"``, or
            ``"validation"``, once right after each validation run. ``None``: Lightning's
            default, ``"epoch"``. Unused by :meth:`step` itself. Default: ``None``.
        stop_patience (int or None): early stopping: :attr:`should_stop` turns ``True``, on
            every rank at the same step, once ``stop_patience`` steps in a row have not
            improved ``best`` (by ``threshold``, as for the learning rate), however many
            reductions happened meanwhile: Keras' and Lightning's ``EarlyStopping(patience=...)``
            on the gathered global metric. A non-finite global metric counts as no improvement;
            a step that the NaN policy skips does not count. ``None``: never. Default: ``None``.
        warmup (int): the first ``warmup`` steps ramp the learning rates linearly from
            ``warmup_start_factor`` times their value at construction up to that value (reached
            at step ``warmup``); the plateau logic starts after them. During warmup every step
            still gathers (NaN policy, checks and ``last_global_metric`` as usual) but changes
            neither ``best``, ``num_bad_epochs``, ``cooldown_counter`` nor the stopping count.
            ``last_epoch`` counts every step. Default: 0.
        warmup_start_factor (float): the learning rates' factor at construction, when
            ``warmup`` > 0; 1.0 holds the plateau logic off without a ramp. Default: 0.1.
        smoothing_factor (float): smooth the metric before the plateau test, as schnetpack's
            ``ReduceLROnPlateau`` does (its name, its formula): the first value starts an
            exponential moving average, then ``average = s * average + (1 - s) * value``, and
            the parent steps on the average, so ``best``, ``threshold``, ``patience``,
            ``cooldown`` and ``stop_patience`` all act on it. What is smoothed is the gathered
            global value, after the reduction and the NaN policy: the average is the same on
            every rank. A global value that is not finite (NaN: a bad epoch forced by the NaN
            policy) is stepped on as it is and leaves the average as it was; warmup steps do not
            enter it (the first step after warmup starts it). In [0, 1); 0: no smoothing.
            Default: 0.0.
        accumulation_size (int): step on the mean over windows of this many calls, as optax's
            ``contrib.reduce_on_plateau`` does (its name): for a metric fed at every training
            step. A call inside a window only adds ``metric * weight`` and ``weight`` to this
            rank's own sums, with no collective; the window's last call gathers once and steps
            on the exact global mean over every call of every rank (``"sum"``, ``"min"``,
            ``"max"``: each rank's weighted mean over its calls, reduced over the ranks).
            Patience, cooldown, warmup, ``stop_patience``, smoothing and :attr:`last_epoch`
            count windows. A rank whose window had a NaN or Inf metric (with a positive weight)
            counts as one whose metric is not finite, for the NaN policy, at the window's last
            call; an unusable metric or weight raises there, on every rank, and that window is
            dropped. :meth:`load_state_dict` drops the sums of an unfinished window; the window
            still ends at the same call. Default: 1.

    Attributes:
        last_global_metric (float or None): the global value of the latest step, after the
            reduction and the NaN policy (NaN for a bad epoch forced by the NaN policy; with
            ``accumulation_size``, the window's mean), for logging. Without smoothing, the value
            the parent's ``step`` saw.
        last_smoothed_metric (float or None): the moving average of ``smoothing_factor``, the
            value the parent's ``step`` saw last (the last finite global value after warmup when
            ``smoothing_factor`` is 0). ``None`` before the first step after warmup.
        window_calls (int): the calls in the unfinished window, the same on every rank; 0 when
            ``accumulation_size`` is 1.
        steps_since_best (int): steps since ``best`` last improved (warmup excluded); what
            ``stop_patience`` counts.
        default_weight (float or None): this rank's weight when :meth:`step` is called
            without one (``None`` means 1). Per rank and per run: never saved in
            :meth:`state_dict`. :class:`distplateau.lightning.DistributedPlateauCallback`
            sets it to the rank's number of validation samples.

    Example:
        >>> import torch
        >>> from distplateau import DistributedReduceLROnPlateau
        >>> model = torch.nn.Linear(2, 1)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> scheduler = DistributedReduceLROnPlateau(optimizer, patience=0)
        >>> for val_loss in [1.0, 1.0, float("nan"), 0.5]:
        ...     scheduler.step(val_loss)  # on every rank, once per evaluation
        >>> scheduler.get_last_lr()
        [0.0010000000000000002]
        >>> scheduler.best, scheduler.last_global_metric
        (0.5, 0.5)
    """

    # Deployment lives in slots, outside __dict__: torch documents state_dict() as every
    # variable of __dict__ but the optimizer, and a scheduler rebuilt from a state dict must
    # equal the original there. The gather adapter, and the world it was built for, belong
    # to this process: pickle and copies leave them out (__getstate__).
    __slots__ = ("backend", "default_weight", "_process_set", "_group", "_gather", "_gather_world", "_window")
    # Accelerator.prepare() returns a scheduler with this mark unwrapped: its AcceleratedScheduler
    # would repeat each step once per process, or skip it (distplateau/_accelerate.py).
    _is_accelerate_prepared = True

    def __init__(
        self,
        optimizer: Optimizer,
        mode: str = "min",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        min_lr: list[float] | float = 0,
        eps: float = 1e-8,
        verbose: Any = _VERBOSE_DEFAULT,
        *,
        last_epoch: int = -1,
        reduction: Reduction = "mean",
        nan_policy: NanPolicy = "drop",
        backend: Backend = "auto",
        process_set: Any = None,
        group: Any = None,
        monitor: str | None = None,
        interval: Interval | None = None,
        stop_patience: int | None = None,
        warmup: int = 0,
        warmup_start_factor: float = 0.1,
        smoothing_factor: float = 0.0,
        accumulation_size: int = 1,
    ) -> None:
        check_choice("reduction", reduction, REDUCTIONS)
        check_choice("nan_policy", nan_policy, NAN_POLICIES)
        check_choice("backend", backend, BACKENDS)
        if interval is not None:
            check_choice("interval", interval, INTERVALS)
        if process_set is not None and backend not in ("auto", "horovod"):
            raise ValueError(f"process_set is a Horovod argument; it cannot go with backend={backend!r}")
        if group is not None and backend not in ("auto", "torch"):
            raise ValueError(f"group is a torch.distributed argument; it cannot go with backend={backend!r}")
        if process_set is not None and group is not None:
            raise ValueError("pass process_set (Horovod) or group (torch.distributed), not both")
        if stop_patience is not None and (not isinstance(stop_patience, int) or stop_patience < 1):
            raise ValueError(f"stop_patience must be a whole number >= 1 or None; got {stop_patience!r}")
        if not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be a whole number of steps >= 0; got {warmup!r}")
        if not 0 < warmup_start_factor <= 1:
            raise ValueError(f"warmup_start_factor must be in (0, 1]; got {warmup_start_factor!r}")
        _check_smoothing(smoothing_factor, accumulation_size)
        if isinstance(last_epoch, bool) or not isinstance(last_epoch, int) or last_epoch < -1:
            raise ValueError(f"last_epoch must be a whole number >= -1 (-1: a fresh run); got {last_epoch!r}")
        parent_args: tuple[Any, ...] = (mode, factor, patience, threshold, threshold_mode, cooldown, min_lr, eps)
        if _PARENT_VERBOSE is not None:
            parent_args += (verbose,)
        elif verbose is not _NOT_IN_THIS_TORCH:
            raise TypeError(f"DistributedReduceLROnPlateau got verbose={verbose!r}, but torch {torch_version}'s "
                            "ReduceLROnPlateau has no verbose argument (deprecated since torch 2.2, then removed): "
                            "leave it out")
        super().__init__(optimizer, *parent_args)
        self.last_epoch = last_epoch + 1
        if not hasattr(self, "_last_lr"):  # torch 2.1's ReduceLROnPlateau sets it at its first step only
            self._last_lr = self._current_lrs()
        self.reduction: Reduction = reduction
        self.nan_policy: NanPolicy = nan_policy
        self.last_global_metric: float | None = None
        self.last_finite_metric: float | None = None
        self.backend: Backend = backend
        self._process_set = process_set
        self._group = group
        self._gather: Gather | None = None
        self._gather_world: tuple[Any, ...] = ()
        register_horovod_handler()  # if Horovod is imported: TorchState keeps this live object
        self.monitor = monitor
        self.interval = interval
        self.default_weight: SupportsFloat | Any = None
        self.stop_patience = stop_patience
        self.steps_since_best = 0
        self.warmup = warmup
        self.warmup_start_factor = warmup_start_factor
        # The learning rates that warmup climbs to, saved with the state for a resumed run.
        self.warmup_lrs = [float(group["lr"]) for group in optimizer.param_groups] if warmup else []
        self.smoothing_factor = float(smoothing_factor)
        self.last_smoothed_metric: float | None = None
        self.accumulation_size = accumulation_size
        self.window_calls = 0  # calls in the unfinished window: the same on every rank
        self._window = Window()  # this rank's sums over those calls: its own, never saved
        if warmup:
            self._set_warmup_lrs()

    def step(  # type: ignore[override]
        self, metrics: SupportsFloat | Any = _NO_METRIC, weight: SupportsFloat | Any = None, epoch: int | None = None
    ) -> None:
        """Gather ``metrics`` from every rank, reduce it, and step on the result.

        Args:
            metrics: this rank's metric: a float or int, a numpy scalar, or a tensor with
                one element on any device. Required: ``step()`` without it raises.
            weight: this rank's weight, a finite number >= 0 (default
                :attr:`default_weight`, or 1 if that is ``None``): its number of validation
                samples makes ``reduction="mean"`` the exact global mean. A rank with weight 0
                contributes nothing, whatever its metric.
            epoch: deprecated, as in the parent.

        Raises:
            RuntimeError: called without a metric, as a framework that steps its scheduler
                after every optimizer step does (DeepSpeed's engine, when the scheduler was
                passed to ``deepspeed.initialize``): raised before the collective, on every
                rank so called; the scheduler is left unchanged. Not a ``TypeError``, which
                DeepSpeed catches and answers by stepping on its batch size.
            TypeError, ValueError: on every rank, if a metric or weight on any rank is
                unusable; the scheduler is left unchanged.
            RuntimeError: on every rank, if the ranks' scheduler states differ.
            FloatingPointError: on every rank, with ``nan_policy="raise"``.
            TimeoutError: on a rank that waited for the others longer than the process group's
                timeout (torch.distributed) or ``DISTPLATEAU_HOROVOD_TIMEOUT_S`` (Horovod; 30
                minutes when unset, as gloo's default, ``0``: no limit); the message names the
                causes it cannot tell apart (a skipped or repeated call, a dead or frozen rank,
                a failed network), the wait and the group.
            ConnectionError: under torch.distributed, on a rank whose wait ended because a peer
                closed its connection (it exited or died, or its own wait timed out first, as
                gloo does); the message names the same causes, torch's error is chained.
            ValueError: under Horovod, at the first step, if ``DISTPLATEAU_HOROVOD_TIMEOUT_S``
                is not a number of seconds >= 0 (raised before the collective).
        """
        refuse_wrapper()
        gather = self._adapter()
        if metrics is _NO_METRIC:
            # Raised before the collective, as refuse_wrapper does: a framework that steps without a
            # metric does so at the same point on every rank (DeepSpeed: after each optimizer
            # step), and Python's own TypeError for a missing argument was raised there too.
            raise RuntimeError(_no_metric_message(gather.ranks[gather.index]))
        if weight is None:
            weight = self.default_weight
        if self.accumulation_size > 1:
            # A window: a call adds this rank's value and weight to its own sums, with no
            # collective; the window's last call, the same one on every rank, gathers them.
            self._window = self._window.add(make_record(metrics, weight, 0.0))
            self.window_calls += 1
            if self.window_calls < self.accumulation_size:
                return
        # One rank has no other state to compare with: its fingerprint is not computed.
        fingerprint = self.fingerprint() if gather.size > 1 else 0.0
        # 1. this rank's record, of this call or of the window it ends: never raises, a bad
        #    input travels as a problem code;
        if self.accumulation_size > 1:
            record = self._window.record(fingerprint)
            self._window, self.window_calls = Window(), 0  # the window is over, whatever the ranks decide
        else:
            record = make_record(metrics, weight, fingerprint)
        # 2. every rank's record, in the one collective of the step;
        table = gather(record)
        # 3. the same decision on every rank: the same error, or the same value, or nothing.
        value, nonfinite_ranks = decide(
            table,
            reduction=self.reduction,
            nan_policy=self.nan_policy,
            last_finite=self.last_finite_metric,
            ranks=gather.ranks,
        )
        if nonfinite_ranks and gather.index == 0:
            logger.warning(
                "distplateau: metric is NaN or Inf on %s at step %d; nan_policy=%r %s",
                ranks_text(nonfinite_ranks),
                self.last_epoch + 1,
                self.nan_policy,
                "changes nothing" if value is None else f"steps on {value!r}",
            )
        if value is None:
            return
        self.last_global_metric = value
        if math.isfinite(value):
            self.last_finite_metric = value
        if self.last_epoch < self.warmup:
            self.last_epoch = self.last_epoch + 1 if epoch is None else epoch
            self._set_warmup_lrs()
            return
        best = self.best
        super().step(self._smooth(value), epoch)
        self.steps_since_best = 0 if self.best != best else self.steps_since_best + 1
        if self.steps_since_best == self.stop_patience:  # the step that decides to stop, once
            self._log_decision("stop_patience reached", f"{self.steps_since_best} steps without a new best "
                               f">= stop_patience {self.stop_patience}; should_stop is True on every rank")

    def _smooth(self, value: float) -> float:
        """What the parent steps on: schnetpack's exponential moving average of the global values
        (the first one starts it), kept in :attr:`last_smoothed_metric`. A value that is not finite
        is stepped on as it is (NaN: a bad epoch) and leaves the average as it was."""
        if not math.isfinite(value):
            return value
        average = self.last_smoothed_metric
        if average is not None and self.smoothing_factor:
            value = self.smoothing_factor * average + (1.0 - self.smoothing_factor) * value
        self.last_smoothed_metric = value
        return value

    @property
    def should_stop(self) -> bool:
        """``True`` once ``stop_patience`` steps in a row have not improved ``best``: the
        same on every rank after every :meth:`step`, since it follows from the gathered
        state. Always ``False`` without ``stop_patience``."""
        return self.stop_patience is not None and self.steps_since_best >= self.stop_patience

    def get_last_lr(self) -> list[float | Tensor]:
        """The learning rate of each parameter group after the latest :meth:`step` (before
        any: at construction), as torch's ``LRScheduler.get_last_lr`` returns it: a tensor
        learning rate comes back as a tensor, as in torch's own class from torch 2.10 on.
        Defined here because torch 2.1's ``ReduceLROnPlateau`` has no ``get_last_lr``."""
        return self._last_lr

    def _current_lrs(self) -> list[float | Tensor]:
        # What torch >= 2.10 keeps in _last_lr: a tensor learning rate is copied, so that a later
        # in-place change of the rate does not change what get_last_lr() returned.
        return [lr.clone() if isinstance(lr := group["lr"], Tensor) else lr for group in self.optimizer.param_groups]

    def _set_warmup_lrs(self) -> None:
        """Warmup's linear ramp at step :attr:`last_epoch`; from ``warmup`` on, the rates at construction."""
        done = min(self.last_epoch / self.warmup, 1.0)
        start = self.warmup_start_factor
        self._set_lrs([lr * (start + (1 - start) * done) for lr in self.warmup_lrs])

    def _set_lrs(self, lrs: list[float]) -> None:
        for group, lr in zip(self.optimizer.param_groups, lrs):
            # A tensor learning rate is what a compiled or capturable optimizer step reads: write
            # into it (keeping its dtype and device) rather than replace it, which would make a
            # compiled step recompile and a captured one never see the new rate.
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = self._current_lrs()

    def _reduce_lr(self, epoch: Any) -> None:
        # torch before 2.10 assigns the reduced rate to group["lr"] as a float, replacing a tensor
        # learning rate (pytorch #163093); torch's own arithmetic, then the result written back
        # into the tensor, as torch >= 2.10 does itself.
        tensors = [group["lr"] if isinstance(group["lr"], Tensor) else None for group in self.optimizer.param_groups]
        old = [float(group["lr"]) for group in self.optimizer.param_groups]
        super()._reduce_lr(epoch)
        for group, tensor in zip(self.optimizer.param_groups, tensors):
            if tensor is not None and group["lr"] is not tensor:
                tensor.fill_(group["lr"])
                group["lr"] = tensor
        # Called by the parent's step only when a reduction is due (num_bad_epochs > patience, not
        # yet reset): the line costs nothing on a step that changes nothing.
        new = [float(group["lr"]) for group in self.optimizer.param_groups]
        lrs = ", ".join(f"group {i}: {a!r} -> {b!r}" for i, (a, b) in enumerate(zip(old, new)))
        if old == new:
            lrs += " (unchanged: min_lr or eps)"
        self._log_decision("reducing the learning rate",
                           f"{self.num_bad_epochs} bad steps > patience {self.patience}; {lrs}")

    def _log_decision(self, what: str, why: str) -> None:
        """One INFO line on the ``distplateau`` logger, from the group's first rank only (every rank
        takes the same decision): the step, the global value (and its average when smoothing), ``best``
        and ``why``."""
        gather = self._gather
        if (gather is not None and gather.index != 0) or not logger.isEnabledFor(logging.INFO):
            return
        value = f"global {self.monitor or 'metric'} {self.last_global_metric!r}"
        if self.smoothing_factor:
            value += f" (smoothed {self.last_smoothed_metric!r})"
        logger.info("distplateau: step %d: %s: %s, best %r, %s", self.last_epoch, what, value, self.best, why)

    def fingerprint(self) -> float:
        """A 53-bit digest of the scheduler's state, settings and learning rates, as a float.

        Ranks whose fingerprints differ would take different decisions from the same metric;
        :meth:`step` compares them across ranks inside its one collective.
        """
        # repr() writes every float exactly (it round-trips), so equal text means equal state.
        state = (self.best, self.last_finite_metric, self.num_bad_epochs, self.cooldown_counter,
                 self.last_epoch, self.steps_since_best, self.warmup_lrs,
                 [float(group["lr"]) for group in self.optimizer.param_groups],
                 self.mode, self.factor, self.patience, self.threshold, self.threshold_mode, self.cooldown,
                 self.min_lrs, self.eps, self.reduction, self.nan_policy, self.stop_patience, self.warmup,
                 self.warmup_start_factor, self.smoothing_factor, self.last_smoothed_metric, self.accumulation_size,
                 self.window_calls)
        digest = hashlib.blake2b(repr(state).encode(), digest_size=8).digest()
        return float(int.from_bytes(digest, "little") & _FINGERPRINT_MASK)

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state as plain values (loadable with ``weights_only=True``).

        It holds what the parent's does plus ``reduction``, ``nan_policy``,
        ``last_global_metric``, ``last_finite_metric``, the early-stopping and warmup settings
        and counts (``stop_patience``, ``steps_since_best``, ``warmup``,
        ``warmup_start_factor``, ``warmup_lrs``), the smoothing (``smoothing_factor``,
        ``last_smoothed_metric``) and the window's setting and count (``accumulation_size``,
        ``window_calls``); not the optimizer, the backend, the process set or the group, which
        belong to the run, not to the checkpoint, nor a method a framework set on the instance
        (pytorch-ignite's ``_reduce_lr``), nor this rank's sums over the calls of an unfinished
        window, which are this rank's alone (see ``accumulation_size``).
        """
        return {key: value for key, value in self.__dict__.items() if _is_state(key, value)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`, or from plain ``ReduceLROnPlateau``
        (whose state has no ``reduction``/``nan_policy``: the current settings stay), or from
        schnetpack's ``ReduceLROnPlateau`` (its ``smoothing_factor``, and its average
        ``ema_loss`` as :attr:`last_smoothed_metric`; ``None`` if it is not finite).

        Load the same state dict on every rank. This rank's sums over the calls of an
        unfinished window are dropped: the window goes on from the saved ``window_calls``
        (``0`` for a state without one), so it ends at the same call as in the run that saved
        it, and its mean covers the calls made since the load.

        Raises:
            ValueError: the state dict names an unknown reduction or NaN policy, or a
                ``smoothing_factor``, ``accumulation_size`` or ``window_calls`` out of range.
        """
        state = {key: value for key, value in state_dict.items() if _is_state(key, value)}
        check_choice("reduction", state.get("reduction", self.reduction), REDUCTIONS)
        check_choice("nan_policy", state.get("nan_policy", self.nan_policy), NAN_POLICIES)
        if "ema_loss" in state:  # schnetpack's ReduceLROnPlateau: its average, NaN once a NaN reached it
            ema = state.pop("ema_loss")
            state["last_smoothed_metric"] = float(ema) if ema is not None and math.isfinite(ema) else None
        size = state.get("accumulation_size", self.accumulation_size)
        _check_smoothing(state.get("smoothing_factor", self.smoothing_factor), size)
        state.setdefault("window_calls", 0)  # a state without windows (torch's, schnetpack's): a new one
        if not 0 <= state["window_calls"] < size:
            raise ValueError(f"window_calls must be in [0, accumulation_size={size}); got {state['window_calls']!r}")
        super().load_state_dict(state)
        self._window = Window()  # this rank's sums of the calls before: in no state dict

    def sync_state(self, src: int = 0) -> None:
        """Give every rank the scheduler state and learning rates of rank ``src``.

        The repair for ``RuntimeError: scheduler state differs across ranks``, e.g. after a
        checkpoint was loaded on one rank only or when a worker joined late. Call it on every
        rank of the scheduler's group, like :meth:`step`: rank ``src`` sends its
        :meth:`state_dict` and its optimizer's learning rates as JSON (plain values; nothing
        is unpickled) in one broadcast, and every other rank loads them into its own
        scheduler and optimizer. The model and the optimizer's other state (momentum, ...)
        are not touched: broadcast those as usual (``hvd.broadcast_parameters`` and
        ``hvd.broadcast_optimizer_state``; DDP does the model at construction). With
        ``accumulation_size``, every rank, ``src`` too, drops its sums over the calls of an
        unfinished window, as :meth:`load_state_dict` does, and goes on from ``src``'s
        ``window_calls``.

        Args:
            src: the global rank to copy, a member of the scheduler's group. Default: 0.

        Raises:
            ValueError: on every rank, if ``src`` is not in the group (before the broadcast)
                or rank ``src``'s state cannot be sent; on a rank whose optimizer has another
                number of parameter groups than rank ``src``'s (its scheduler is unchanged).
            TimeoutError: on a rank that waited for the broadcast longer than the process
                group's timeout (torch.distributed) or ``DISTPLATEAU_HOROVOD_TIMEOUT_S``
                (Horovod, 30 minutes when unset), as in :meth:`step`; its scheduler is unchanged.
            ConnectionError: under torch.distributed, when a peer closed its connection during
                the broadcast, as in :meth:`step`; its scheduler is unchanged.
        """
        gather = self._adapter()
        if src not in gather.ranks:
            raise ValueError(f"sync_state(src={src}): rank {src} is not in this scheduler's group, which has "
                             f"{ranks_text(gather.ranks)}; pass one of them")
        rank = gather.ranks[gather.index]
        sent = gather.broadcast(self._state_message(src) if rank == src else b"", src)
        message = json.loads(sent)
        if "error" in message:
            raise ValueError(message["error"])
        if rank == src:
            self._window = Window()  # as every other rank's, which load_state_dict empties
            return
        lrs = message["lrs"]
        if len(lrs) != len(self.optimizer.param_groups):
            raise ValueError(f"sync_state(src={src}): rank {src}'s optimizer has {len(lrs)} parameter groups, "
                             f"rank {rank}'s has {len(self.optimizer.param_groups)}; build the same optimizer "
                             "on every rank")
        self.load_state_dict(message["state"])
        self._set_lrs(lrs)  # in place for tensor learning rates; _last_lr as this rank's types

    def _state_message(self, src: int) -> bytes:
        # An unsendable state still goes out, as an error every rank raises: rank src raising
        # before the broadcast would leave the other ranks waiting in it.
        try:
            state = self.state_dict()
            # torch >= 2.10 keeps tensor learning rates in _last_lr as tensors: they travel as
            # floats, and each receiving rank rebuilds its _last_lr from its own learning rates.
            state["_last_lr"] = [float(lr) for lr in state["_last_lr"]]
            text = json.dumps({"state": state, "lrs": [float(group["lr"]) for group in self.optimizer.param_groups]})
        except (TypeError, ValueError) as err:
            text = json.dumps({"error": f"sync_state(src={src}): rank {src}'s state is not plain values: {err}"})
        if len(text) > BROADCAST_BYTES:
            text = json.dumps({"error": f"sync_state(src={src}): rank {src}'s state is {len(text)} bytes as "
                                        f"JSON, more than the {BROADCAST_BYTES} one broadcast carries"})
        return text.encode()

    def _adapter(self) -> Gather:
        """The gather adapter for this process's current world: built at the first use, and
        again when the world changed (a Horovod elastic reset), so that a step never gathers
        with a stale size, rank or process set."""
        gather = self._gather
        built_for = self._gather_world
        if gather is None or (built_for and world(built_for[0], process_set=self._process_set,
                                                  group=self._group) != built_for):
            backend = resolve(self.backend, process_set=self._process_set, group=self._group)
            built_for = world(backend, process_set=self._process_set, group=self._group)
            gather = select(backend, process_set=self._process_set, group=self._group)
            self._gather, self._gather_world = gather, built_for
        return gather

    def __getstate__(self) -> dict[str, Any]:
        # What pickle and copies carry: the state, the optimizer and the deployment settings.
        # Not the adapter: a copy builds its own at its first step, for its process and world.
        # This rank's sums of an unfinished window go too: a copy is a copy of this rank's scheduler.
        return {**self.__dict__, **{name: getattr(self, name) for name in _DEPLOYMENT}, "_window": self._window}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        for name in _DEPLOYMENT:
            setattr(self, name, state.pop(name))
        self._window = state.pop("_window")
        self.__dict__.update(state)
        self._gather, self._gather_world = None, ()

    def __deepcopy__(self, memo: dict[int, Any]) -> DistributedReduceLROnPlateau:
        # A process set or group names a communicator of this process: the copy shares it, as
        # copy.copy does (a torch.distributed group cannot be copied at all).
        for handle in (self._process_set, self._group):
            memo[id(handle)] = handle
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return clone

