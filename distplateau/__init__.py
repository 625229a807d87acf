"""Every rank of a distributed job takes the same ReduceLROnPlateau decision.

The public API is what this package exports: the scheduler, the types and values of its
settings, and :func:`decide`, the pure decision every rank takes (for testing a policy
without processes). ``distplateau.lightning`` and ``distplateau.pytorch_lightning`` hold the
Lightning integration, ``distplateau.elastic`` the Horovod elastic handler,
``distplateau.transformers`` the check for Hugging Face ``Trainer``. Modules whose name starts
with an underscore are internal. ``import distplateau`` imports neither Horovod, Lightning nor
Transformers.
"""

from ._decide import NAN_POLICIES, REDUCTIONS, Decision, NanPolicy, Reduction, decide
from ._gather import BACKENDS, Backend
from .scheduler import DistributedReduceLROnPlateau

__version__ = "0.2.0"

__all__ = [
    "BACKENDS",
    "NAN_POLICIES",
    "REDUCTIONS",
    "Backend",
    "Decision",
    "DistributedReduceLROnPlateau",
    "NanPolicy",
    "Reduction",
    "decide",
]
