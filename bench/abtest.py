"""Side-by-side timing: variants run in alternating blocks, so drift cancels out.

Every block times ``iters`` calls of each variant, back to back, in an order that rotates
from block to block. Each block yields one ratio per variant (its time per call over the
baseline's, both from the same block); the result is the median ratio, with the min and
max over blocks. A machine that slows down for a while slows both sides of a block alike.

In a multi-rank run every rank runs the same variants in the same order, so collectives
stay aligned; call :func:`compare` on every rank.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

__all__ = ["Ratio", "compare", "format_table"]


class Ratio(NamedTuple):
    """One variant against the baseline, over all blocks."""

    name: str
    us_per_call: float  #: median time per call of this variant, microseconds
    median: float  #: median over blocks of (this variant's time / the baseline's)
    low: float
    high: float


def _time(fn: Callable[[], object], iters: int) -> float:
    clock = time.perf_counter
    start = clock()
    for _ in range(iters):
        fn()
    return (clock() - start) / iters


def compare(
    variants: dict[str, Callable[[], object]], baseline: str, *, blocks: int, iters: int, warmup: int = 20
) -> list[Ratio]:
    """Time every variant against ``variants[baseline]`` in ``blocks`` alternating blocks.

    Args:
        variants: name -> a function taking no arguments; one call is one measured unit.
        baseline: the name of the variant every ratio divides by.
        blocks: how many blocks (the more, the tighter min/max).
        iters: calls of each variant per block.
        warmup: untimed calls of each variant before the first block.

    Returns:
        One :class:`Ratio` per variant, in the order of ``variants`` (the baseline's is 1).
    """
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    per_call: dict[str, list[float]] = {name: [] for name in names}
    for block in range(blocks):
        shift = block % len(names)
        order = names[shift:] + names[:shift]
        if block % 2:
            order.reverse()
        for name in order:
            per_call[name].append(_time(variants[name], iters))
    result = []
    for name in names:
        ratios = [t / b for t, b in zip(per_call[name], per_call[baseline])]
        result.append(Ratio(name, statistics.median(per_call[name]) * 1e6, statistics.median(ratios),
                            min(ratios), max(ratios)))
    return result


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown (MyST) pipe table, aligned so that it also reads well in a terminal."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
