"""The high-pass band of the score: which spatial frequencies a particle's score sums over.

A particle of pixel size ``p`` (Å) scored at the cut-off ``F`` (Å) sums over the Fourier
samples of its image with ``p / F <= |k| < 1/2`` (``|k|`` in cycles per pixel): frequencies
below ``1/F`` Å^-1 are left out, and at or beyond Nyquist the central slice carries nothing.
A sample exactly on the cut-off is inside (to :data:`EDGE_TOLERANCE`). Defined here once, for
the scorer's sample list, its CPU kernel and its tensor path; the published CryoSieve's
high-pass is a named variant in :mod:`cryosieve.scoring.published`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from cryosieve.errors import CryoSieveInputError, setting
from cryosieve.fourier import image_frequencies

#: Cycles per pixel by which a sample below the cut-off still counts as on it (rounding).
EDGE_TOLERANCE = 1e-12


@dataclass(frozen=True)
class HighPass:
    """The band at cut-off ``cutoff_angstrom`` (Å; ``inf``: no cut, every frequency below Nyquist)."""

    cutoff_angstrom: float

    def cycles_per_pixel(self, pixel_size: Any) -> Any:
        """The cut-off in cycles per pixel for particles of ``pixel_size`` Å (array or tensor, any shape)."""
        return pixel_size / self.cutoff_angstrom

    @staticmethod
    def inside(radius_cycles_per_pixel: Any, cut_cycles_per_pixel: Any) -> Any:
        """Whether samples of radius ``|k|`` (cycles per pixel) lie in the band of cut-off ``cut``
        (cycles per pixel); broadcasts arrays and tensors."""
        return (radius_cycles_per_pixel >= cut_cycles_per_pixel - EDGE_TOLERANCE) & (radius_cycles_per_pixel < 0.5)

    @staticmethod
    def squared_cut_cycles_per_box(cut_cycles_per_pixel: np.ndarray, box: int) -> np.ndarray:
        """The lower edge as ``|k|^2`` in cycles per box squared, for kernels that compare squared radii
        (``-1`` where there is no cut, so every sample passes): ``(b,)`` float64."""
        cut = (np.asarray(cut_cycles_per_pixel, dtype=np.float64) - EDGE_TOLERANCE) * box
        return np.where(cut > 0, cut * cut, -1.0)

    def sample_count(self, box: int, pixel_size: float) -> int:
        """Half-plane samples of a ``box``-pixel image of ``pixel_size`` Å in the band (0: nothing to score)."""
        ky, kx = image_frequencies(box)
        radius = np.sqrt(ky**2 + kx**2) / box
        return int(np.count_nonzero(self.inside(radius, self.cycles_per_pixel(pixel_size))))

    def check(self, box: int, pixel_size: float, option: str = setting("highpass_angstrom")) -> None:
        """Refuse a cut-off that leaves nothing to score in a ``box``-pixel image of ``pixel_size`` Å
        (the particles' coarsest): not coarser than Nyquist, or an empty band. ``option`` names it."""
        nyquist = 2 * pixel_size
        value = self.cutoff_angstrom
        if not (value > 0) or math.isnan(value):
            raise CryoSieveInputError(f"{option} {value}: must be a positive number of Å")
        if value <= nyquist:
            raise CryoSieveInputError(f"{option} {value:g}: not coarser than Nyquist ({nyquist:.3f} Å) of the "
                                      "particles, so nothing is left to score")
        if self.sample_count(box, pixel_size) == 0:
            raise CryoSieveInputError(
                f"{option} {value:g}: leaves no frequency between 1/{value:g} Å^-1 and Nyquist "
                f"({nyquist:.3f} Å) in a {box}-pixel box, so nothing is left to score")
