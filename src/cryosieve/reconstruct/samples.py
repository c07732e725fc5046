"""What each particle image contributes to the grid: its samples and their per-particle factors.

An image of ``n`` pixels contributes the half-plane samples of its ``rfft2`` with
``|k| < n / 2`` (:class:`SliceSamples`), each multiplied by the particle's origin phase
(:func:`origin_phases`: the transform is taken about pixel ``n // 2`` and moved by the
particle's origin) and by its CTF (:func:`batch_ctf`, :mod:`cryosieve.ctf`). The
per-particle values a batch needs are the columns :data:`BATCH_COLUMNS` of a
:class:`~cryosieve.particles.ParticleSet` (:func:`batch_parameters`). Where these samples
land in the Fourier grid is defined in :mod:`cryosieve.reconstruct.grid`.

Numpy only: both engines (:mod:`.cpu`, :mod:`.tensor_path`) start from these arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cryosieve.ctf import CtfParameters
from cryosieve.particles import ParticleSet

#: The per-particle columns of :class:`~cryosieve.particles.ParticleSet` a batch needs:
#: origins (pixels), pixel size (Å), the CTF values of :meth:`CtfParameters.from_values`
#: and the Euler angles (degrees).
BATCH_COLUMNS = ("origin_x", "origin_y", "pixel_size", "defocus_u", "defocus_v", "defocus_angle", "voltage",
                 "spherical_aberration", "amplitude_contrast", "phase_shift", "ctf_bfactor", "ctf_scalefactor",
                 "rot", "tilt", "psi")


@dataclass(frozen=True)
class SliceSamples:
    """The half-plane samples of a ``box``-pixel image that are inserted.

    Samples of the ``rfft2`` grid with ``|k| < box / 2`` and (``kx > 0`` or ``ky >= 0``),
    so that each Friedel pair of the full image transform appears exactly once.

    Attributes
    ----------
    box:
        Image size ``n`` (pixels).
    flat_index:
        ``(p,)`` int64 indices into a flattened ``(box, box // 2 + 1)`` ``rfft2`` array.
    row, column:
        ``(p,)`` int64: the same as ``(row, column)`` of that array.
    frequency_y, frequency_x:
        ``(p,)`` float64 frequencies in cycles per box.
    multiplicity:
        ``(p,)`` float64: 1, except 0.5 for the zero frequency (its own Friedel mate,
        counted twice when the ``x = 0`` plane is made Hermitian).
    """

    box: int
    flat_index: np.ndarray
    row: np.ndarray
    column: np.ndarray
    frequency_y: np.ndarray
    frequency_x: np.ndarray
    multiplicity: np.ndarray

    @classmethod
    def for_box(cls, box: int) -> SliceSamples:
        ky = np.fft.fftfreq(box, d=1.0 / box)
        kx = np.fft.rfftfreq(box, d=1.0 / box)
        grid_y, grid_x = np.meshgrid(ky, kx, indexing="ij")
        grid_y, grid_x = grid_y.reshape(-1), grid_x.reshape(-1)
        keep = (grid_x * grid_x + grid_y * grid_y < (box / 2) ** 2) & ((grid_x > 0) | (grid_y >= 0))
        flat_index = np.flatnonzero(keep).astype(np.int64)
        multiplicity = np.ones(flat_index.size, dtype=np.float64)
        multiplicity[(grid_x[flat_index] == 0) & (grid_y[flat_index] == 0)] = 0.5
        width = box // 2 + 1
        return cls(box=box, flat_index=flat_index, row=flat_index // width, column=flat_index % width,
                   frequency_y=grid_y[flat_index].copy(), frequency_x=grid_x[flat_index].copy(),
                   multiplicity=multiplicity)

    @property
    def size(self) -> int:
        """The number of samples ``p``."""
        return int(self.flat_index.size)


def batch_parameters(table: ParticleSet, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The :data:`BATCH_COLUMNS` of the particles ``rows`` (``(b,)`` int64), each ``(b,)`` float64."""
    return {name: np.ascontiguousarray(getattr(table, name)[rows], dtype=np.float64) for name in BATCH_COLUMNS}


def batch_ctf(batch: dict[str, np.ndarray]) -> CtfParameters:
    """The CTF terms of a batch (:func:`batch_parameters`), ``rlnCtfBfactor`` and ``rlnCtfScalefactor`` included."""
    return CtfParameters.from_values(batch["defocus_u"], batch["defocus_v"], batch["defocus_angle"], batch["voltage"],
                                     batch["spherical_aberration"], batch["amplitude_contrast"], batch["phase_shift"],
                                     batch["ctf_bfactor"], batch["ctf_scalefactor"])


def origin_phases(box: int, origin_y: np.ndarray, origin_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The factors that centre an image's ``rfft2`` at pixel ``box // 2`` and shift it by its origin.

    ``S(k) = FT(I)(k) * exp(2 pi i k . (c - o) / n)`` with ``c = n // 2`` and ``o`` the
    origin (pixels), split into a y and an x factor: ``S[i, r, c] = FT(I_i)[r, c] *
    phase_y[i, r] * phase_x[i, c]``.

    ``origin_y``, ``origin_x``: ``(b,)`` pixels. Returns ``(b, box)`` and ``(b, box // 2 + 1)``
    complex128, over the ``rfft2`` rows (FFT order) and columns.
    """
    centre = box // 2
    ky = np.fft.fftfreq(box, d=1.0 / box)
    kx = np.fft.rfftfreq(box, d=1.0 / box)
    phase_y = np.exp(1j * (2 * math.pi / box) * ky * (centre - np.asarray(origin_y, dtype=np.float64))[:, None])
    phase_x = np.exp(1j * (2 * math.pi / box) * kx * (centre - np.asarray(origin_x, dtype=np.float64))[:, None])
    return phase_y, phase_x
