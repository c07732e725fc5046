"""The orientations of a local search: small rotations around a particle's given pose, coarse to fine.

A candidate pose is ``A = R(w) A0``: the given RELION matrix ``A0`` (:mod:`cryosieve.geometry`) turned by
the rotation ``R(w)`` of the rotation vector ``w`` (axis times angle, radians; Rodrigues' formula). The
angle between ``A`` and ``A0`` is ``|w|`` exactly, so a ball of radius ``r`` in ``w`` holds the poses
within ``r`` of the given one, and a cubic lattice of spacing ``s`` in ``w`` samples them nearly evenly
(the metric of rotations is Euclidean in ``w`` to second order in the angle).

The search runs in levels (:class:`SearchLevels`): the first tries every lattice point within the search
range at the coarsest step; each next level halves the step and tries the 27 points of the lattice
around the best so far; the last, at the finest step, the best and its 6 neighbours along the axes
(:func:`cross`), and, where the best stays best, a parabola along each axis places it below the step.
Each level compares projections up to the frequency its step can tell apart (:func:`level_frequencies`),
the finest one up to the current resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: The coarsest step is at most the search range divided by this (15 degrees: at most 5).
COARSE_STEPS_PER_RANGE = 3.0
#: A step ``s`` tells apart details down to ``FREQUENCY_REACH * diameter * s`` Å (below).
FREQUENCY_REACH = 1.0


def rotation_matrices(vectors: np.ndarray) -> np.ndarray:
    """``R(w)`` of rotation vectors ``(m, 3)`` (radians): ``(m, 3, 3)`` float64 (Rodrigues' formula)."""
    vectors = np.asarray(vectors, dtype=np.float64).reshape(-1, 3)
    angle = np.linalg.norm(vectors, axis=1)
    axis = vectors / np.where(angle > 0, angle, 1.0)[:, None]
    cross = np.zeros((len(vectors), 3, 3))
    cross[:, 0, 1], cross[:, 0, 2], cross[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    cross[:, 1, 0], cross[:, 2, 0], cross[:, 2, 1] = axis[:, 2], -axis[:, 1], axis[:, 0]
    sine, versine = np.sin(angle)[:, None, None], (1 - np.cos(angle))[:, None, None]
    matrices: np.ndarray = np.eye(3)[None] + sine * cross + versine * (cross @ cross)
    return matrices


def angle_between(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The angle (degrees) of the rotation from each matrix of ``first`` to the same one of ``second``, both
    ``(n, 3, 3)``: ``(n,)`` float64."""
    cosine = (np.einsum("nij,nij->n", np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64))
              - 1) / 2
    angles: np.ndarray = np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0)))
    return angles


def lattice(radius_steps: float) -> np.ndarray:
    """The points of the integer lattice within ``radius_steps`` of the origin, nearest first (the origin
    first): ``(m, 3)`` float64, in units of the step."""
    reach = math.floor(radius_steps + 1e-9)
    axis = np.arange(-reach, reach + 1, dtype=np.float64)
    points = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
    norm = np.linalg.norm(points, axis=1)
    points = points[norm <= radius_steps + 1e-9]
    norm = np.linalg.norm(points, axis=1)
    return np.ascontiguousarray(points[np.lexsort((points[:, 2], points[:, 1], points[:, 0], norm))])


def neighbours() -> np.ndarray:
    """The 27 lattice points of the cube ``{-1, 0, 1}^3``, the centre first: ``(27, 3)`` float64."""
    return lattice(math.sqrt(3.0))


def cross() -> np.ndarray:
    """The centre and its 6 neighbours along the axes, in the order centre, -x, +x, -y, +y, -z, +z:
    ``(7, 3)`` float64 (the last level's candidates)."""
    return np.array([[0, 0, 0], [-1, 0, 0], [1, 0, 0], [0, -1, 0], [0, 1, 0], [0, 0, -1], [0, 0, 1]],
                    dtype=np.float64)


def ten_points() -> np.ndarray:
    """The centre, its 6 neighbours along the axes and 3 diagonal ones (``xy``, ``xz``, ``yz``): the fewest points
    that fix a quadratic in 3 variables, ``(10, 3)`` float64, in the order of :func:`cross` then the diagonals."""
    return np.concatenate([cross(), np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=np.float64)])


def quadratic_terms(pattern: np.ndarray) -> np.ndarray:
    """The terms of a quadratic in 3 variables at the points ``pattern`` ``(m, 3)``: ``1, x, y, z, x^2, y^2, z^2``,
    and ``xy, xz, yz`` where the points fix them (off the axes): ``(m, 7)`` or ``(m, 10)`` float64."""
    pattern = np.asarray(pattern, dtype=np.float64)
    x, y, z = pattern.T
    terms = [np.ones(len(pattern)), x, y, z, x * x, y * y, z * z]
    if np.any(np.count_nonzero(pattern, axis=1) > 1):
        terms += [x * y, x * z, y * z]
    return np.stack(terms, axis=1)


def quadratic_fit(pattern: np.ndarray) -> np.ndarray:
    """The least-squares fit of :func:`quadratic_terms` to values at ``pattern``: ``(t, m)`` float64, so that
    ``fit @ values`` are the coefficients."""
    return np.ascontiguousarray(np.linalg.pinv(quadratic_terms(pattern)))


def supported_step(resolution_angstrom: float, diameter_angstrom: float) -> float:
    """The finest step (degrees) a map of ``resolution_angstrom`` can tell apart for a particle of
    ``diameter_angstrom``: the turn that moves its rim by a quarter of the resolution,
    ``resolution / (2 diameter)`` radians."""
    return math.degrees(resolution_angstrom / (2.0 * diameter_angstrom))


@dataclass(frozen=True)
class SearchLevels:
    """The levels of a local search.

    ``steps``: ``(L,)`` degrees, coarsest first, each half the one before; ``frequencies``: ``(L,)`` the
    frequency (cycles per box, exclusive) each level compares projections up to; ``search_range``: degrees,
    the largest turn from the given pose.
    """

    steps: np.ndarray
    frequencies: np.ndarray
    search_range: float

    @property
    def finest(self) -> float:
        """The finest step, degrees."""
        return float(self.steps[-1])

    def first_lattice(self) -> np.ndarray:
        """The first level's rotation vectors ``(m, 3)`` (radians), the given pose first."""
        return lattice(self.search_range / float(self.steps[0])) * math.radians(float(self.steps[0]))


def level_frequencies(steps: np.ndarray, limit: float, box: int, pixel_size: float, diameter_angstrom: float
                      ) -> np.ndarray:
    """The frequency (cycles per box) each level compares up to: the finest level up to ``limit`` (the current
    resolution's frequency; below Nyquist), each coarser one up to that times the ratio of the steps (the
    details its step can still tell apart), and the first at least up to what its step moves the particle's rim
    by a detail of: ``box * pixel / (FREQUENCY_REACH * diameter * step)``. Never beyond ``limit``. ``(L,)``."""
    steps = np.asarray(steps, dtype=np.float64)
    values = limit * steps[-1] / steps
    reach = box * pixel_size / (FREQUENCY_REACH * diameter_angstrom * math.radians(float(steps[0])))
    values[0] = max(values[0], reach)
    return np.minimum(np.maximum.accumulate(values), limit)


def search_levels(search_range: float, angular_step: float, resolution_angstrom: float, diameter_angstrom: float,
                  limit: float, box: int, pixel_size: float) -> SearchLevels:
    """The levels of a search within ``search_range`` degrees: the coarsest step about ``search_range /
    COARSE_STEPS_PER_RANGE`` (the finest times a power of 2 when that is within a quarter of it); then the finest
    step times powers of 2 below it, down to the finest step: ``angular_step`` degrees, or what
    ``resolution_angstrom`` supports (:func:`supported_step`) where that is coarser. ``limit``: the frequency
    (cycles per box) of the current resolution."""
    finest = max(angular_step, supported_step(resolution_angstrom, diameter_angstrom))
    coarsest = max(search_range / COARSE_STEPS_PER_RANGE, finest)
    chain = [finest]
    while chain[0] * 2 < coarsest * (1 - 1e-9):
        chain.insert(0, chain[0] * 2)
    steps = chain if chain[0] >= 0.75 * coarsest else [coarsest, *chain]
    values = np.asarray(steps, dtype=np.float64)
    return SearchLevels(steps=values, frequencies=level_frequencies(values, limit, box, pixel_size,
                                                                    diameter_angstrom),
                        search_range=float(search_range))
