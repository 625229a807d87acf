"""What a real-client case records on each rank, and the checks run on it afterwards.

A case (``tests/clients/<library>.py``) runs a library's own training path on 2 real ranks,
once per variant:

- ``"torch"``: torch's ``ReduceLROnPlateau``, built and stepped by the library as it is;
- ``"ours"``: ``DistributedReduceLROnPlateau`` swapped in through the library's seam;
- ``"resume-1"`` / ``"resume-2"``: ours again, stopped after a few epochs with the library's own
  checkpoint, then resumed from it in a second launch.

Before the library builds anything, the case calls :func:`install` on every rank. It wraps the
``step`` of both classes *at class level*: no subclass is handed to the library, so an exact-class
check in the library (``policy not in [ReduceLROnPlateau]``) sees the class it would see without
us. Every step then appends one row to ``<out>/<variant>/rank<r>.json``: the scheduler's state
before the step, the metric (and for ours, the weight, the gathered global value and the number of
collectives issued inside the step) and the learning rates after it.

The checks (:func:`diverged`, :func:`check_ours`, :func:`check_resume`) are pure functions of
those files, run by ``tests/clients/run.py`` and ``tests/test_clients.py`` in one process.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

Row = dict[str, Any]
Ranks = list[list[Row]]  # per rank, its rows in step order

VARIANTS = ("torch", "ours", "resume-1", "resume-2")
# torch.distributed calls counted while our step() runs: the collective it issues is one of these.
_COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_gather_object", "all_reduce",
                "broadcast", "broadcast_object_list", "barrier", "reduce", "gather", "scatter")
_counting: dict[str, int | None] = {"collectives": None}  # a count while our step() runs, else None
_paused = {"replay": False}  # write_reference's replay in a recording process is not the run's


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def _lrs(scheduler: Any) -> list[float]:
    return [float(group["lr"]) for group in scheduler.optimizer.param_groups]


def _state(scheduler: Any) -> Row:
    best = float(scheduler.best)
    return {"best": best if math.isfinite(best) else str(best), "num_bad_epochs": scheduler.num_bad_epochs,
            "cooldown_counter": scheduler.cooldown_counter, "last_epoch": scheduler.last_epoch, "lrs": _lrs(scheduler)}


def _settings(scheduler: Any) -> Row:
    return {"mode": scheduler.mode, "factor": scheduler.factor, "patience": scheduler.patience,
            "threshold": scheduler.threshold, "threshold_mode": scheduler.threshold_mode,
            "cooldown": scheduler.cooldown, "min_lrs": [float(v) for v in scheduler.min_lrs],
            "eps": scheduler.eps, "smoothing_factor": float(getattr(scheduler, "smoothing_factor", 0.0))}


def install(out: str | Path, variant: str) -> None:
    """Record every plateau step of this process into ``<out>/<variant>/rank<r>.json``."""
    import torch.distributed as dist
    from torch.optim.lr_scheduler import ReduceLROnPlateau

    from distplateau import DistributedReduceLROnPlateau

    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: use one of {VARIANTS}")
    folder = Path(out) / variant
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []

    def save(row: Row) -> None:
        rows.append(row)
        path = folder / f"rank{_rank()}.json"
        path.write_text(json.dumps(rows))  # rewritten at every step: a crash keeps what was stepped

    torch_step = ReduceLROnPlateau.step
    ours_step = DistributedReduceLROnPlateau.step

    @functools.wraps(torch_step)
    def recorded_torch_step(self: Any, metrics: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(self, DistributedReduceLROnPlateau) or _paused["replay"]:  # ours, calling its parent
            return torch_step(self, metrics, *args, **kwargs)
        before = _state(self)
        result = torch_step(self, metrics, *args, **kwargs)
        save({"class": "torch", "before": before, "after": _state(self), "settings": _settings(self),
              "metric": float(metrics), "lrs": _lrs(self)})
        return result

    @functools.wraps(ours_step)
    def recorded_ours_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = _bind(ours_step, self, args, kwargs)
        weight = bound.get("weight")
        weight = self.default_weight if weight is None else weight
        before = _state(self)
        _counting["collectives"] = 0
        try:
            result = ours_step(self, *args, **kwargs)
        finally:
            collectives, _counting["collectives"] = _counting["collectives"], None
        save({"class": "ours", "before": before, "after": _state(self), "settings": _settings(self),
              "metric": float(bound["metrics"]), "weight": 1.0 if weight is None else float(weight),
              "global": self.last_global_metric, "collectives": collectives, "lrs": _lrs(self)})
        return result

    ReduceLROnPlateau.step = recorded_torch_step  # type: ignore[method-assign]
    DistributedReduceLROnPlateau.step = recorded_ours_step  # type: ignore[method-assign]
    for name in _COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, _counted(getattr(dist, name)))


def _bind(function: Callable[..., Any], self: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    import inspect

    bound = inspect.signature(function).bind(self, *args, **kwargs)
    return dict(bound.arguments)


def _counted(collective: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(collective)
    def counted(*args: Any, **kwargs: Any) -> Any:
        if _counting["collectives"] is not None:
            _counting["collectives"] += 1
        return collective(*args, **kwargs)

    return counted


def load(out: str | Path, variant: str, world: int) -> Ranks:
    """Every rank's rows of ``variant`` (an empty list for a rank that wrote none)."""
    folder = Path(out) / variant
    return [json.loads(path.read_text()) if (path := folder / f"rank{r}.json").exists() else []
            for r in range(world)]


def diverged(ranks: Ranks) -> bool:
    """Whether the ranks' learning rates differ after some step (or they stepped unequally often)."""
    if len({len(rows) for rows in ranks}) > 1:
        return True
    return any(len({json.dumps(row["lrs"]) for row in step}) > 1 for step in zip(*ranks))


def same_as_rank0(ranks: Ranks, keys: tuple[str, ...] = ("lrs",)) -> bool:
    """Every rank has rank 0's number of steps and rank 0's ``keys`` at every step."""
    return all(len(rows) == len(ranks[0]) and all(row[k] == first[k] for row, first in zip(rows, ranks[0])
                                                   for k in keys) for rows in ranks)


def replay(settings: Row, initial_lrs: list[float], metrics: list[float],
           scheduler_class: type | None = None) -> list[list[float]]:
    """torch's ``ReduceLROnPlateau`` (or ``scheduler_class``, a library's own plateau class that
    takes its ``smoothing_factor``) in one process, stepped on ``metrics``: the learning rates
    after each step."""
    import torch
    from torch.optim.lr_scheduler import ReduceLROnPlateau

    params = [torch.zeros(1, requires_grad=True) for _ in initial_lrs]
    optimizer = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, initial_lrs)], lr=initial_lrs[0])
    smoothing = {"smoothing_factor": settings["smoothing_factor"]} if scheduler_class else {}
    scheduler = (scheduler_class or ReduceLROnPlateau)(
        optimizer, mode=settings["mode"], factor=settings["factor"], patience=settings["patience"],
        threshold=settings["threshold"], threshold_mode=settings["threshold_mode"], cooldown=settings["cooldown"],
        min_lr=settings["min_lrs"], eps=settings["eps"], **smoothing)
    out = []
    for metric in metrics:
        scheduler.step(metric)
        out.append([float(group["lr"]) for group in optimizer.param_groups])
    return out


def write_reference(out: str | Path, variant: str, scheduler_class: type) -> None:
    """For a library with a plateau class of its own (schnetpack's, with ``smoothing_factor``):
    on rank 0, after a run of ours, the learning rates that class gives in one process on the
    run's global values, into ``<out>/<variant>/reference.json`` for :func:`check_ours`. Run in
    the case's own environment, where the library is installed."""
    rows = load(out, variant, 1)[0]
    _paused["replay"] = True
    try:
        lrs = replay(rows[0]["settings"], rows[0]["before"]["lrs"], [row["global"] for row in rows], scheduler_class)
    finally:
        _paused["replay"] = False
    name = f"{scheduler_class.__module__}.{scheduler_class.__qualname__}"
    (Path(out) / variant / "reference.json").write_text(json.dumps({"class": name, "lrs": lrs}))


def load_reference(out: str | Path, variant: str) -> Row | None:
    """What :func:`write_reference` wrote for ``variant``, if it did."""
    path = Path(out) / variant / "reference.json"
    return json.loads(path.read_text()) if path.exists() else None


def global_mean(step: list[Row]) -> float:
    """The exact global value of one step: every rank's local metric weighted by its weight (a
    rank with weight 0 contributes nothing, not even a NaN: the step a resumed Lightning run
    retakes comes from rank 0 alone)."""
    rows = [row for row in step if row["weight"] > 0]
    return sum(row["metric"] * row["weight"] for row in rows) / sum(row["weight"] for row in rows)


def check_ours(ranks: Ranks, min_steps: int = 2, reference: Row | None = None) -> list[str]:
    """What is wrong with a run of ours (an empty list: nothing): every rank stepped as often, with
    identical learning rates and global values; each global value is the weighted mean of the
    ranks' local metrics; torch's class in one process on those values gives the same learning
    rates (with ``smoothing_factor``, the library's own class of ``reference``, which
    :func:`write_reference` replayed); each step issued exactly one collective."""
    problems = []
    steps = [len(rows) for rows in ranks]
    if min(steps) < min_steps:
        return [f"ranks stepped {steps} times, fewer than {min_steps}"]
    if not same_as_rank0(ranks, ("lrs", "global")):
        problems.append("learning rates or global values differ across ranks")
    rows = ranks[0]
    exact = [global_mean(list(step)) for step in zip(*ranks)]
    seen = [row["global"] for row in rows]
    if any(not math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0) for a, b in zip(seen, exact)):
        problems.append(f"global values {seen} are not the weighted means {exact}")
    if reference is not None:
        expected, whose = reference["lrs"], reference["class"]
    elif rows[0]["settings"]["smoothing_factor"]:
        return problems + ["smoothing_factor without a reference: torch's class does not smooth (write_reference)"]
    else:
        expected, whose = replay(rows[0]["settings"], rows[0]["before"]["lrs"], seen), "torch's class"
    if [row["lrs"] for row in rows] != expected:
        problems.append(f"learning rates {[row['lrs'] for row in rows]} are not {whose}'s on the global values: "
                        f"{expected}")
    counts = sorted({row["collectives"] for rank in ranks for row in rank})
    if counts != [1]:
        problems.append(f"collectives per step: {counts}, not [1]")
    return problems


def check_resume(first: Ranks, second: Ranks, whole: Ranks | None, reference: Row | None = None) -> list[str]:
    """What is wrong with a resumed run: the scheduler's state at the first step after the
    resume must be the state after the last step before it, on every rank; the two parts
    together must step as the uninterrupted run ``whole`` did (same global values, same
    learning rates), unless ``whole`` is ``None``: a library whose resume does not repeat the
    uninterrupted run (MACE trains the checkpointed epoch again)."""
    if not first[0] or not second[0]:
        return [f"a part did not step (before the resume: {len(first[0])} steps, after: {len(second[0])})"]
    # The checkpoint may hold the state of an earlier step than the first part's last: Lightning's
    # ModelCheckpoint saves at the end of the training epoch, before the epoch's plateau step,
    # which distplateau's callback keeps as pending and takes right after the resume.
    kept = second[0][0]["before"]["last_epoch"] - first[0][0]["before"]["last_epoch"]
    if not 0 < kept <= len(first[0]):
        return [f"resumed at step {second[0][0]['before']['last_epoch']}, outside the first part's steps"]
    problems = []
    for rank, (a, b) in enumerate(zip(first, second)):
        if b[0]["before"] != a[kept - 1]["after"]:
            problems.append(f"rank {rank}: checkpointed with {a[kept - 1]['after']}, resumed with {b[0]['before']}")
    joined = [a[:kept] + b for a, b in zip(first, second)]
    if whole is None:
        return problems + check_ours(joined, reference=reference)
    if [row["global"] for row in joined[0]] != [row["global"] for row in whole[0]]:
        problems.append("global values differ from the uninterrupted run's: "
                        f"{[row['global'] for row in joined[0]]} vs {[row['global'] for row in whole[0]]}")
    if [row["lrs"] for row in joined[0]] != [row["lrs"] for row in whole[0]]:
        problems.append("learning rates differ from the uninterrupted run's")
    # The same global values as the uninterrupted run: its reference holds for the two parts too.
    return problems + check_ours(joined, reference=reference)
