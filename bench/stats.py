"""Summaries of repeated runs and pair-by-pair ratios.

A contender runs ``n`` times; its figure is reported as median with min-max. A ratio to an
anchor is never a ratio of medians: runs are interleaved (ours₁ anchor₁ ours₂ anchor₂ …) and
``ratio_k = ours_k / anchor_k`` is taken per pair, so a burst of load on a shared machine hits
both members of a pair and cancels, instead of faking a win. The reported ratio is the median
of the per-pair ratios, with their min-max. Below 1 means ours took less (for times).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Summary:
    """Median and range of ``n`` values."""

    median: float
    min: float
    max: float
    n: int

    def to_json(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.min, "max": self.max, "n": self.n}


def summarize(values: Sequence[float]) -> Summary:
    """Median, min and max of ``values``; raises ValueError when there are none."""
    if not values:
        raise ValueError("cannot summarize zero runs")
    return Summary(
        float(statistics.median(values)), float(min(values)), float(max(values)), len(values)
    )


def pairwise_ratios(ours: Sequence[float], anchor: Sequence[float]) -> list[float]:
    """``ours[k] / anchor[k]`` for each run ``k``; both lists come from the same interleaving.

    Raises ValueError when the lists differ in length (pairs would not be pairs) or an anchor
    value is not positive (no meaningful ratio).
    """
    if len(ours) != len(anchor):
        raise ValueError(f"{len(ours)} runs of ours but {len(anchor)} of the anchor")
    if any(value <= 0 for value in anchor):
        raise ValueError("an anchor value is not positive; no ratio can be taken")
    return [mine / theirs for mine, theirs in zip(ours, anchor, strict=True)]


def ratio_summary(ours: Sequence[float], anchor: Sequence[float]) -> Summary:
    """The median (and range) of the pair-by-pair ratios; see :func:`pairwise_ratios`."""
    return summarize(pairwise_ratios(ours, anchor))


def throughput(size: int, seconds: float) -> float:
    """MB/s (10⁶ bytes per second) for ``size`` bytes in ``seconds``."""
    if seconds <= 0:
        raise ValueError("duration must be positive")
    return size / seconds / 1e6
