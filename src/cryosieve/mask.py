"""The one check of a soft mask, shared by sieving, the pipeline and post-processing."""

from __future__ import annotations

import numpy as np

from cryosieve.errors import CryoSieveInputError
from cryosieve.io.mrc import Volume
from cryosieve.tolerances import MASK_RANGE, pixel_sizes_agree


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
