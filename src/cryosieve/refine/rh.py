"""The Rosenthal-Henderson B-factor: resolution against the number of particles.

Rosenthal and Henderson (2003): the number of particles ``N`` needed for resolution ``d``
grows as ``exp(B / (2 d^2))``, so a plot of ``ln N`` against ``1 / d^2`` is a line of slope
``B / 2``. Two fits of the same points:

* the original CryoSieve's (``cryosieve-csrhbfactor``, used as published): with ``G`` the
  order of the point group, ``ln(N G) = ln(c_V) + a / (2 d^2) - ln d`` with the constant
  ``c_V`` of the acceleration voltage (:data:`VOLTAGE_CONSTANTS`) fixed, fitted by least
  squares in ``a`` alone; ``B = -a``;
* the classical straight line ``ln N = s / d^2 + t`` (least squares in ``s`` and ``t``);
  ``B = 2 s``.

The subsets are nested: each is a random half of the one before, within each half-set
(:func:`nested_subsets`), seeded so that reruns are identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cryosieve.errors import CryoSieveInputError, setting

#: ``c_V`` of the published fit, per acceleration voltage (kV).
VOLTAGE_CONSTANTS = {300: 1437.5695, 200: 1831.7256}


@dataclass(frozen=True)
class RHFit:
    """The fits of one set of points.

    ``bfactor``: the published fit's ``B = -a`` (Å^2); ``a`` its parameter;
    ``classical_bfactor``: ``2 s`` of the straight line ``ln N = s / d^2 + t`` (Å^2), with
    ``classical_slope`` ``s`` and ``classical_intercept`` ``t``; ``points``: how many.
    """

    bfactor: float
    a: float
    classical_bfactor: float
    classical_slope: float
    classical_intercept: float
    points: int


def voltage_constant(voltage: int) -> float:
    """``c_V`` for an acceleration voltage of 200 or 300 kV (an input error otherwise)."""
    if voltage not in VOLTAGE_CONSTANTS:
        raise CryoSieveInputError(f"{setting('voltage')} {voltage}: only 200 and 300 kV are supported (the fit's "
                                  "constant is known for those)")
    return VOLTAGE_CONSTANTS[voltage]


def fit_rh(resolutions: np.ndarray, counts: np.ndarray, group_order: int, voltage: int) -> RHFit:
    """Both fits of points ``(d_i, N_i)``: ``resolutions`` ``(m,)`` Å, ``counts`` ``(m,)`` particles.

    Needs at least two points of different resolution; ``group_order`` is ``G`` (1 for C1).
    """
    d = np.asarray(resolutions, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64)
    if d.shape != n.shape or d.ndim != 1:
        raise ValueError("resolutions and counts must be (m,) arrays of one length")
    finite = np.isfinite(d) & (d > 0) & (n > 0)
    d, n = d[finite], n[finite]
    if len(d) < 2 or np.ptp(1 / d**2) == 0:
        raise CryoSieveInputError(
            f"RH fit: {len(d)} usable point(s) of distinct resolution; at least two are needed (more particles, "
            f"or more {setting('halves')})")
    c = voltage_constant(voltage)
    x = 1.0 / (2.0 * d * d)
    y = np.log(n * group_order) - math.log(c) + np.log(d)
    a = float(np.dot(x, y) / np.dot(x, x))
    inverse = 1.0 / (d * d)
    design = np.stack([inverse, np.ones_like(inverse)], axis=1)
    (slope, intercept), *_ = np.linalg.lstsq(design, np.log(n), rcond=None)
    return RHFit(bfactor=-a, a=a, classical_bfactor=2.0 * float(slope), classical_slope=float(slope),
                 classical_intercept=float(intercept), points=len(d))


def nested_subsets(count: int, random_subset: np.ndarray | None, halves: int, seed: int,
                   resplit: bool) -> list[np.ndarray]:
    """Rows of a set of ``count`` particles and of ``halves`` nested random halves: ``halves + 1``
    sorted int64 arrays.

    Each subset is a random half (``round(n / 2)``) of the one before, taken within each
    half-set (``random_subset`` ``(count,)`` int64) unless ``resplit`` or there are none.
    """
    rng = np.random.default_rng(seed)
    current = np.arange(count, dtype=np.int64)
    subsets = [current]
    for _ in range(halves):
        if resplit or random_subset is None:
            groups = [current]
        else:
            groups = [current[random_subset[current] == value] for value in np.unique(random_subset[current])]
        chosen = [rng.choice(group, size=round(len(group) / 2), replace=False) for group in groups]
        current = np.sort(np.concatenate(chosen)).astype(np.int64)
        subsets.append(current)
    return subsets


def random_halves(count: int, seed: int) -> np.ndarray:
    """New half-sets (``--resplit``) for ``count`` particles: ``(count,)`` int64 of 1 and 2, as equal
    in number as possible, in a seeded random order."""
    rng = np.random.default_rng(seed)
    return (rng.permutation(count) % 2 + 1).astype(np.int64)
