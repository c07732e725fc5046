"""Point-group symmetry in RELION's conventions and names.

RELION (``SymList::fill_symmetry_class`` in ``symmetries.cpp``) defines every point
group by generator axes in (x, y, z) map coordinates and closes the set under
multiplication:

* ``Cn``: an n-fold axis along z.
* ``Dn``: an n-fold axis along z and a 2-fold axis along x.
* ``T``: a 3-fold axis along z and a 2-fold axis along (0, 0.816496, 0.577350).
* ``O``: a 3-fold axis along (1, 1, 1)/sqrt(3) and a 4-fold axis along z.
* ``I`` = ``I2`` (RELION's default): 2-fold along z, 5-fold along (0.5257, 0, 0.8507),
  3-fold along (0, 0.3568, 0.9342); ``I1``, ``I3`` and ``I4`` are the other standard
  icosahedral orientations (Heymann, Chagoyen and Belnap 2005), same generators as RELION.

Only proper rotations are supported (the groups above); RELION's groups with mirror
planes or inversion (Ci, Cs, Cnv, Cnh, Sn, Dnv, Dnh, Td, Th, Oh, Ih...) are rejected,
as is ``I5`` (which RELION does not implement either). The matrices agree with
``relion_refine --print_symmetry_ops`` (checked in ``tests/test_symmetry.py``).
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import numpy as np

from cryosieve.errors import CryoSieveInputError, setting
from cryosieve.fourier import centred_coordinates

if TYPE_CHECKING:
    import torch

SUPPORTED = "Cn, Dn (n = 1..99), T, O, I (= I2), I1, I2, I3, I4"

_GOLDEN = (1.0 + math.sqrt(5.0)) / 2.0
_NORM = math.sqrt(1.0 + _GOLDEN * _GOLDEN)

# RELION's generator axes for the icosahedral orientations (fill_symmetry_class), given
# there to 9-10 digits, here exactly: a 2-fold and a 5-fold axis 31.72 degrees apart
# generate the whole group (RELION also lists a 3-fold axis, which they generate).
#   I1: 2-fold (1, 0, 0), 5-fold (0.85065080702670, 0, -0.5257311142635)
#   I2: 2-fold (0, 0, 1), 5-fold (0.525731114, 0, 0.850650807)
#   I3: 2-fold (-0.5257311143, 0, 0.8506508070), 5-fold (0, 0, 1)
#   I4: 2-fold (0.5257311143, 0, 0.8506508070), 5-fold (0.8944271932547096, 0, 0.4472135909903704)
_ICOSAHEDRAL_GENERATORS: dict[str, list[tuple[int, tuple[float, float, float]]]] = {
    "I1": [(2, (1.0, 0.0, 0.0)), (5, (_GOLDEN / _NORM, 0.0, -1.0 / _NORM))],
    "I2": [(2, (0.0, 0.0, 1.0)), (5, (1.0 / _NORM, 0.0, _GOLDEN / _NORM))],
    "I3": [(2, (-1.0 / _NORM, 0.0, _GOLDEN / _NORM)), (5, (0.0, 0.0, 1.0))],
    "I4": [(2, (1.0 / _NORM, 0.0, _GOLDEN / _NORM)), (5, (2.0 / math.sqrt(5.0), 0.0, 1.0 / math.sqrt(5.0)))],
}


def axis_rotation(fold: int, axis: tuple[float, float, float], step: int = 1) -> np.ndarray:
    """``(3, 3)`` float64 rotation by ``step * 360 / fold`` degrees about ``axis`` (x, y, z)."""
    direction = np.asarray(axis, dtype=np.float64)
    direction = direction / np.linalg.norm(direction)
    angle = 2.0 * np.pi * step / fold
    cross = np.array([[0.0, -direction[2], direction[1]],
                      [direction[2], 0.0, -direction[0]],
                      [-direction[1], direction[0], 0.0]])
    result: np.ndarray = np.eye(3) + np.sin(angle) * cross + (1.0 - np.cos(angle)) * (cross @ cross)
    return result


def _generators(name: str) -> list[tuple[int, tuple[float, float, float]]]:
    """RELION's generator axes ``(fold, axis)`` for a normalised group name."""
    match = re.fullmatch(r"([CD])(\d{1,2})", name)
    if match:
        order = int(match.group(2))
        if order < 1:
            raise KeyError(name)
        axes = [(order, (0.0, 0.0, 1.0))]
        if match.group(1) == "D":
            axes.append((2, (1.0, 0.0, 0.0)))
        return axes
    if name == "T":
        # RELION writes (0, 0.816496, 0.577350): (0, sqrt(2/3), sqrt(1/3)) to 6 digits.
        return [(3, (0.0, 0.0, 1.0)), (2, (0.0, math.sqrt(2.0 / 3.0), math.sqrt(1.0 / 3.0)))]
    if name == "O":
        return [(3, (1.0, 1.0, 1.0)), (4, (0.0, 0.0, 1.0))]  # RELION: (.5773502, .5773502, .5773502)
    if name == "I":
        return _ICOSAHEDRAL_GENERATORS["I2"]
    if name in _ICOSAHEDRAL_GENERATORS:
        return _ICOSAHEDRAL_GENERATORS[name]
    raise KeyError(name)


def _close_group(generators: list[np.ndarray], tolerance: float = 1e-4) -> list[np.ndarray]:
    """Every product of the generators (the identity first), each rotation once.

    Products are matched with ``tolerance`` and the matrices re-orthonormalised.
    """
    elements = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:
        found = []
        for element in frontier:
            for generator in generators:
                product = generator @ element
                if not any(np.abs(product - known).max() < tolerance for known in elements):
                    elements.append(product)
                    found.append(product)
        frontier = found
        if len(elements) > 200:  # the largest supported group has 60 elements
            raise ValueError("symmetry generators do not close into a finite group")
    cleaned = []
    for element in elements:
        u, _, vt = np.linalg.svd(element)
        rotation = u @ vt
        rotation[np.abs(rotation) < 1e-14] = 0.0
        cleaned.append(rotation)
    return cleaned


def normalise_name(name: str) -> str:
    """Upper-case, stripped symmetry name (RELION accepts ``c1``, ``d2``...)."""
    return name.strip().upper()


def canonical_name(name: str) -> str:
    """The name of a supported group as RELION writes it (``c4`` and ``C04`` -> ``C4``).

    Raises :class:`CryoSieveInputError` for an unknown group (see :func:`symmetry_matrices`).
    """
    symmetry_matrices(name)
    key = normalise_name(name)
    match = re.fullmatch(r"([CD])(\d{1,2})", key)
    return f"{match.group(1)}{int(match.group(2))}" if match else key


def symmetry_matrices(name: str) -> np.ndarray:
    """Rotation matrices of a point group in RELION's orientation.

    Parameters
    ----------
    name:
        RELION's symmetry name, case-insensitive: ``C1``, ``C4``, ``D2``, ``T``, ``O``,
        ``I`` (= ``I2``), ``I1``..``I4``.

    Returns
    -------
    ``(m, 3, 3)`` float64 matrices acting on ``(x, y, z)`` column vectors, the identity
    first; ``m`` is the group order (n for Cn, 2n for Dn, 12, 24, 60).

    Raises
    ------
    CryoSieveInputError
        For a name that is not one of the supported groups.
    """
    key = normalise_name(name)
    try:
        axes = _generators(key)
    except KeyError:
        raise CryoSieveInputError(
            f"{setting('symmetry')} {name}: unknown symmetry (supported: {SUPPORTED}; groups with mirror planes "
            "or inversion are not)"
        ) from None
    generators = [axis_rotation(fold, axis) for fold, axis in axes if fold > 1]
    return np.stack(_close_group(generators))


def group_order(name: str) -> int:
    """Number of rotations in the group ``name``."""
    return int(symmetry_matrices(name).shape[0])


def symmetrise_volume(volume: torch.Tensor, name: str) -> torch.Tensor:
    """Average of the map's rotated copies, as ``relion_image_handler --sym`` does.

    Each copy is resampled by trilinear interpolation about the centre voxel ``n // 2``
    (zero outside the box), like RELION's ``symmetriseMap``.

    Parameters
    ----------
    volume:
        ``(n, n, n)`` real map indexed ``[z, y, x]``.
    name:
        Point group (see :func:`symmetry_matrices`).

    Returns
    -------
    ``(n, n, n)`` float64 map on the same device.
    """
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise ValueError(f"volume must be cubic, got shape {tuple(volume.shape)}")
    import torch

    matrices = torch.from_numpy(symmetry_matrices(name)).to(volume.device)
    size = volume.shape[-1]
    centre = size // 2
    axis = centred_coordinates(size, volume.device)
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    points = torch.stack([x, y, z], dim=-1)  # (n, n, n, 3) as (x, y, z)
    source = volume.to(torch.float64)[None, None]
    total = torch.zeros((size,) * 3, dtype=torch.float64, device=volume.device)
    for matrix in matrices:
        # grid_sample wants normalised (x, y, z) with -1 and 1 at the edge voxels' centres
        position = points @ matrix.T + centre
        grid = 2 * position / (size - 1) - 1
        total += torch.nn.functional.grid_sample(source, grid[None], mode="bilinear", padding_mode="zeros",
                                                 align_corners=True)[0, 0]
    return total / matrices.shape[0]
