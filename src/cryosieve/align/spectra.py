"""The particles' side of a local search: their Fourier samples on a band-limited rectangle.

A search compares images with projections only up to a frequency ``limit`` (cycles per box), so it
keeps only the image samples with ``|k| < limit`` of the ``rfft2`` half-plane, laid out as a rectangle
(:class:`Band`): rows ``ky = -K .. K`` and columns ``kx = 0 .. K`` (``K`` the largest integer below the
limit; frequencies of :func:`cryosieve.fourier.fft_frequencies` and :func:`cryosieve.fourier.rfft_frequencies`),
zero outside the disc. On it, each particle's samples are centred and moved by its given origin
(:func:`observed`, the origin phase of :func:`cryosieve.fourier.origin_phases`), as the scorer and the
reconstruction do, so that ``J = CTF P(A0)`` for a particle at its given pose and origin; the CTF is the
package's one (the batch's :class:`cryosieve.ctf.CtfParameters`).

Every particle quantity comes from a :class:`cryosieve.batch.ParticleBatch`, as in scoring and insertion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cryosieve.batch import ParticleBatch
from cryosieve.fourier import fft_frequencies, origin_phases, rfft_frequencies


@dataclass(frozen=True)
class Band:
    """The samples ``0 < |k| < limit`` of a ``box``-pixel image's ``rfft2`` as a rectangle.

    Attributes
    ----------
    box:
        Image size ``N`` (pixels).
    limit:
        Frequency (cycles per box, exclusive), below ``N / 2``.
    ky, kx:
        ``(R,)`` rows ``-K .. K`` and ``(C,)`` columns ``0 .. K``, float64 cycles per box.
    row_index:
        ``(R,)`` int64: the row of each ``ky`` in the ``rfft2`` (``fftfreq`` order).
    friedel:
        ``(R, C)`` float64: how many samples of the full transform each stands for (2, or 1 on the
        ``kx = 0`` column), 0 outside the disc and at ``k = 0``.
    shell:
        ``(R, C)`` int64 ``round(|k|)``.
    """

    box: int
    limit: float
    ky: np.ndarray
    kx: np.ndarray
    row_index: np.ndarray
    friedel: np.ndarray
    shell: np.ndarray

    @classmethod
    def of(cls, box: int, limit: float) -> Band:
        """The band of ``box`` up to ``limit`` (capped just below Nyquist, ``N / 2``)."""
        limit = float(min(limit, box / 2 - 1e-6))
        reach = max(math.ceil(limit) - 1, 1)
        row_index = np.arange(-reach, reach + 1, dtype=np.int64) % box
        ky = fft_frequencies(box)[row_index]
        kx = rfft_frequencies(box)[:reach + 1]
        radius = np.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)
        inside = (radius < limit) & (radius > 0)
        friedel = np.where(inside, np.where(kx[None, :] == 0, 1.0, 2.0), 0.0)
        return cls(box=box, limit=limit, ky=ky, kx=kx, row_index=row_index, friedel=friedel,
                   shell=np.rint(radius).astype(np.int64))

    @property
    def shape(self) -> tuple[int, int]:
        """``(R, C)``."""
        return len(self.ky), len(self.kx)

    def inside(self) -> np.ndarray:
        """``(R, C)`` bool: the samples of the band."""
        return self.friedel > 0


def observed(images: torch.Tensor, batch: ParticleBatch, band: Band) -> torch.Tensor:
    """The samples ``J`` of the ``(b, N, N)`` images of ``batch`` on ``band``, centred and moved by their origins
    (:func:`cryosieve.fourier.origin_phases`): ``(b, R, C)`` complex64 on the images' device, zero outside the
    band."""
    device = images.device
    spectra = torch.fft.rfft2(images.to(torch.float32))
    rows = torch.from_numpy(band.row_index).to(device)
    samples = spectra[:, rows, :len(band.kx)]
    phase_y, phase_x = origin_phases(band.box, batch.origin_y, batch.origin_x)  # (b, N), (b, N // 2 + 1)
    phase = phase_y[:, band.row_index, None] * phase_x[:, None, :len(band.kx)] * band.inside()[None]
    moved: torch.Tensor = samples * torch.from_numpy(phase.astype(np.complex64)).to(device)
    return moved


def ctf_on(batch: ParticleBatch, band: Band, device: torch.device | str) -> torch.Tensor:
    """The CTF of the particles of ``batch`` at the band's samples: ``(b, R, C)`` float32 on ``device``."""
    pixel = batch.pixel_size[:, None]
    kx = np.broadcast_to(band.kx[None, :], band.shape).reshape(1, -1) / (band.box * pixel)
    ky = np.broadcast_to(band.ky[:, None], band.shape).reshape(1, -1) / (band.box * pixel)
    values = batch.ctf.evaluate(kx, ky)
    return torch.from_numpy(np.asarray(values, dtype=np.float32).reshape(len(batch), *band.shape)).to(device)
