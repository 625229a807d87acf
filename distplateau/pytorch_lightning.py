"""distplateau for ``pytorch_lightning`` (package ``pytorch-lightning``): the Horovod strategy and the
callback that keeps :class:`~distplateau.DistributedReduceLROnPlateau` in step on every rank.

Importing this module imports ``pytorch_lightning`` (never Horovod), registers
``Trainer(strategy="horovod")`` and makes ``LightningCLI`` hand the scheduler's ``monitor`` to
Lightning. If ``lightning.pytorch`` is already imported, it also imports
:mod:`distplateau.lightning`, so that ``strategy="horovod"`` works for either package's ``Trainer``.
The callback is attached to every ``Trainer`` automatically through the
``pytorch_lightning.callbacks_factory`` entry point when distplateau is pip-installed. These are the
classes of :mod:`distplateau.lightning`, built on ``pytorch_lightning``'s: one implementation, two
class hierarchies, as Lightning itself ships.
"""

from __future__ import annotations

import sys

from pytorch_lightning.callbacks import Callback
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.strategies import ParallelStrategy, StrategyRegistry
from pytorch_lightning.utilities.data import extract_batch_size
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from ._lightning.callback import PlateauCallbackBase, add_monitor_to_cli, attach_monitor
from ._lightning.horovod import HorovodStrategyBase, register

__all__ = ["DistributedPlateauCallback", "HorovodStrategy", "attach_monitor", "callbacks_factory"]


class DistributedPlateauCallback(PlateauCallbackBase, Callback):
    __doc__ = PlateauCallbackBase.__doc__
    misconfiguration_error = MisconfigurationException
    extract_batch_size = staticmethod(extract_batch_size)


class HorovodStrategy(HorovodStrategyBase, ParallelStrategy):
    __doc__ = HorovodStrategyBase.__doc__
    lightning_package = "pytorch_lightning"


def callbacks_factory() -> list[Callback]:
    """The callbacks Lightning adds to every ``Trainer`` (entry point
    ``pytorch_lightning.callbacks_factory``): one :class:`DistributedPlateauCallback`."""
    return [DistributedPlateauCallback()]


register(HorovodStrategy, StrategyRegistry)
add_monitor_to_cli(LightningCLI)

# Snippets get copied between the two package names. When lightning.pytorch is already imported, register
# there too, so that its Trainer(strategy="horovod") works after importing this module; that imports
# no new package. Imported the other way round, nothing of ours runs before lightning.pytorch's Trainer
# rejects "horovod" (docs/troubleshooting.md).
if "lightning.pytorch" in sys.modules:
    import distplateau.lightning  # noqa: F401
