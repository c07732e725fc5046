"""``cryosieve.selection``: the lowest fraction of each half-set, equal-area viewing-direction bins, depletion,
and the floor of --keep_orientations."""

from __future__ import annotations

import numpy as np

from cryosieve.geometry import uniform_random_euler
from cryosieve.selection import COS_BINS, ROT_BINS, depleted_fraction, keep_views, select_lowest, view_bins


def test_uniform_directions_fill_the_bins_equally() -> None:
    rot, tilt, _ = uniform_random_euler(144_000, np.random.default_rng(0))
    counts = np.bincount(view_bins(rot, tilt), minlength=ROT_BINS * COS_BINS)
    expected = 144_000 / (ROT_BINS * COS_BINS)
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert len(counts) == 72 and chi2 < 71 + 5 * np.sqrt(2 * 71)  # equal areas: a chi-square of 71 d.o.f.
    # bins by hand: top view, tilt 90 at rot 0, bottom view
    assert view_bins(np.array([0.0, 0.0, 179.9]), np.array([0.0, 90.0, 180.0])).tolist() == [
        ROT_BINS // 2, 2 * ROT_BINS + ROT_BINS // 2, (COS_BINS - 1) * ROT_BINS + ROT_BINS - 1]


def test_depletion_counts_bins_that_lost_over_twice_the_average() -> None:
    bins = np.repeat(np.arange(4), 10)
    kept = np.ones(40, dtype=bool)
    kept[:6] = False  # bin 0 loses 60 %
    kept[10:11] = False  # bin 1 loses 10 %; on average 7 / 40 = 17.5 % is lost
    assert depleted_fraction(bins, kept) == 0.25
    assert np.isnan(depleted_fraction(bins, np.ones(40, dtype=bool)))
    sparse = np.concatenate([bins, [9, 9]])  # a bin of 2 particles does not count
    assert depleted_fraction(sparse, np.concatenate([kept, [False, False]])) == 0.25


def test_keep_views_gives_back_the_best_of_a_depleted_bin() -> None:
    rng = np.random.default_rng(1)
    bins = np.repeat(np.arange(5), 40)
    scores = rng.normal(size=200)
    scores[:40] += 3.0  # view 0 scores worse: a plain cut takes most of it
    kept = np.zeros(200, dtype=bool)
    kept[np.argsort(scores)[:120]] = True
    assert depleted_fraction(bins, kept) > 0
    floored = keep_views(scores, kept, bins, 1.5)
    assert depleted_fraction(bins, floored) == 0.0
    lost = 1 - kept.mean()
    view0 = np.arange(40)
    assert (~floored[view0]).mean() <= 1.5 * lost + 1 / 40
    back = floored & ~kept
    assert back.any() and np.all(np.isin(np.flatnonzero(back), view0))
    # those given back are view 0's best-scoring sieved particles
    sieved = view0[~kept[view0]]
    assert set(np.flatnonzero(back)) == set(sieved[np.argsort(scores[sieved])[:back.sum()]])
    assert np.array_equal(keep_views(scores, kept, bins, 10.0), kept)  # a loose floor changes nothing


def test_select_lowest_rounds_and_breaks_ties_by_input_order():
    scores = np.array([3.0, 1.0, 1.0, 2.0, 5.0, 0.0, 0.0, 0.0])
    groups = np.array([1, 1, 1, 1, 1, 2, 2, 2])
    kept = select_lowest(scores, groups, 0.5)
    # group 1: round(2.5) = 2 (Python's round, as published) -> rows 1, 2; group 2: round(1.5) = 2 -> rows 5, 6
    assert kept.tolist() == [False, True, True, False, False, True, True, False]
