"""Lightning 2.x integration: a Horovod strategy and the callback that keeps
:class:`~distplateau.DistributedReduceLROnPlateau` in step on every rank.

Importing this package imports ``lightning`` (never Horovod) and registers
``Trainer(strategy="horovod")``. The callback is attached to every ``Trainer``
automatically through Lightning's ``lightning.pytorch.callbacks_factory`` entry point
when distplateau is pip-installed; it does nothing unless a
``DistributedReduceLROnPlateau`` is configured.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from .callback import DistributedPlateauCallback, attach_monitor
from .horovod import HorovodStrategy

__all__ = ["DistributedPlateauCallback", "HorovodStrategy", "attach_monitor", "callbacks_factory"]


def callbacks_factory() -> list[Callback]:
    """The callbacks Lightning adds to every ``Trainer`` (entry point
    ``lightning.pytorch.callbacks_factory``): one :class:`DistributedPlateauCallback`."""
    return [DistributedPlateauCallback()]
