"""Soft masks: the one check of a mask (sieving, the pipeline, post-processing) and the one way
to make one around a map's density (the simulator, refinement without a given mask)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from cryosieve.errors import CryoSieveInputError
from cryosieve.fourier import irfftn, raised_cosine, rfftn, squared_radius
from cryosieve.io.mrc import Volume
from cryosieve.tolerances import MASK_RANGE, pixel_sizes_agree

if TYPE_CHECKING:
    import torch


def check_mask(mask: Volume, shape: tuple[int, ...], pixel_size: float | None = None,
               against: str = "the maps") -> None:
    """A usable mask: of ``shape``, values in ``[0, 1]`` (to :data:`~cryosieve.tolerances.MASK_RANGE`),
    not all zero, and, when both are known, of voxel size ``pixel_size`` (Å).

    Raises :class:`CryoSieveInputError` naming the mask file.
    """
    if mask.data.shape != tuple(shape):
        raise CryoSieveInputError(
            f"{mask.path}: mask box {mask.data.shape[0]} does not match {against}' {shape[0]}")
    low, high = float(mask.data.min()), float(mask.data.max())
    if low < -MASK_RANGE or high > 1 + MASK_RANGE:
        raise CryoSieveInputError(f"{mask.path}: mask values must lie in [0, 1], found [{low:.6g}, {high:.6g}]")
    if high <= 0:
        raise CryoSieveInputError(f"{mask.path}: mask is empty (all values 0)")
    if pixel_size is not None and mask.voxel_size is not None and not pixel_sizes_agree(mask.voxel_size, pixel_size):
        raise CryoSieveInputError(
            f"{mask.path}: voxel size {mask.voxel_size:.4f} Å does not match {against}' {pixel_size:.4f} Å")


def mask_is_empty(data: np.ndarray) -> bool:
    """Whether a mask array has no positive value."""
    return not bool(np.max(data) > 0)


def _distance_outside(inside: torch.Tensor, reach: int) -> torch.Tensor:
    """Euclidean distance (voxels) from each voxel to the nearest ``inside`` voxel.

    Exact for distances up to ``reach`` voxels (separable minimum-convolution with
    ``(i - j)^2`` over a window of ``reach`` voxels per axis); larger distances come out
    as ``> reach``. ``inside``: ``(n, n, n)`` bool. Returns float32 of the same shape.
    """
    import torch

    big = float(3 * (reach + 1) ** 2 + 1)
    squared = torch.where(inside, 0.0, big).to(torch.float32)
    for axis in range(3):
        moved = squared.movedim(axis, 0)
        size = moved.shape[0]
        padded = torch.nn.functional.pad(moved.movedim(0, -1), (reach, reach), value=big).movedim(-1, 0)
        best = moved.clone()
        for offset in range(1, reach + 1):
            penalty = float(offset * offset)
            best = torch.minimum(best, padded[reach + offset: reach + offset + size] + penalty)
            best = torch.minimum(best, padded[reach - offset: reach - offset + size] + penalty)
        squared = best.movedim(0, axis)
    return squared.sqrt()


def soft_mask(volume: np.ndarray, voxel_size: float, threshold: float | None = None,
              extend_angstrom: float = 4.0, soft_edge_angstrom: float = 8.0,
              lowpass_angstrom: float = 10.0) -> np.ndarray:
    """A soft-edged mask around the density of a map (as ``relion_mask_create``).

    The map is low-pass filtered (Gaussian falling to ``exp(-1/2)`` at
    ``1/lowpass_angstrom``) so the binary region has no holes between atoms, binarised
    at ``threshold``, dilated by ``extend_angstrom`` and given a raised-cosine edge of
    width ``soft_edge_angstrom``: 1 within ``extend`` of the region, ``0.5 + 0.5
    cos(pi (d - extend) / edge)`` at distance ``d`` up to ``extend + edge``, 0 beyond.

    Parameters
    ----------
    volume:
        ``(n, n, n)`` map ``[z, y, x]``.
    voxel_size:
        Å per voxel.
    threshold:
        Binarisation level of the low-passed map; ``None``: 10 % of its maximum.

    Returns
    -------
    ``(n, n, n)`` float32 values in [0, 1].
    """
    import torch

    data = torch.as_tensor(np.asarray(volume, dtype=np.float32))
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise CryoSieveInputError(f"mask: expected a cubic 3D map, got shape {tuple(data.shape)}")
    if not voxel_size > 0 or extend_angstrom < 0 or soft_edge_angstrom < 0 or not lowpass_angstrom > 0:
        raise CryoSieveInputError("mask: voxel size and low-pass must be positive, extend and edge non-negative")
    size = data.shape[0]
    s2 = squared_radius(size, "cpu") / (size * voxel_size) ** 2  # (1/Å)^2
    gaussian = torch.exp(-0.5 * s2 * lowpass_angstrom**2).to(torch.complex64)
    smooth = irfftn(rfftn(data) * gaussian, size)
    level = 0.1 * float(smooth.max()) if threshold is None else float(threshold)
    inside = smooth >= level
    if not bool(inside.any()):
        raise CryoSieveInputError(f"mask: no voxel of the low-passed map reaches the threshold {level:g}")
    extend = extend_angstrom / voxel_size
    edge = soft_edge_angstrom / voxel_size
    reach = math.ceil(extend + edge) + 1
    distance = _distance_outside(inside, reach)
    if edge > 0:
        ramp = torch.clamp((distance - extend) / edge, 0.0, 1.0)
        mask = raised_cosine(ramp)
    else:
        mask = (distance <= extend).to(torch.float32)
    return np.ascontiguousarray(mask.numpy(), dtype=np.float32)
