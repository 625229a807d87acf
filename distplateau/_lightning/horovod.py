"""``HorovodStrategy``: data-parallel training under ``horovodrun`` for Lightning 2.x, written
once for both Lightning packages.

Lightning 2.0 removed its Horovod strategy; this one follows Lightning's own
``DDPStrategy`` wherever Horovod allows, so that switching between ``strategy="ddp"`` and
``strategy="horovod"`` changes the transport, not the training.

:class:`HorovodStrategyBase` imports no Lightning package: ``distplateau.lightning`` and
``distplateau.pytorch_lightning`` each combine it with their package's ``ParallelStrategy``
and register it in their package's ``StrategyRegistry``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_only
from torch import Tensor
from torch.optim import Optimizer

from . import DISTPLATEAU_MODULE

# Lightning's class comes in through each package's subclass; to mypy it is Any.
_ParallelStrategy: Any = object

__all__ = ["HorovodStrategyBase", "register"]


def _import_horovod() -> Any:
    try:
        import horovod.torch as hvd
    except ImportError as err:
        raise ImportError(
            f"HorovodStrategy needs horovod.torch, which failed to import ({err}); build it with "
            "`python -m distplateau.install_horovod` and launch with `horovodrun -np N --gloo python train.py`"
        ) from err
    return hvd


class HorovodStrategyBase(_ParallelStrategy):
    """Data-parallel training with Horovod: one process per device, launched by
    ``horovodrun``. Registered as ``Trainer(strategy="horovod")`` by
    ``import distplateau.lightning`` (for ``lightning.pytorch``) and by
    ``import distplateau.pytorch_lightning`` (for ``pytorch_lightning``); to pass the strategy
    as an object, import ``HorovodStrategy`` from the module of your package.

    Rank and world size come from Horovod (``hvd.init()`` runs when the strategy is
    built, then one allgather of the local ranks gives ``node_rank`` and ``num_nodes``, right
    also on hosts with different numbers of slots: build it on every rank). At the start of
    ``fit`` the parameters, buffers and optimizer state of rank 0 are broadcast to every rank;
    gradients are averaged across ranks with ``hvd.DistributedOptimizer`` (after each
    backward of the step that calls the optimizer, so gradient clipping sees averaged
    gradients; ``accumulate_grad_batches`` is honoured).
    As with ``DDPStrategy``, the learning rate is not scaled by the world size and each
    rank reads its own shard through a ``DistributedSampler``. ``reduce``, ``all_gather``,
    ``broadcast`` and ``barrier`` go through Horovod; checkpoints are written by rank 0.

    Args:
        accelerator: as for every Lightning strategy; normally left to the ``Trainer``.
        parallel_devices: as for every Lightning strategy; normally left to the ``Trainer``.
        checkpoint_io: how checkpoints are written. Default: Lightning's.
        precision_plugin: Default: Lightning's, from ``Trainer(precision=...)``.

    Example::

        # train.py, launched as: horovodrun -np 2 --gloo python train.py
        import distplateau.lightning  # registers strategy="horovod"; or distplateau.pytorch_lightning
        trainer = lightning.pytorch.Trainer(strategy="horovod", accelerator="cpu", max_epochs=5)
        trainer.fit(model)
    """

    strategy_name = "horovod"
    lightning_package: str  #: ``"lightning.pytorch"`` or ``"pytorch_lightning"``, set by each subclass
    optimizers: list[Optimizer]  # Lightning's property, for mypy

    def __init__(
        self,
        accelerator: Any = None,
        parallel_devices: list[torch.device] | None = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=None,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self._hvd = _import_horovod()
        if not self._hvd.is_initialized():
            self._hvd.init()
        # Set now, not in setup_environment: the Trainer logs from rank 0 before that.
        rank_zero_only.rank = self.global_rank  # type: ignore[attr-defined]
        self._node_rank, self._num_nodes = _node_layout(self._hvd)

    def __repr__(self) -> str:
        # A Trainer of the other Lightning package rejects this object with "You selected an
        # invalid strategy name: `strategy={repr}`. It must be ... an instance of
        # `pytorch_lightning.strategies.Strategy`"; its repr is the one part of that message we
        # write, so it says which class that Trainer needs (read in Lightning 2.1.0 to 2.6.6).
        (other,) = set(DISTPLATEAU_MODULE) - {self.lightning_package}
        return (f"<{DISTPLATEAU_MODULE[self.lightning_package]}.HorovodStrategy, for {self.lightning_package}; "
                f"a {other} Trainer needs {DISTPLATEAU_MODULE[other]}.HorovodStrategy>")

    @property
    def global_rank(self) -> int:
        return int(self._hvd.rank())

    @property
    def local_rank(self) -> int:
        return int(self._hvd.local_rank())

    @property
    def node_rank(self) -> int:
        """This process's node: 0 for the host of rank 0, then 1, 2, ... in the order of their
        ranks (``horovodrun -H a:1,b:2``: rank 0 on node 0, ranks 1 and 2 on node 1)."""
        return self._node_rank

    @property
    def num_nodes(self) -> int:
        """How many hosts the ranks run on, as ``horovodrun`` placed them; ``Trainer.num_nodes``
        reads it."""
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        # The Trainer sets its num_nodes argument here (default 1); horovodrun, not the
        # Trainer, places the ranks, so only a count that contradicts it is an error.
        if num_nodes not in (1, self._num_nodes):
            raise ValueError(
                f"Trainer(num_nodes={num_nodes}) but horovodrun started {self.world_size} "
                f"rank{'s' * (self.world_size != 1)} on {self._num_nodes} node{'s' * (self._num_nodes != 1)}; "
                "leave num_nodes out with strategy='horovod' (horovodrun -H decides)"
            )

    @property
    def world_size(self) -> int:
        return int(self._hvd.size())

    @property
    def is_distributed(self) -> bool:
        """Always ``True``: the ``Trainer`` then adds a ``DistributedSampler``."""
        return True

    @property
    def root_device(self) -> torch.device:
        devices = self.parallel_devices or [torch.device("cpu")]
        if devices[0].type == "cuda":
            return torch.device("cuda", self.local_rank)
        return devices[0]

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    def setup_environment(self) -> None:
        rank_zero_only.rank = self.global_rank  # type: ignore[attr-defined]
        super().setup_environment()

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        hvd = self._hvd
        assert self.model is not None
        hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
        if trainer.state.fn != "fit":  # TrainerFn.FITTING, a str enum in both packages
            return
        wrapped: list[Any] = []
        for optimizer in self.optimizers:
            # Optimizer state travels pickled: hvd.broadcast_optimizer_state would take a
            # dummy step to create missing state, which moves the weights under weight decay.
            state = hvd.broadcast_object(optimizer.state_dict(), root_rank=0, name="distplateau.optimizer_state")
            if self.global_rank != 0:
                optimizer.load_state_dict(state)
            distributed = hvd.DistributedOptimizer(
                optimizer,
                named_parameters=_named_parameters(self.model, optimizer),
                backward_passes_per_step=trainer.accumulate_grad_batches,
                op=hvd.Average,
            )
            # The wrapper is a new optimizer object: schedulers must step the one that trains.
            for config in self.lr_scheduler_configs:
                if getattr(config.scheduler, "optimizer", None) is optimizer:
                    config.scheduler.optimizer = distributed
            wrapped.append(distributed)
        self.optimizers = wrapped

    def optimizer_step(
        self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any
    ) -> Any:
        if not hasattr(optimizer, "synchronize"):
            return super().optimizer_step(optimizer, closure, model, **kwargs)

        def closure_then_average() -> Any:
            result = closure()  # forward and backward; Horovod's hooks start the allreduces
            optimizer.synchronize()  # type: ignore[attr-defined]
            return result

        # Lightning runs the closure inside optimizer.step(); averaging must finish after the
        # closure's backward and before gradient clipping and the update, not before the closure.
        with optimizer.skip_synchronize():  # type: ignore[attr-defined]
            return super().optimizer_step(optimizer, closure_then_average, model, **kwargs)

    def reduce(self, tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        """Reduce ``tensor`` over all ranks with ``hvd.allreduce``: ``"mean"``/``"avg"``
        (default), ``"sum"``, ``"max"`` or ``"min"``. Non-tensors are returned as they are.

        Raises:
            ValueError: a ``group`` was given (Horovod uses process sets) or the operation is unknown.
        """
        if not isinstance(tensor, Tensor):
            return tensor
        if group is not None:
            raise ValueError("HorovodStrategy.reduce reduces over all ranks; it takes no `group`")
        name = str(getattr(reduce_op, "name", reduce_op)).lower() if reduce_op is not None else "mean"
        ops = {"mean": self._hvd.Average, "avg": self._hvd.Average, "sum": self._hvd.Sum,
               "max": self._hvd.Max, "min": self._hvd.Min}
        if name not in ops:
            raise ValueError(f"HorovodStrategy.reduce: unsupported reduce_op {reduce_op!r}; use one of {list(ops)}")
        return self._hvd.allreduce(tensor, op=ops[name])

    def all_gather(self, tensor: Tensor, group: Any = None, sync_grads: bool = False) -> Tensor:
        """Stack ``tensor`` from every rank into shape ``(world_size, *tensor.shape)``
        with one ``hvd.allgather``; gradients flow back through it with ``sync_grads=True``.

        Raises:
            ValueError: a ``group`` was given.
        """
        if group is not None:
            raise ValueError("HorovodStrategy.all_gather gathers over all ranks; it takes no `group`")
        with nullcontext() if sync_grads else torch.no_grad():
            return self._hvd.allgather(tensor.unsqueeze(0))

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return self._hvd.broadcast_object(obj, root_rank=src)

    def barrier(self, name: str | None = None) -> None:
        self._hvd.barrier()

    def teardown(self) -> None:
        for optimizer in self.optimizers:
            # Horovod's allreduce hooks hang on the parameters' gradient accumulators, which only
            # the DistributedOptimizer keeps alive: let them go, or a later fit of the same model
            # would run two sets of hooks (Horovod rejects the duplicate tensor names).
            getattr(optimizer, "_grad_accs", []).clear()
        super().teardown()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="Horovod data parallel (distplateau)")


def register(strategy: type[HorovodStrategyBase], strategy_registry: Any) -> None:
    """Register ``strategy`` as ``Trainer(strategy="horovod")`` in one package's registry."""
    if strategy.strategy_name not in strategy_registry:
        strategy.register_strategies(strategy_registry)


def _node_layout(hvd: Any) -> tuple[int, int]:
    """(this process's node index, number of nodes), from one allgather of every rank's local
    rank. ``hvd.cross_rank()`` is this process's index among the processes with its local rank:
    the node index only when every host has as many slots (``-H a:1,b:2``: rank 2, local rank 1
    on the second host, has cross rank 0). horovodrun gives each host a block of consecutive
    ranks, in host order (read in Horovod 0.28.1, ``runner/common/util/hosts.py``,
    ``get_host_assignments``), so a node starts at each local rank 0."""
    local_ranks = hvd.allgather(torch.tensor([hvd.local_rank()]), name="distplateau.node_layout").tolist()
    host_by_host = all(local in (0, before + 1) for before, local in zip([-1, *local_ranks], local_ranks))
    if not host_by_host:
        raise RuntimeError(
            f"HorovodStrategy on Horovod rank {hvd.rank()}: the ranks are not placed host by host (local "
            f"rank of each rank: {local_ranks}), so which node each runs on is unknown; launch with "
            "horovodrun, which places them so"
        )
    starts = [rank for rank, local in enumerate(local_ranks) if local == 0]
    return sum(start <= hvd.rank() for start in starts) - 1, len(starts)


def _named_parameters(module: torch.nn.Module, optimizer: Optimizer) -> list[tuple[str, torch.nn.Parameter]]:
    # Horovod needs a name for every parameter the optimizer holds, and only those.
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return [(name, p) for name, p in module.named_parameters() if id(p) in in_optimizer]
