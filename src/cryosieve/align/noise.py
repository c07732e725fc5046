"""Noise whitening per shell, from the data: what a search divides each sample's contribution by.

The noise power of shell ``s`` (``round(|k|)``, cycles per box) is the mean of ``|J - CTF P|^2`` over the
samples of that shell of a half-set's particles at their current poses (:func:`noise_spectrum`): ``J`` the
centred, origin-moved image sample (:func:`cryosieve.align.spectra.observed`, from each batch's
:class:`~cryosieve.batch.ParticleBatch`), ``P`` the reference's projection. So a search weighs each sample by
``1 / sigma^2`` of its shell, as a Gaussian likelihood of coloured noise does, and what the reference does not
explain (noise, and signal beyond its resolution) counts as noise. Each half-set's spectrum comes from its own
particles only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cryosieve.align.slices import slices
from cryosieve.align.spectra import Band, ctf_on, observed
from cryosieve.batch import ParticleBatch
from cryosieve.io.stack import StackReader
from cryosieve.particles import ParticleSet
from cryosieve.projection import FourierSliceProjector

#: How many particles of a half-set (evenly spread over it) the noise spectrum is measured on.
NOISE_PARTICLES = 1000
#: The smallest noise power kept, relative to the mean over the shells measured (a noiseless image
#: would otherwise weigh some shells without end).
NOISE_FLOOR = 1e-4


@dataclass(frozen=True)
class NoiseSpectrum:
    """``power``: ``(N // 2 + 1,)`` float64 noise power per shell ``0 .. N/2`` (image ``rfft2`` units)."""

    power: np.ndarray

    def weights(self, band: Band) -> np.ndarray:
        """``(R, C)`` float64: each band sample's Friedel weight over its shell's noise power."""
        shell = np.minimum(band.shell, len(self.power) - 1)
        weights: np.ndarray = band.friedel / self.power[shell]
        return weights


def spread_rows(rows: np.ndarray, count: int) -> np.ndarray:
    """At most ``count`` of ``rows``, evenly spread over them, in order."""
    if len(rows) <= count:
        return np.asarray(rows)
    return np.asarray(rows)[np.linspace(0, len(rows) - 1, count).round().astype(np.int64)]


def noise_spectrum(table: ParticleSet, reader: StackReader, rows: np.ndarray, projector: FourierSliceProjector,
                   reference_limit: float, batch_size: int = 256, count: int = NOISE_PARTICLES) -> NoiseSpectrum:
    """The noise power per shell of the particles ``rows`` (at most ``count`` of them, evenly spread) at
    their current poses and origins, against the reference of ``projector`` (sampled at ``|k| <
    reference_limit``, cycles per box; zero beyond). Computed on the projector's device."""
    box = reader.box_size()
    band = Band.of(box, box / 2)
    inside = band.inside()
    reference = inside & (np.sqrt(band.ky[:, None] ** 2 + band.kx[None, :] ** 2) < reference_limit)
    device = projector.device
    ky = np.broadcast_to(band.ky[:, None], band.shape)[reference]
    kx = np.broadcast_to(band.kx[None, :], band.shape)[reference]
    where = torch.from_numpy(reference).to(device)
    shells = len(band.kx) + 1
    power = np.zeros(box // 2 + 1)
    samples = np.zeros(box // 2 + 1)
    chosen = spread_rows(rows, count)
    for start in range(0, len(chosen), batch_size):
        batch = ParticleBatch.from_table(table, chosen[start:start + batch_size])
        images = torch.from_numpy(reader.read(batch.rows)).to(device)
        residual = observed(images, batch, band)
        model = slices(projector, batch.rotations, ky, kx)
        ctf = ctf_on(batch, band, device)
        residual[:, where] -= ctf[:, where] * model
        squared = (residual.abs() ** 2).to(torch.float64).sum(dim=0).cpu().numpy()
        power[:shells] += np.bincount(band.shell.ravel(), (squared * band.friedel).ravel(), minlength=shells)[:shells]
        samples[:shells] += len(batch) * np.bincount(band.shell.ravel(), band.friedel.ravel(),
                                                     minlength=shells)[:shells]
    measured = samples > 0
    mean = np.where(measured, power / np.maximum(samples, 1e-300), 0.0)
    floor = NOISE_FLOOR * float(mean[measured].mean()) if measured.any() else 1.0
    last = int(np.flatnonzero(measured)[-1]) if measured.any() else 0
    mean[last + 1:] = mean[last]
    return NoiseSpectrum(power=np.maximum(mean, max(floor, 1e-30)))
