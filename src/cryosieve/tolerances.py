"""The tolerances every check of the package uses, defined once.

* Pixel and voxel sizes (Å) of particles, maps, masks and ``--angpix`` must agree to
  :data:`PIXEL_SIZE` relative (at box 512 that is a quarter of a pixel at the edge).
* Mask values must lie in ``[0, 1]`` to :data:`MASK_RANGE`, as ``relion_postprocess`` asks.
* Origins given twice in a STAR file (pixels and Å) must agree to :data:`ORIGIN_TOLERANCE_PIXELS`.
"""

from __future__ import annotations

#: Relative difference allowed between two pixel sizes.
PIXEL_SIZE = 1e-3

#: How far outside [0, 1] a mask value may lie.
MASK_RANGE = 1e-6

#: Pixels by which ``rlnOriginX`` and ``rlnOriginXAngst`` / pixel size may differ.
ORIGIN_TOLERANCE_PIXELS = 1e-3


def pixel_sizes_agree(first: float, second: float) -> bool:
    """Whether two pixel sizes (Å) agree to :data:`PIXEL_SIZE` relative."""
    return abs(first - second) <= PIXEL_SIZE * max(abs(first), abs(second))
