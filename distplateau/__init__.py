"""Every rank of a distributed job takes the same ReduceLROnPlateau decision.

``import distplateau`` imports neither Horovod nor Lightning; ``distplateau.lightning``
holds the Lightning integration and is imported only when used.
"""

from .decide import NAN_POLICIES, REDUCTIONS, Decision, NanPolicy, Reduction, decide
from .gather import BACKENDS, Backend
from .scheduler import DistributedReduceLROnPlateau

__version__ = "0.1.0"

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
