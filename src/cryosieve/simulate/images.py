"""Image formation: projection, CTF, B-factor envelope, origin shift, empty images, and noise
(white, or coloured with a level per micrograph).

The image model, grid and units are those stated in :mod:`cryosieve.simulate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cryosieve.ctf import ctf_2d
from cryosieve.fourier import image_frequencies, origin_phases
from cryosieve.geometry import euler_to_matrix
from cryosieve.projection import FourierSliceProjector
from cryosieve.simulate.parameters import ParticleParameters, SimulationSettings


class ImageFormation:
    """Renders particle images of one box and pixel size from a projector.

    The images' transforms are formed on the ``(box, box // 2 + 1)`` rfft grid at the
    frequencies with ``|k| < box / 2`` (zero elsewhere) and inverted with
    ``torch.fft.irfft2``.
    """

    def __init__(self, box: int, pixel_size: float, device: torch.device | str = "cpu") -> None:
        self.box, self.pixel_size, self.device = box, pixel_size, torch.device(device)
        ky, kx = image_frequencies(box, self.device)
        inside = (kx**2 + ky**2) < (box / 2) ** 2
        self.flat_index = torch.nonzero(inside.reshape(-1)).squeeze(1)  # (p,)
        rows, columns = torch.nonzero(inside, as_tuple=True)
        self.row, self.column = rows, columns  # (p,) of the rfft2 grid
        self.ky, self.kx = ky[inside], kx[inside]  # (p,) float64 cycles per box

    def render(self, projector: FourierSliceProjector, parameters: ParticleParameters, rows: np.ndarray,
               settings: SimulationSettings) -> torch.Tensor:
        """Noiseless images of the given particles.

        Parameters
        ----------
        projector:
            Projector of the model's map (same box and voxel size as the images).
        parameters, rows:
            The particles and which of them to render (``(b,)`` indices).
        settings:
            Optics.

        Returns
        -------
        ``(b, box, box)`` float32 images ``[y, x]`` on the formation's device.
        """
        device = self.device

        def take(values: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.asarray(values)[rows], dtype=torch.float64, device=device)

        def constant(value: float) -> torch.Tensor:
            return torch.full((len(rows),), float(value), dtype=torch.float64, device=device)

        rotations = euler_to_matrix(take(parameters.rot), take(parameters.tilt), take(parameters.psi))
        slices = projector.sample(rotations, self.ky, self.kx).to(torch.complex128)  # (b, p)
        length = self.box * self.pixel_size
        frequency_x, frequency_y = self.kx / length, self.ky / length  # 1/Å
        bfactor = take(parameters.bfactor)
        ctf = ctf_2d(frequency_x, frequency_y, take(parameters.defocus_u), take(parameters.defocus_v),
                     take(parameters.defocus_angle), constant(settings.voltage),
                     constant(settings.spherical_aberration), constant(settings.amplitude_contrast),
                     constant(settings.phase_shift), bfactor=bfactor)  # (b, p), includes exp(-B s^2/4)
        # the projection (centred at pixel box // 2) moved by minus the origin: the inverse of the
        # origin phase that scoring and reconstruction apply
        phase_y, phase_x = origin_phases(self.box, take(parameters.origin_y) / self.pixel_size,
                                         take(parameters.origin_x) / self.pixel_size)  # origins in pixels
        values = slices * ctf * (phase_y[:, self.row] * phase_x[:, self.column]).conj()
        images = self._inverse(values)
        if parameters.contrast is not None:
            images *= take(parameters.contrast).to(images.dtype)[:, None, None]
        return images

    def _inverse(self, values: torch.Tensor) -> torch.Tensor:
        """``(b, box, box)`` float32 images of ``(b, p)`` complex values at the formation's frequencies."""
        spectrum = torch.zeros((len(values), self.box * (self.box // 2 + 1)), dtype=torch.complex64,
                               device=self.device)
        spectrum[:, self.flat_index] = values.to(torch.complex64)
        spectrum = spectrum.reshape(len(values), self.box, self.box // 2 + 1)
        result: torch.Tensor = torch.fft.irfft2(spectrum, s=(self.box, self.box))
        return result

    def render_empty(self, parameters: ParticleParameters, rows: np.ndarray, settings: SimulationSettings,
                     generator: np.random.Generator) -> torch.Tensor:
        """Images of empty "particles" (``parameters.empty_kind`` 1: a blob, 2: a carbon edge), CTF-modulated
        with the particle's own CTF and envelope, each scaled to unit variance over the box.

        The blob is a Gaussian of 5 to 15 % of the box wide, up to a quarter box off centre; the edge a
        soft step (2 pixels) along a random line through the box's middle half. Returns ``(b, box, box)``
        float32 on the formation's device.
        """
        box = self.box
        y, x = np.meshgrid(np.arange(box) - box // 2, np.arange(box) - box // 2, indexing="ij")
        real = np.empty((len(rows), box, box))
        for index, row in enumerate(rows):
            centre = generator.uniform(-box / 4, box / 4, 2)
            if parameters.empty_kind is not None and parameters.empty_kind[row] == 2:
                angle = generator.uniform(0, 2 * np.pi)
                distance = (x - centre[0]) * np.cos(angle) + (y - centre[1]) * np.sin(angle)
                real[index] = 1 / (1 + np.exp(-distance / 2.0))
            else:
                width = generator.uniform(0.05, 0.15) * box
                real[index] = np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / (2 * width**2))
        device = self.device

        def take(values: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.asarray(values)[rows], dtype=torch.float64, device=device)

        def constant(value: float) -> torch.Tensor:
            return torch.full((len(rows),), float(value), dtype=torch.float64, device=device)

        length = box * self.pixel_size
        ctf = ctf_2d(self.kx / length, self.ky / length, take(parameters.defocus_u), take(parameters.defocus_v),
                     take(parameters.defocus_angle), constant(settings.voltage),
                     constant(settings.spherical_aberration), constant(settings.amplitude_contrast),
                     constant(settings.phase_shift), bfactor=take(parameters.bfactor))
        transform = torch.fft.rfft2(torch.as_tensor(real, device=device)).reshape(len(rows), -1)[:, self.flat_index]
        images = self._inverse(transform * ctf)
        images -= images.mean(dim=(1, 2), keepdim=True)
        images /= images.std(dim=(1, 2), keepdim=True).clamp_min(1e-12)
        return images


@dataclass
class SignalStatistics:
    """Pooled pixel statistics of noiseless images, gathered batch by batch.

    Sums in float64 of the pixels and squared pixels of the main model's particles
    (``good``) and of all particles (for a data set that is all junk).
    """

    good_total: float = 0.0
    good_squares: float = 0.0
    good_pixels: float = 0.0
    all_total: float = 0.0
    all_squares: float = 0.0
    all_pixels: float = 0.0

    def add(self, images: np.ndarray, good: np.ndarray) -> None:
        """Add ``images``, ``(b, n, n)`` float32, of which ``good`` (``(b,)`` bool) are the main model's."""
        as_double = images.astype(np.float64)
        pixels_per_image = float(images.shape[1] * images.shape[2])
        self.good_total += float(as_double[good].sum())
        self.good_squares += float((as_double[good] ** 2).sum())
        self.good_pixels += float(np.count_nonzero(good)) * pixels_per_image
        self.all_total += float(as_double.sum())
        self.all_squares += float((as_double**2).sum())
        self.all_pixels += float(len(images)) * pixels_per_image

    def variance(self) -> float:
        """The signal variance: pooled variance of every pixel of the main model's images, or of
        all images when there are none of the main model."""
        if self.good_pixels > 0:
            total, squares, pixels = self.good_total, self.good_squares, self.good_pixels
        else:
            total, squares, pixels = self.all_total, self.all_squares, self.all_pixels
        mean = total / pixels
        return squares / pixels - mean * mean


def noise_sigma(signal_variance: float, snr: float) -> tuple[float, float]:
    """``(noise variance, noise standard deviation)`` for a signal variance and an SNR
    (``math.inf``: no noise, ``(0, 0)``)."""
    variance = 0.0 if math.isinf(snr) else signal_variance / snr
    return variance, math.sqrt(variance)


def noise_filter(box: int, pixel_size: float, bfactor: float, floor: float) -> np.ndarray:
    """Amplitude filter ``(box, box // 2 + 1)`` float64 of coloured noise on the rfft grid: the square root of
    the power ``floor + (1 - floor) exp(-bfactor s^2 / 4)`` (``s`` in 1/Å), scaled so that the noise's
    variance is unchanged (its mean power over the grid is 1)."""
    ky, kx = (values / (box * pixel_size) for values in image_frequencies(box))  # 1/Å
    power = floor + (1 - floor) * np.exp(-bfactor * (kx**2 + ky**2) / 4)
    weight = np.full(power.shape, 2.0)  # rfft columns stand for two frequencies, except 0 and Nyquist
    weight[:, 0] = 1.0
    if box % 2 == 0:
        weight[:, -1] = 1.0
    result: np.ndarray = np.sqrt(power / (np.sum(power * weight) / box**2))
    return result


def add_coloured_noise(images: np.ndarray, sigma: np.ndarray, amplitude: np.ndarray,
                       generator: np.random.Generator) -> None:
    """Add Gaussian noise of standard deviation ``sigma`` (``(b,)``, per image) coloured by ``amplitude``
    (:func:`noise_filter`) to ``(b, n, n)`` float32 ``images`` in place (drawn white in pixel order, then
    filtered)."""
    white = generator.standard_normal(images.shape, dtype=np.float32).astype(np.float64)
    coloured = np.fft.irfft2(np.fft.rfft2(white) * amplitude, s=images.shape[1:])
    images += (coloured * np.asarray(sigma, dtype=np.float64)[:, None, None]).astype(np.float32)


def add_noise(images: np.ndarray, sigma: float, generator: np.random.Generator) -> None:
    """Add white Gaussian noise of standard deviation ``sigma`` to ``(b, n, n)`` float32 ``images``
    in place, drawn from ``generator`` in pixel order (so batches of any size give the same noise).
    ``sigma`` 0: nothing is drawn."""
    if sigma > 0:
        images += sigma * generator.standard_normal(images.shape, dtype=np.float32)
