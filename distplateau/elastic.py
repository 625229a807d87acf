"""Horovod elastic: a scheduler in ``hvd.elastic.TorchState`` stays the live object on every rank.

Horovod's ``TorchState`` keeps models, optimizers and samplers through handlers that copy
their ``state_dict()``; anything else it treats as a plain Python object, and
``state.sync()`` broadcasts that object by pickling it. For a scheduler this means that, on
every rank but 0, ``state.scheduler`` becomes a copy whose ``optimizer`` is a copy too, not
the optimizer that trains: from then on its learning-rate reductions go nowhere.

:class:`SchedulerStateHandler` is the missing handler, for every ``ReduceLROnPlateau``
(ours and torch's). :func:`register_horovod_handler` adds it to Horovod's handler registry;
``DistributedReduceLROnPlateau`` calls it whenever it is constructed in a process that has
imported ``horovod.torch``, so ``TorchState(model=..., optimizer=..., scheduler=...)`` needs no
extra call. This module never imports Horovod itself.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

from torch.optim.lr_scheduler import ReduceLROnPlateau

__all__ = ["SchedulerStateHandler", "register_horovod_handler"]


class SchedulerStateHandler:
    """Keeps a ``ReduceLROnPlateau`` in Horovod elastic state through its ``state_dict()``.

    It has the interface of Horovod's own handlers (``horovod.torch.elastic.state``), and does
    for the scheduler what they do for the model and the optimizer:

    - ``save()`` (``state.commit()``): keep a copy of the scheduler's state dict;
    - ``restore()`` (after a failed collective): load that copy back into the same scheduler,
      so the scheduler rolls back together with the model and the optimizer;
    - ``sync()`` (after a reset): give every rank rank 0's state, loaded into each rank's own
      scheduler — through :meth:`~distplateau.DistributedReduceLROnPlateau.sync_state` for
      ours (one broadcast, nothing pickled), through ``hvd.broadcast_object`` of the state
      dict for torch's.

    Args:
        scheduler: the scheduler to keep; available as ``value``, as in Horovod's handlers.
    """

    def __init__(self, scheduler: ReduceLROnPlateau) -> None:
        self.value = scheduler
        self.save()

    def save(self) -> None:
        self._saved = copy.deepcopy(self.value.state_dict())

    def restore(self) -> None:
        # A copy again: a later restore must not see what this one's scheduler did since.
        self.value.load_state_dict(copy.deepcopy(self._saved))

    def sync(self) -> None:
        sync_state = getattr(self.value, "sync_state", None)
        if sync_state is not None:
            sync_state(src=0)
            return
        import horovod.torch as hvd

        state = hvd.broadcast_object(self.value.state_dict(), root_rank=0, name="distplateau.elastic.scheduler")
        self.value.load_state_dict(state)

    def set_value(self, value: ReduceLROnPlateau) -> None:
        """``state.scheduler = other``: keep ``other`` from now on."""
        self.value = value
        self.save()


def register_horovod_handler() -> bool:
    """Add :class:`SchedulerStateHandler` to Horovod's elastic handler registry for every
    ``ReduceLROnPlateau``, once; later ``TorchState`` objects use it.

    ``DistributedReduceLROnPlateau`` calls this at construction. Call it yourself for torch's
    plain ``ReduceLROnPlateau`` in a program that never constructs ours, or that imports
    ``horovod.torch`` only after constructing it.

    Returns:
        Whether the handler is registered: ``False`` if ``horovod.torch`` is not imported
        (this function does not import it).
    """
    if "horovod.torch" not in sys.modules:
        return False
    from horovod.torch.elastic import state

    registry: list[tuple[type, Any]] = state.get_handler_registry()
    if (ReduceLROnPlateau, SchedulerStateHandler) not in registry:
        registry.append((ReduceLROnPlateau, SchedulerStateHandler))
    return True
