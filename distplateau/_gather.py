"""One collective per step: the per-backend adapters that gather every rank's record.

Each adapter does exactly one collective in ``__call__`` and nothing else, and returns the
table as a list of rows in rank order; ``broadcast`` (for ``sync_state``) is likewise one
collective. Horovod and torch.distributed are imported only when their adapter is built, so
``import distplateau`` imports neither. :func:`world` says, without a collective, whether an
adapter still fits the job after an elastic reset.
"""

from __future__ import annotations

import math
import os
import struct
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, get_args

import torch

from ._messages import ranks_text

__all__ = ["Backend", "BACKENDS", "BROADCAST_BYTES", "Gather", "LocalGather", "TorchGather", "HorovodGather",
           "resolve", "select", "world"]

Backend = Literal["auto", "horovod", "torch", "none"]
BACKENDS: tuple[str, ...] = get_args(Backend)

# The name Horovod shows in its stall warnings when some ranks never reach step().
HOROVOD_OP_NAME = "distplateau.step"
#: Seconds a Horovod ``step()`` or ``sync_state()`` may wait for the other ranks; ``0``: no limit.
TIMEOUT_ENV = "DISTPLATEAU_HOROVOD_TIMEOUT_S"
#: The limit when :data:`TIMEOUT_ENV` is unset or empty: torch.distributed's default timeout for
#: gloo, so that a rank left waiting fails after the same time under either backend.
DEFAULT_TIMEOUT_S = 1800.0
#: A bounded Horovod wait first polls as ``hvd.synchronize`` does, yielding the CPU between polls,
#: for ``SPIN_S``: long enough for a collective whose ranks arrive together on an idle machine
#: (about 1.2 ms on 2 ranks, Horovod's cycle being 1 ms: sleeping from the first poll on made
#: such a step 1.02-1.05x as long as Horovod's blocking wait, polling for 2 ms first 0.98-0.99x),
#: and no longer, because a rank that keeps polling takes the CPU from the threads that run the
#: collective (with 4 ranks on 2 cores, or 2 cores shared with other jobs, Horovod's blocking
#: wait took 1.4-2.2x as long as this one). Then it sleeps a twentieth of the time waited so far
#: between polls, at most ``MAX_PAUSE_S``: a wait that ends after w seconds is noticed at most
#: w/20 or 50 ms late, and a rank waiting minutes for a slow peer wakes 20 times a second instead
#: of keeping a core busy. 0.2.0's fixed 1 ms sleep per poll made a 2-rank step on an idle
#: machine 1.36-1.66x as long. Measured with bench/horovod_wait.py (docs/benchmarks.md), 2026-12-06.
SPIN_S = 0.002
MAX_PAUSE_S = 0.05
#: Most bytes ``broadcast`` carries. Every rank must pass a buffer of the same size to a
#: broadcast, and only the source knows its payload's length, so the payload travels in a
#: buffer of this fixed size: one collective instead of a length broadcast plus a data
#: broadcast. A scheduler's state as JSON is ~0.5 KB plus ~40 bytes per parameter group.
BROADCAST_BYTES = 1 << 20
_LENGTH = struct.Struct("<q")  # the payload's length, at the head of the broadcast buffer


class Gather(Protocol):
    """Gathers one fixed-size record of floats from every rank of a group."""

    size: int  #: number of ranks in the group
    index: int  #: this process's row in the table
    ranks: tuple[int, ...]  #: global rank of each row, for messages

    def __call__(self, record: Sequence[float]) -> Sequence[Sequence[float]]: ...

    def broadcast(self, data: bytes, src: int) -> bytes:
        """Global rank ``src``'s ``data`` (at most :data:`BROADCAST_BYTES`), on every rank; other
        ranks' ``data`` is ignored."""
        ...


def _frame(data: bytes) -> bytearray:
    if len(data) > BROADCAST_BYTES:
        raise ValueError(f"broadcast carries at most {BROADCAST_BYTES} bytes, not {len(data)}")
    buffer = bytearray(_LENGTH.size + BROADCAST_BYTES)
    _LENGTH.pack_into(buffer, 0, len(data))
    buffer[_LENGTH.size : _LENGTH.size + len(data)] = data
    return buffer


def _unframe(buffer: bytes) -> bytes:
    (length,) = _LENGTH.unpack_from(buffer, 0)
    return bytes(buffer[_LENGTH.size : _LENGTH.size + length])


def _causes(call: str) -> str:
    return ("This rank cannot tell which of these happened: a rank skipped or repeated a "
            f"{call} call (every rank must call it the same number of times; a rank without "
            "validation data calls step(metric, weight=0)); a rank died or is frozen (look for its "
            "error or exit status); the network between the ranks failed.")


def _timed_out(call: str, rank: str, waited_s: float, group: str, limit: str, setting: str,
               backend_said: str = "") -> TimeoutError:
    """The error of a rank that waited ``waited_s`` in ``call``'s collective and gave up. Seen from
    one rank, a skipped call, a dead or frozen rank and a failed network look the same (in the
    multi-node fault runs all three ended here), so the message names all of them."""
    said = f" {backend_said}." if backend_said else ""
    return TimeoutError(
        f"{call} on {rank} gave up after waiting {waited_s:.1f}s ({limit}) for the other ranks of {group}."
        f"{said} {_causes(call)} If validation on some rank is only slow, raise {setting}."
    )


def _lost(call: str, rank: str, waited_s: float, group: str, backend_said: str) -> ConnectionError:
    """The error of a rank whose wait in ``call``'s collective ended because a peer closed its
    connection. A peer that exited closes it, and so does gloo on a peer whose own wait timed
    out first: after a skipped call, the ranks' timeouts end within milliseconds of each other,
    and all but the first may end here instead, so the message names the same causes."""
    return ConnectionError(
        f"{call} on {rank} lost the connection to another rank after waiting {waited_s:.1f}s for the "
        f"other ranks of {group}. {backend_said}. Another rank may have timed out first, in this "
        f"call or in another collective. {_causes(call)}"
    )


class LocalGather:
    """A single process: the table is this process's record, no collective."""

    size = 1
    index = 0

    def __init__(self, rank: int = 0) -> None:
        self.ranks: tuple[int, ...] = (rank,)

    def __call__(self, record: Sequence[float]) -> Sequence[Sequence[float]]:
        return (record,)

    def broadcast(self, data: bytes, src: int) -> bytes:
        return data


class TorchGather:
    """``torch.distributed.all_gather_single`` (``all_gather_into_tensor`` before torch 2.13;
    ``all_gather`` into views of the table on CPU before torch 2.4) of one float64 record per
    rank. When the process group's timeout expires in it, raises ``TimeoutError`` naming the
    causes a rank cannot tell apart, with torch's error chained."""

    _last_work: Any = None  # the latest step's finished collective, see _gather_into

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        self._group = group
        self.size = dist.get_world_size(group)
        self.index = dist.get_rank(group)
        if self.index < 0:
            raise ValueError(
                f"this process (global rank {dist.get_rank()}) is not a member of the group "
                "passed as `group`; build the scheduler only on the group's ranks"
            )
        self.ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(self.size))
        self._device = _device(group)
        self._all_gather: Callable[..., Any]
        if hasattr(dist, "all_gather_single"):
            self._all_gather = dist.all_gather_single
        elif self._device.type == "cpu" and _TORCH_VERSION < (2, 4):
            self._all_gather = _all_gather_into_views
        else:
            self._all_gather = dist.all_gather_into_tensor
        self._row: struct.Struct | None = None  # CPU: tensors over reused bytearrays, see _cpu

    def __call__(self, record: Sequence[float]) -> Sequence[Sequence[float]]:
        if self._device.type == "cpu":
            return self._cpu(record)
        local = torch.tensor(record, dtype=torch.float64, device=self._device)
        # Flat output: gloo accepts only the concatenated layout.
        table = torch.empty(self.size * len(record), dtype=torch.float64, device=self._device)
        self._gather_into(table, local)
        return table.view(self.size, len(record)).tolist()

    def _cpu(self, record: Sequence[float]) -> Sequence[Sequence[float]]:
        # The same collective on two tensors that alias bytearrays allocated once, filled and
        # read with struct. Kept because it buys more than 10% of a distributed step: a whole
        # step on 2 gloo ranks (2 cores, 2026-11-25) took 1.07-1.19x as long when each step
        # built its tensors (torch.tensor, torch.empty, tolist) and 1.12x with tensors reused
        # but filled by copy_, against this (the gather alone showed no difference).
        row = self._row
        if row is None or row.size != 8 * len(record):
            row = self._row = struct.Struct(f"={len(record)}d")
            self._send = bytearray(row.size)
            self._receive = bytearray(row.size * self.size)
            self._local = torch.frombuffer(self._send, dtype=torch.float64)
            self._table = torch.frombuffer(self._receive, dtype=torch.float64)
        row.pack_into(self._send, 0, *record)
        self._gather_into(self._table, self._local)
        return list(row.iter_unpack(self._receive))

    def _gather_into(self, table: torch.Tensor, local: torch.Tensor) -> None:
        started = time.monotonic()
        work = self._all_gather(table, local, group=self._group, async_op=True)
        self._wait(work, "step()", started)
        # gloo's worker thread lets go of its reference to the finished work (and so of the
        # tensors) only after wait() returns, and that release needs the GIL. If it is still
        # pending when the interpreter starts to exit (a script whose last collective is
        # this step), the worker dies in std::terminate and the process aborts. Holding the
        # work until the next step, in a class attribute that outlives this scheduler, makes
        # this thread, not gloo's, the one that frees it.
        TorchGather._last_work = work

    def broadcast(self, data: bytes, src: int) -> bytes:
        buffer = torch.frombuffer(_frame(data), dtype=torch.uint8).to(self._device)
        started = time.monotonic()
        work = torch.distributed.broadcast(buffer, src=src, group=self._group, async_op=True)
        self._wait(work, "sync_state()", started)
        TorchGather._last_work = work  # as in _gather_into
        return _unframe(buffer.cpu().numpy().tobytes())

    def _wait(self, work: Any, call: str, started: float) -> None:
        try:
            work.wait()
        except RuntimeError as err:
            # Read in torch 2.13: gloo says "Timed out waiting 10000ms for recv operation to
            # complete", NCCL's watchdog "collective operation timeout"; a peer that exited, or
            # whose own wait timed out a moment earlier, "Connection closed by peer" (or "reset
            # by peer", or "Broken pipe" on a write). Other failures pass unchanged.
            text = str(err)
            lowered = text.lower()
            timed_out = "timed out" in lowered or "timeout" in lowered
            if not timed_out and not any(lost in lowered for lost in _LOST_PEER):
                raise
            group = (f"the default process group ({self.size} ranks)" if self._group is None
                     else f"the group passed as `group` ({ranks_text(self.ranks)})")
            rank, waited = f"rank {torch.distributed.get_rank()}", time.monotonic() - started
            said = f"torch.distributed said: {text.rstrip('. ')}"
            if not timed_out:
                raise _lost(call, rank, waited, group, said) from err
            raise _timed_out(call, rank, waited, group, "the process group's timeout",
                             "the timeout passed to init_process_group(timeout=...)", said) from err


#: How gloo says that a peer closed the connection (torch 2.13).
_LOST_PEER = ("closed by peer", "reset by peer", "broken pipe")

_TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def _all_gather_into_views(table: torch.Tensor, local: torch.Tensor, group: Any = None, async_op: bool = False) -> Any:
    """``all_gather_into_tensor`` for CPU groups before torch 2.4: torch 2.1.2's gloo has none
    (``RuntimeError: no support for _allgather_base in Gloo process group``), 2.4.1's has (2.2 and
    2.3 were not measured, so they take this path too). ``all_gather`` into one view of ``table``
    per rank is the same single collective."""
    return torch.distributed.all_gather(list(table.split(local.numel())), local, group=group, async_op=async_op)


def _device(group: Any) -> torch.device:
    """Where ``group`` gathers: on CPU when it has a CPU backend (gloo, mpi, a mixed
    ``"cpu:gloo,cuda:nccl"`` group: the record is in CPU memory), else on its GPU (NCCL alone,
    also ``init_process_group()`` without a backend on a GPU machine, which ``get_backend``
    calls ``"undefined"``). torch's own object collectives choose the same way."""
    import torch.distributed as dist

    config = getattr(dist, "get_backend_config", None)  # "cpu:gloo", "cuda:nccl", ...
    on_cpu = "cpu:" in config(group) if config is not None else dist.get_backend(group) != "nccl"
    if on_cpu:
        return torch.device("cpu")
    # The GPU the group was bound to (init_process_group(device_id=...)), else the current one.
    bound = getattr(group if group is not None else dist.group.WORLD, "bound_device_id", None)
    return bound if bound is not None else torch.device("cuda", torch.cuda.current_device())


class HorovodGather:
    """``horovod.torch.allgather`` of one float64 record per rank of a process set.

    Horovod has no timeout for a collective that some rank never joins. So the same single
    allgather (a broadcast for ``sync_state``) is started asynchronously and waited for at most
    ``DISTPLATEAU_HOROVOD_TIMEOUT_S`` seconds, read when the adapter is built (at the first
    step, and again after an elastic reset); unset or empty: :data:`DEFAULT_TIMEOUT_S`, the
    30 minutes torch.distributed gives gloo; ``0``: no limit (Horovod's own blocking wait). Past
    the limit it raises ``TimeoutError`` naming the causes a rank cannot tell apart.

    Raises:
        ValueError: ``DISTPLATEAU_HOROVOD_TIMEOUT_S`` is not a number of seconds >= 0. Raised
            before the collective, so a rank that raises it leaves no collective behind; every
            rank reads the same environment as a rule, so every rank raises it at the same step.
    """

    def __init__(self, process_set: Any = None) -> None:
        import horovod.torch as hvd

        self._hvd = hvd
        #: seconds a collective may wait, or ``None``: no limit
        self.timeout, self._limit = _horovod_timeout(hvd.rank())
        self._process_set = hvd.global_process_set if process_set is None else process_set
        if not self._process_set.included():
            raise ValueError(
                f"this process (Horovod rank {hvd.rank()}) is not in the process set passed as "
                "`process_set`; build the scheduler only on the process set's ranks"
            )
        self.size = self._process_set.size()
        self.index = self._process_set.rank()
        ranks = self._process_set.ranks
        self.ranks = tuple(ranks) if ranks else tuple(range(self.size))

    def __call__(self, record: Sequence[float]) -> Sequence[Sequence[float]]:
        local = torch.tensor([record], dtype=torch.float64)
        if self.timeout is None:
            table = self._hvd.allgather(local, name=HOROVOD_OP_NAME, process_set=self._process_set)
            return table.tolist()
        handle = self._hvd.allgather_async(local, name=HOROVOD_OP_NAME, process_set=self._process_set)
        return self._wait(handle, "step()").tolist()

    def broadcast(self, data: bytes, src: int) -> bytes:
        buffer = torch.frombuffer(_frame(data), dtype=torch.uint8)
        handle = self._hvd.broadcast_async_(buffer, root_rank=src, name="distplateau.sync_state",
                                            process_set=self._process_set)
        return _unframe(self._wait(handle, "sync_state()").numpy().tobytes())

    def _wait(self, handle: Any, call: str) -> torch.Tensor:
        if self.timeout is None:
            return self._hvd.synchronize(handle)
        started = time.monotonic()
        # A peer that dies (an elastic reset) completes the handle with an error: poll() turns
        # True and synchronize() raises Horovod's HorovodInternalError, as without a limit.
        while not self._hvd.poll(handle):
            waited = time.monotonic() - started
            if waited > self.timeout:
                members = self._process_set
                group = (f"the global process set ({self.size} ranks)" if members.process_set_id == 0
                         else f"Horovod process set {members.process_set_id} ({ranks_text(self.ranks)})")
                raise _timed_out(call, f"Horovod rank {self._hvd.rank()}", waited, group, self._limit,
                                 f"{TIMEOUT_ENV} (seconds; 0 waits forever)")
            if waited < SPIN_S:
                os.sched_yield()
            else:
                time.sleep(min(MAX_PAUSE_S, waited / 20))
        return self._hvd.synchronize(handle)


def _horovod_timeout(rank: int) -> tuple[float | None, str]:
    """:data:`TIMEOUT_ENV` read from this process's environment: the limit in seconds (``None``:
    no limit) and how the timeout message names it."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S, f"the default limit, {TIMEOUT_ENV} unset"
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(
            f"{TIMEOUT_ENV}={text!r} on Horovod rank {rank} is not a number of seconds >= 0: set it to the "
            f"longest a step() may wait for the other ranks, to 0 to wait forever, or unset it for the "
            f"default of {DEFAULT_TIMEOUT_S:g} seconds"
        )
    return (None, "") if seconds == 0 else (seconds, f"{TIMEOUT_ENV}={text}")


def _horovod_initialized() -> bool:
    hvd = sys.modules.get("horovod.torch")  # never import Horovod just to look
    return hvd is not None and bool(hvd.is_initialized())


def _torch_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def resolve(backend: Backend, *, process_set: Any = None, group: Any = None) -> Backend:
    """The backend ``"auto"`` stands for now: the first initialized of Horovod,
    torch.distributed, and a single process; any other backend as it is."""
    if backend != "auto":
        return backend
    if process_set is not None or _horovod_initialized():
        return "horovod"
    if group is not None or _torch_initialized():
        return "torch"
    return "none"


def world(backend: Backend, *, process_set: Any = None, group: Any = None) -> tuple[Any, ...]:
    """What an adapter for ``backend`` (not ``"auto"``) depends on, read without a collective:
    this process's rank in the group and the group's size (and, under Horovod, the process
    set's id). A reset of Horovod elastic (``shutdown()`` then ``init()``) or a process group
    created again changes it; an adapter built for another value must be built again.
    About 1 us under Horovod or torch.distributed; ``()`` for ``"none"``, whose world of one
    process never changes, so that there is nothing to check.
    """
    if backend == "horovod" and _horovod_initialized():
        hvd = sys.modules["horovod.torch"]
        members = hvd.global_process_set if process_set is None else process_set
        if not members.included():  # rank() would raise; select() says what is wrong
            return backend, members.process_set_id
        return backend, members.process_set_id, members.rank(), members.size()
    if backend == "torch" and _torch_initialized():
        return backend, torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
    if backend == "none":
        return ()
    return (backend,)  # not initialized: select() says so


def select(backend: Backend, *, process_set: Any = None, group: Any = None) -> Gather:
    """Build the adapter for ``backend``; ``"auto"`` picks as :func:`resolve` does. A group
    of one rank gathers locally.

    Raises:
        RuntimeError: the requested backend is not initialized.
    """
    backend = resolve(backend, process_set=process_set, group=group)
    gather: Gather
    if backend == "none":
        return LocalGather()
    if backend == "horovod":
        if not _horovod_initialized():
            raise RuntimeError(
                "backend='horovod' but Horovod is not initialized: call "
                "horovod.torch.init() before the first step()"
            )
        gather = HorovodGather(process_set)
    else:
        if not _torch_initialized():
            raise RuntimeError(
                "backend='torch' but torch.distributed is not initialized: call "
                "torch.distributed.init_process_group() before the first step()"
            )
        gather = TorchGather(group)
    return LocalGather(gather.ranks[0]) if gather.size == 1 else gather
