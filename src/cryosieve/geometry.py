"""Rotations in RELION's conventions (ZYZ Euler angles rot, tilt, psi in degrees).

RELION's matrix ``A = Rz(psi) Ry(tilt) Rz(rot)`` maps volume coordinates to the
frame of the particle image: a volume frequency ``k3 = A^T (kx, ky, 0)`` lies on the
central slice of that particle (``Euler_angles2matrix`` in RELION's ``euler.cpp``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:
    import torch

Array = TypeVar("Array", np.ndarray, "torch.Tensor")


def euler_to_matrix(rot: Array, tilt: Array, psi: Array) -> Array:
    """RELION's rotation matrices.

    Parameters
    ----------
    rot, tilt, psi:
        ``(...)`` Euler angles in degrees: torch tensors (any device) or numpy arrays
        (numpy in, numpy out: the CPU reconstruction does not load torch at all).

    Returns
    -------
    ``(..., 3, 3)`` matrices ``A`` acting on ``(x, y, z)`` column vectors, same dtype.
    """
    if isinstance(rot, np.ndarray):
        a, b, g = (np.deg2rad(np.asarray(angle)) for angle in (rot, tilt, psi))
        ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
        stack = np.stack
    else:
        import torch

        a, b, g = (torch.deg2rad(angle) for angle in (rot, tilt, psi))
        ca, sa, cb, sb, cg, sg = a.cos(), a.sin(), b.cos(), b.sin(), g.cos(), g.sin()
        stack = torch.stack
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    rows = [
        stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], -1),
        stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], -1),
        stack([sc, ss, cb], -1),
    ]
    return stack(rows, -2)


def matrix_to_euler(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`euler_to_matrix` (RELION's ``Euler_matrix2angles``), degrees.

    ``matrix``: ``(n, 3, 3)``. Returns ``(rot, tilt, psi)`` each ``(n,)``.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    abs_sb = np.sqrt(matrix[:, 0, 2] ** 2 + matrix[:, 1, 2] ** 2)
    tilt = np.arctan2(abs_sb, matrix[:, 2, 2])
    regular = abs_sb > 16 * np.finfo(np.float64).eps
    psi = np.where(regular, np.arctan2(matrix[:, 1, 2], -matrix[:, 0, 2]), 0.0)
    rot = np.where(
        regular,
        np.arctan2(matrix[:, 2, 1], matrix[:, 2, 0]),
        np.where(np.sign(matrix[:, 2, 2]) > 0, np.arctan2(-matrix[:, 1, 0], matrix[:, 0, 0]),
                 np.arctan2(matrix[:, 1, 0], -matrix[:, 0, 0])),
    )
    return np.degrees(rot), np.degrees(tilt), np.degrees(psi)


def uniform_random_euler(count: int, generator: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Euler angles (degrees) of rotations drawn uniformly from SO(3)."""
    rot = generator.uniform(-180.0, 180.0, count)
    tilt = np.degrees(np.arccos(generator.uniform(-1.0, 1.0, count)))
    psi = generator.uniform(-180.0, 180.0, count)
    return rot, tilt, psi
