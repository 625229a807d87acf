"""distplateau for ``lightning.pytorch`` (package ``lightning``): the Horovod strategy and the
callback that keeps :class:`~distplateau.DistributedReduceLROnPlateau` in step on every rank.

Importing this module imports ``lightning.pytorch`` (never Horovod), registers
``Trainer(strategy="horovod")`` and makes ``LightningCLI`` hand the scheduler's ``monitor`` to
Lightning. If ``pytorch_lightning`` is already imported, it also imports
:mod:`distplateau.pytorch_lightning`, so that ``strategy="horovod"`` works for either package's
``Trainer``. The callback is attached to every ``Trainer`` automatically through the
``lightning.pytorch.callbacks_factory`` entry point when distplateau is pip-installed. For
``import pytorch_lightning as pl`` use :mod:`distplateau.pytorch_lightning`, the same classes
built on that package.
"""

from __future__ import annotations

import sys

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import ParallelStrategy, StrategyRegistry
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from ._lightning.callback import PlateauCallbackBase, add_monitor_to_cli, attach_monitor
from ._lightning.horovod import HorovodStrategyBase, register

__all__ = ["DistributedPlateauCallback", "HorovodStrategy", "attach_monitor", "callbacks_factory"]


class DistributedPlateauCallback(PlateauCallbackBase, Callback):
    __doc__ = PlateauCallbackBase.__doc__
    misconfiguration_error = MisconfigurationException
    extract_batch_size = staticmethod(extract_batch_size)


class HorovodStrategy(HorovodStrategyBase, ParallelStrategy):
    __doc__ = HorovodStrategyBase.__doc__
    lightning_package = "lightning.pytorch"


def callbacks_factory() -> list[Callback]:
    """The callbacks Lightning adds to every ``Trainer`` (entry point
    ``lightning.pytorch.callbacks_factory``): one :class:`DistributedPlateauCallback`."""
    return [DistributedPlateauCallback()]


register(HorovodStrategy, StrategyRegistry)
add_monitor_to_cli(LightningCLI)

# Snippets get copied between the two package names. When pytorch_lightning is already imported, register
# there too, so that its Trainer(strategy="horovod") works after importing this module; that imports
# no new package. Imported the other way round, nothing of ours runs before pytorch_lightning's Trainer
# rejects "horovod" (docs/troubleshooting.md).
if "pytorch_lightning" in sys.modules:
    import distplateau.pytorch_lightning  # noqa: F401
