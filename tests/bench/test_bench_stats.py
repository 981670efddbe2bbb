"""Summaries and pair-by-pair ratios."""

from __future__ import annotations

import pytest

from bench.stats import pairwise_ratios, ratio_summary, summarize, throughput


def test_summary_is_median_and_range() -> None:
    s = summarize([3.0, 1.0, 2.0, 10.0])
    assert (s.median, s.min, s.max, s.n) == (2.5, 1.0, 10.0, 4)
    assert summarize([4.0]).to_json() == {"median": 4.0, "min": 4.0, "max": 4.0, "n": 1}
    with pytest.raises(ValueError):
        summarize([])


def test_ratios_are_taken_pair_by_pair_not_from_medians() -> None:
    # A load burst in round 2 slows both members of the pair: per-pair ratios stay at 0.5,
    # while a ratio of medians would be 0.8 / 1.0 = 0.8.
    ours = [0.5, 4.0, 0.8]
    anchor = [1.0, 8.0, 1.6]
    assert pairwise_ratios(ours, anchor) == [0.5, 0.5, 0.5]
    assert ratio_summary(ours, anchor).median == 0.5
    assert summarize(ours).median / summarize(anchor).median == pytest.approx(0.5)
    noisy_ours, noisy_anchor = [1.0, 1.0, 9.0], [2.0, 9.0, 2.0]
    assert ratio_summary(noisy_ours, noisy_anchor).median == pytest.approx(0.5)


def test_ratios_refuse_unpaired_or_zero_anchor() -> None:
    with pytest.raises(ValueError, match="runs"):
        pairwise_ratios([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="positive"):
        pairwise_ratios([1.0], [0.0])


def test_throughput_in_mb_per_s() -> None:
    assert throughput(200_000_000, 2.0) == 100.0
    with pytest.raises(ValueError):
        throughput(1, 0.0)
