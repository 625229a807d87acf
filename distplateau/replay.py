"""Replay a logged metric through :class:`~distplateau.DistributedReduceLROnPlateau`:
``python -m distplateau.replay FILE --column NAME [settings] [--sweep NAME=A,B,...] [--plot out.png]``.

The decisions of the scheduler are a pure function of the series of global values it stepped on,
so a logged series (the ``<monitor>/global`` column that the Lightning callback logs, or any
metric) shows what any other setting would have done, without training again. The replay runs
the same class in one process (``backend="none"``) on the series, one step per value, and prints
the steps where the learning rate would drop and where ``stop_patience`` would stop training;
``--sweep`` prints one line per combination of settings; ``--plot`` draws the metric, its
smoothing, ``best`` and the learning-rate staircase (matplotlib needed).

Inputs: a CSV file with a header (Lightning's ``CSVLogger`` ``metrics.csv``: rows without a value
in the column are skipped; the ``step`` column, if any, gives the x axis), a JSON file (a list
of numbers, or an object of named lists), or TensorBoard event files (a directory that holds them,
such as a ``TensorBoardLogger``'s ``version_0``, or one ``events.out.tfevents.*`` file; the column
is the scalar's tag and the x axis the events' steps; the ``tensorboard`` package reads them).
Bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .scheduler import DistributedReduceLROnPlateau

__all__ = ["Replay", "ReplayError", "read_series", "replay", "main"]

#: The settings a replay takes, with their types: the constructor's arguments that decide.
SETTINGS: dict[str, Any] = {
    "mode": str, "factor": float, "patience": int, "threshold": float, "threshold_mode": str,
    "cooldown": int, "min_lr": float, "eps": float, "stop_patience": int, "warmup": int,
    "warmup_start_factor": float, "smoothing_factor": float, "nan_policy": str,
}


class ReplayError(ValueError):
    """Input the replay cannot use: the CLI prints it as one line and exits with status 2."""


@dataclass
class Replay:
    """What the scheduler did on a series: per value, the learning rate after its step (and the
    smoothed value and ``best``), the cuts and the stop."""

    settings: dict[str, Any]
    steps: list[float]  # the x axis: the logged step of each value, else its index
    values: list[float]
    lrs: list[float] = field(default_factory=list)
    smoothed: list[float | None] = field(default_factory=list)
    best: list[float] = field(default_factory=list)
    cuts: list[tuple[int, float, float]] = field(default_factory=list)  # (index, lr before, lr after)
    stop: int | None = None  # index of the step after which should_stop turned True

    @property
    def final_lr(self) -> float:
        return self.lrs[-1]


def read_series(path: str | Path, column: str | None = None) -> tuple[list[float], list[float]]:
    """The ``(steps, values)`` of ``column`` in a CSV or JSON file, or of the scalar tag ``column``
    in TensorBoard event files (a directory or one file; see the module docstring).

    Raises:
        ReplayError: no such file, column or tag, a value that is not a number, no value at all,
            a directory without event files, event files without the ``tensorboard`` package.
    """
    path = Path(path)
    if path.is_dir() or (path.is_file() and _is_event_file(path)):
        return _tensorboard_series(path, column)
    if not path.is_file():
        raise ReplayError(f"{path}: no such file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ReplayError(f"{path}: cannot read it: {err}") from None
    if path.suffix.lower() == ".json":
        return _json_series(path, text, column)
    return _csv_series(path, text, column)


def _number(path: Path, where: str, raw: Any) -> float:
    if isinstance(raw, bool):
        raise ReplayError(f"{path}: {where}: {raw!r} is not a number")
    try:
        return float(raw)
    except (TypeError, ValueError):
        raise ReplayError(f"{path}: {where}: {raw!r} is not a number") from None


def _json_series(path: Path, text: str, column: str | None) -> tuple[list[float], list[float]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ReplayError(f"{path}: not JSON: {err}") from None
    if isinstance(data, dict):
        if column is None or column not in data:
            names = ", ".join(map(repr, data)) or "none"
            raise ReplayError(f"{path}: give --column, one of the file's lists: {names}" if column is None
                              else f"{path}: no list named {column!r}; the file has {names}")
        data = data[column]
    if not isinstance(data, list):
        raise ReplayError(f"{path}: expected a list of numbers (or an object of named lists)")
    values = [_number(path, f"item {i}", v) for i, v in enumerate(data)]
    if not values:
        raise ReplayError(f"{path}: no values")
    return [float(i) for i in range(len(values))], values


def _csv_series(path: Path, text: str, column: str | None) -> tuple[list[float], list[float]]:
    rows = list(csv.DictReader(text.splitlines()))
    names = list(rows[0]) if rows else next(csv.reader(text.splitlines()), [])
    if not names:
        raise ReplayError(f"{path}: empty file")
    if column is None:
        candidates = [n for n in names if n not in ("step", "epoch")]
        if len(candidates) != 1:
            raise ReplayError(f"{path}: give --column, one of: {', '.join(names)}")
        column = candidates[0]
    if column not in names:
        raise ReplayError(f"{path}: no column {column!r}; the columns are: {', '.join(names)}")
    steps, values = [], []
    for line, row in enumerate(rows, start=2):
        raw = (row.get(column) or "").strip()
        if not raw:
            continue  # Lightning's metrics.csv: a row of other metrics
        values.append(_number(path, f"line {line}, column {column!r}", raw))
        step = (row.get("step") or "").strip()
        steps.append(_number(path, f"line {line}, column 'step'", step) if step else float(len(values) - 1))
    if not values:
        raise ReplayError(f"{path}: column {column!r} has no values")
    return steps, values


def _is_event_file(path: Path) -> bool:
    return "tfevents" in path.name  # tensorboard's own test (event_accumulator.IsTensorFlowEventsFile)


def _tensorboard_series(path: Path, column: str | None) -> tuple[list[float], list[float]]:
    if path.is_dir() and not any(_is_event_file(p) and p.is_file() for p in path.iterdir()):
        below = sorted({str(p.parent) for p in path.rglob("*tfevents*") if p.is_file()})
        if below:  # e.g. a TensorBoardLogger's root, with version_0, version_1, ... under it
            raise ReplayError(f"{path} holds no TensorBoard event files itself; give one of the directories "
                              f"that do: {', '.join(below)}")
        raise ReplayError(f"{path} is a directory without TensorBoard event files: give one that holds them, "
                          "a CSV file (a Lightning CSVLogger's metrics.csv) or a JSON file")
    try:
        from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
    except ImportError:
        raise ReplayError(f"{path}: reading TensorBoard event files needs tensorboard: "
                          "pip install tensorboard") from None
    events = EventAccumulator(str(path), size_guidance={SCALARS: 0})  # 0: keep every value, not a sample
    events.Reload()
    tags = list(events.Tags()["scalars"])
    if not tags:
        raise ReplayError(f"{path}: the event files hold no scalars")
    if column is None:
        candidates = [t for t in tags if t != "epoch"]
        if len(candidates) != 1:
            raise ReplayError(f"{path}: give --column, one of the scalar tags: {', '.join(tags)}")
        column = candidates[0]
    if column not in tags:
        raise ReplayError(f"{path}: no scalar tag {column!r}; the tags are: {', '.join(tags)}")
    scalars = events.Scalars(column)
    return [float(e.step) for e in scalars], [float(e.value) for e in scalars]


def replay(values: Sequence[float], settings: dict[str, Any] | None = None, lr: float = 1.0,
           steps: Sequence[float] | None = None) -> Replay:
    """Step a :class:`~distplateau.DistributedReduceLROnPlateau` (one process, ``backend="none"``)
    built with ``settings`` on an optimizer at learning rate ``lr``, once per value.

    Example:
        >>> result = replay([1.0, 0.9, 0.9, 0.9, 0.9], {"patience": 1, "factor": 0.5})
        >>> result.lrs, result.cuts
        ([1.0, 1.0, 1.0, 0.5, 0.5], [(3, 1.0, 0.5)])
    """
    settings = dict(settings or {})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = DistributedReduceLROnPlateau(optimizer, backend="none", **settings)
    result = Replay(settings, [float(s) for s in steps] if steps is not None else
                    [float(i) for i in range(len(values))], [float(v) for v in values])
    for index, value in enumerate(result.values):
        before = float(optimizer.param_groups[0]["lr"])
        scheduler.step(value)
        after = float(optimizer.param_groups[0]["lr"])
        if after < before:
            result.cuts.append((index, before, after))
        result.lrs.append(after)
        result.smoothed.append(scheduler.last_smoothed_metric)
        result.best.append(float(scheduler.best))
        if result.stop is None and scheduler.should_stop:
            result.stop = index
    return result


def _step_text(step: float) -> str:
    return str(int(step)) if step == int(step) else repr(step)


def _settings_text(settings: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in settings.items()) or "(defaults)"


def _table(result: Replay) -> str:
    lines = [f"{'#':>5} {'step':>8} {'value':>12} {'smoothed':>12} {'best':>12}  learning rate"]
    events = [(i, f"{before:g} -> {after:g}") for i, before, after in result.cuts]
    if result.stop is not None:
        events.append((result.stop, f"stop (stop_patience={result.settings.get('stop_patience')})"))
    for i, what in sorted(events, key=lambda e: e[0]):
        smoothed = result.smoothed[i] if result.settings.get("smoothing_factor") else None
        lines.append(f"{i + 1:>5} {_step_text(result.steps[i]):>8} {result.values[i]:>12.6g} "
                     f"{'-' if smoothed is None else format(smoothed, '.6g'):>12} {result.best[i]:>12.6g}  {what}")
    if len(lines) == 1:
        lines.append("      (no cut)")
    return "\n".join(lines)


def _sweep_line(result: Replay) -> str:
    first = _step_text(result.steps[result.cuts[0][0]]) if result.cuts else "-"
    stop = _step_text(result.steps[result.stop]) if result.stop is not None else "-"
    return (f"{_settings_text(result.settings):<40} cuts {len(result.cuts):>3}  first cut at step {first:>6}  "
            f"stop at step {stop:>6}  final lr {result.final_lr:g}")


def _plot(results: list[Replay], path: str, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ReplayError("--plot needs matplotlib: pip install matplotlib "
                          "(or distplateau[docs])") from None
    base = results[0]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 5.5), height_ratios=[3, 2])
    top.plot(base.steps, base.values, ".-", color="0.5", label="metric (global)")
    if base.settings.get("smoothing_factor"):
        top.plot(base.steps, [math.nan if s is None else s for s in base.smoothed], "-", label="smoothed")
    top.plot(base.steps, [b if math.isfinite(b) else math.nan for b in base.best], "--", label="best")
    for i, _, _ in base.cuts:
        top.axvline(base.steps[i], color="C3", alpha=0.3)
    top.set_ylabel(title)
    top.legend(loc="best", fontsize="small")
    for result in results:
        label = _settings_text(result.settings) if len(results) > 1 else "learning rate"
        bottom.step(result.steps, result.lrs, where="post", label=label)
    bottom.set_yscale("log")
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("step")
    bottom.legend(loc="best", fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _parse_sweep(items: list[str]) -> list[tuple[str, list[Any]]]:
    sweeps = []
    for item in items:
        name, _, raw = item.partition("=")
        name = name.strip().replace("-", "_")
        if name not in SETTINGS or not raw:
            raise ReplayError(f"--sweep {item!r}: expected NAME=A,B,... with NAME one of {', '.join(SETTINGS)}")
        try:
            sweeps.append((name, [SETTINGS[name](v.strip()) for v in raw.split(",")]))
        except ValueError:
            raise ReplayError(f"--sweep {item!r}: {name} takes {SETTINGS[name].__name__} values") from None
    return sweeps


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distplateau.replay",
        description="Replay a logged metric through DistributedReduceLROnPlateau: where would the "
                    "learning rate drop, and training stop, with these settings?")
    parser.add_argument("file", help="a CSV file with a header (Lightning CSVLogger's metrics.csv), a JSON file, "
                                     "or TensorBoard event files (their directory, or one file)")
    parser.add_argument("--column", help="the column (JSON list, TensorBoard scalar tag) of the metric, "
                                         "e.g. val_loss/global")
    parser.add_argument("--lr", type=float, default=1.0, help="the initial learning rate (default 1.0)")
    for name, kind in SETTINGS.items():
        parser.add_argument(f"--{name}", *([f"--{name.replace('_', '-')}"] if "_" in name else []), dest=name,
                            type=kind, help=f"the scheduler's {name}")
    parser.add_argument("--sweep", action="append", default=[], metavar="NAME=A,B,...",
                        help="replay every combination of these values (repeatable)")
    parser.add_argument("--plot", metavar="OUT.png", help="draw the metric and the learning rates (matplotlib)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (2: bad input, after one line on stderr)."""
    parser = _parser()
    args = parser.parse_args(argv)  # argparse's own errors: a usage line and status 2
    try:
        steps, values = read_series(args.file, args.column)
        fixed = {name: getattr(args, name) for name in SETTINGS if getattr(args, name) is not None}
        sweeps = _parse_sweep(args.sweep)
        combos = [dict(fixed, **dict(zip([n for n, _ in sweeps], combo)))
                  for combo in itertools.product(*[v for _, v in sweeps])] if sweeps else [fixed]
        try:
            results = [replay(values, combo, args.lr, steps) for combo in combos]
        except (TypeError, ValueError) as err:
            raise ReplayError(f"bad settings: {err}") from None
        name = args.column or "metric"
        print(f"replay of {name} in {args.file}: {len(values)} values, steps {_step_text(steps[0])} to "
              f"{_step_text(steps[-1])}, initial lr {args.lr:g}")
        if sweeps:
            for result in results:
                print(_sweep_line(result))
        else:
            print(f"settings: {_settings_text(fixed)}")
            print(_table(results[0]))
            print(f"final lr {results[0].final_lr:g}")
        if args.plot:
            _plot(results, args.plot, name)
            print(f"plot: {args.plot}")
    except ReplayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
