"""``cryosieve.refine.rh``: both Rosenthal-Henderson fits and the nested subsets."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.optimize import curve_fit

from cryosieve.errors import CryoSieveInputError
from cryosieve.refine.rh import fit_rh, nested_subsets, random_halves
from cryosieve.symmetry import group_order


def test_published_fit_recovers_points_on_its_curve_exactly() -> None:
    # ln(N G) = ln(1437.5695) + a / (2 d^2) - ln d with a = 120, G = 2 (C2), 300 kV, typed out by hand
    a, order = 120.0, 2
    d = np.array([3.0, 3.5, 4.2, 5.5, 7.0])
    counts = np.exp(math.log(1437.5695) + a / (2 * d**2) - np.log(d)) / order
    fit = fit_rh(d, counts, order, 300)
    assert fit.a == pytest.approx(a, rel=1e-12)
    assert fit.bfactor == pytest.approx(-a, rel=1e-12)  # the original reports -a
    assert fit.points == 5


def test_published_fit_uses_the_200_kv_constant() -> None:
    a = 80.0
    d = np.array([3.0, 4.0, 6.0])
    counts = np.exp(math.log(1831.7256) + a / (2 * d**2) - np.log(d))
    assert fit_rh(d, counts, 1, 200).a == pytest.approx(a, rel=1e-12)
    assert fit_rh(d, counts, 1, 300).a != pytest.approx(a, rel=1e-3)


def test_a_hand_computed_case() -> None:
    # Two points, G = 1, 300 kV; by hand: x_i = 1 / (2 d_i^2), y_i = ln N_i - ln c + ln d_i, a = sum(x y) / sum(x^2)
    d = np.array([4.0, 8.0])
    counts = np.array([8000.0, 1000.0])
    x = [1 / 32, 1 / 128]
    y = [math.log(8000) - math.log(1437.5695) + math.log(4), math.log(1000) - math.log(1437.5695) + math.log(8)]
    a = (x[0] * y[0] + x[1] * y[1]) / (x[0] ** 2 + x[1] ** 2)
    fit = fit_rh(d, counts, 1, 300)
    assert fit.a == pytest.approx(a, rel=1e-12)
    # the classical line through two points: slope = (ln 8000 - ln 1000) / (1/16 - 1/64), B = 2 slope
    slope = math.log(8) / (1 / 16 - 1 / 64)
    assert fit.classical_slope == pytest.approx(slope, rel=1e-12)
    assert fit.classical_bfactor == pytest.approx(2 * slope, rel=1e-12)
    assert fit.classical_intercept == pytest.approx(math.log(8000) - slope / 16, rel=1e-12)


def test_fits_agree_with_scipy_and_numpy_on_scattered_points() -> None:
    rng = np.random.default_rng(5)
    d = rng.uniform(3, 9, 12)
    counts = np.round(rng.uniform(200, 20000, 12))
    order = 12  # T

    def curve(resolution: np.ndarray, a: float) -> np.ndarray:
        return np.log(1437.5695) + a / (2 * resolution**2) - np.log(resolution)

    (expected_a,), _ = curve_fit(curve, d, np.log(counts * order))
    fit = fit_rh(d, counts, order, 300)
    assert fit.a == pytest.approx(expected_a, rel=1e-6)
    slope, intercept = np.polyfit(1 / d**2, np.log(counts), 1)
    assert fit.classical_slope == pytest.approx(slope, rel=1e-9)
    assert fit.classical_intercept == pytest.approx(intercept, rel=1e-9)


def test_unmeasured_points_are_left_out_and_too_few_refused() -> None:
    fit = fit_rh(np.array([4.0, math.nan, 8.0]), np.array([8000.0, 4000.0, 1000.0]), 1, 300)
    assert fit.points == 2
    with pytest.raises(CryoSieveInputError, match="at least two"):
        fit_rh(np.array([4.0, math.nan]), np.array([8000.0, 4000.0]), 1, 300)
    with pytest.raises(CryoSieveInputError, match="at least two"):
        fit_rh(np.array([4.0, 4.0]), np.array([8000.0, 4000.0]), 1, 300)


def test_only_200_and_300_kv() -> None:
    with pytest.raises(CryoSieveInputError, match="120: only 200 and 300 kV"):
        fit_rh(np.array([4.0, 8.0]), np.array([8000.0, 1000.0]), 1, 120)


@pytest.mark.parametrize(("name", "order"), [("C1", 1), ("C4", 4), ("D2", 4), ("D7", 14), ("T", 12), ("O", 24),
                                             ("I", 60), ("I3", 60)])
def test_symmetry_orders_of_the_fit(name: str, order: int) -> None:
    assert group_order(name) == order


def test_nested_subsets_halve_within_each_half_set_and_are_seeded() -> None:
    count = 1001
    halves_of = np.where(np.arange(count) % 3 == 0, 1, 2).astype(np.int64)  # unequal half-sets: 334 and 667
    subsets = nested_subsets(count, halves_of, 4, seed=7, resplit=False)
    assert len(subsets) == 5
    assert np.array_equal(subsets[0], np.arange(count))
    for bigger, smaller in itertools.pairwise(subsets):
        assert set(smaller) <= set(bigger)
        assert np.all(np.diff(smaller) > 0)
        for value in (1, 2):
            assert np.sum(halves_of[smaller] == value) == round(np.sum(halves_of[bigger] == value) / 2)
    again = nested_subsets(count, halves_of, 4, seed=7, resplit=False)
    assert all(np.array_equal(x, y) for x, y in zip(subsets, again, strict=True))
    other = nested_subsets(count, halves_of, 4, seed=8, resplit=False)
    assert not np.array_equal(subsets[1], other[1])


def test_resplit_halves_the_whole_set_and_new_half_sets_are_balanced() -> None:
    subsets = nested_subsets(100, None, 2, seed=1, resplit=True)
    assert [len(subset) for subset in subsets] == [100, 50, 25]
    halves = random_halves(25, seed=3)
    assert sorted(np.bincount(halves)[1:]) == [12, 13]
    assert np.array_equal(halves, random_halves(25, seed=3))
