"""The published CryoSieve 1.3.3 scoring, reproduced as a named variant.

``cryosieve-core --projector realspace --reference_weighting none`` scores particles with
the published real-space projector (each voxel rotated by the pose quaternion and
splatted bilinearly onto the image), its CTF, origin shift and high-pass, in float64, so
that users can reproduce the selections they made with it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cryosieve.score import ParticleBatch


def published_quaternions(rot: np.ndarray, tilt: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """Quaternions ``(w, x, y, z)`` exactly as the published CryoSieve computes them.

    Angles in degrees, ``(n,)`` each; returns ``(n, 4)`` float64. The published code
    names RELION's rot ``psi`` and RELION's psi ``phi``; the resulting rotation equals
    :func:`euler_to_matrix`.
    """
    first = np.radians(rot)
    theta = np.radians(tilt)
    last = np.radians(psi)
    return np.stack(
        [
            np.cos((last + first) / 2) * np.cos(theta / 2),
            -np.sin((last - first) / 2) * np.sin(theta / 2),
            -np.cos((last - first) / 2) * np.sin(theta / 2),
            -np.sin((last + first) / 2) * np.cos(theta / 2),
        ],
        axis=-1,
    )


def published_realspace_projection(volume: torch.Tensor, rot: np.ndarray, tilt: np.ndarray,
                                   psi: np.ndarray) -> torch.Tensor:
    """The published CryoSieve real-space projector, reproduced in float64.

    Every voxel ``(x, y, z)`` (centred at ``n // 2``) is rotated by the pose quaternion
    and its value is splatted bilinearly onto the image pixel grid; contributions that
    fall outside the image are dropped.

    Parameters
    ----------
    volume:
        ``(n, n, n)`` map indexed ``[z, y, x]``.
    rot, tilt, psi:
        ``(b,)`` Euler angles in degrees.

    Returns
    -------
    ``(b, n, n)`` float64 projections indexed ``[y, x]``.
    """
    size = volume.shape[-1]
    device = volume.device
    values = volume.to(torch.float64).reshape(-1)
    axis = torch.arange(size, device=device, dtype=torch.float64) - size // 2
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    x, y, z = x.reshape(-1), y.reshape(-1), z.reshape(-1)
    quaternions = published_quaternions(np.asarray(rot), np.asarray(tilt), np.asarray(psi))
    images = torch.zeros((len(quaternions), size * size), dtype=torch.float64, device=device)
    for index, (qw, qx, qy, qz) in enumerate(quaternions.tolist()):
        vx = (x - 2 * (qy * qy + qz * qz) * x + 2 * (qx * qy - qw * qz) * y
              + 2 * (qx * qz + qw * qy) * z + size // 2)
        vy = (y + 2 * (qx * qy + qw * qz) * x - 2 * (qx * qx + qz * qz) * y
              + 2 * (qy * qz - qw * qx) * z + size // 2)
        ix, iy = torch.floor(vx), torch.floor(vy)
        dx, dy = vx - ix, vy - iy
        ix, iy = ix.long(), iy.long()
        for ox, oy, weight in ((0, 0, (1 - dx) * (1 - dy)), (1, 0, dx * (1 - dy)),
                               (0, 1, (1 - dx) * dy), (1, 1, dx * dy)):
            px, py = ix + ox, iy + oy
            inside = (px >= 0) & (px < size) & (py >= 0) & (py < size)
            images[index].index_add_(0, (py * size + px)[inside], (values * weight)[inside])
    return images.reshape(-1, size, size)


def _published_ctf_multiply(spectra: torch.Tensor, batch: ParticleBatch) -> torch.Tensor:
    """The published ``convolute_ctf`` kernel on an ``rfft2`` stack (float64)."""
    box = spectra.shape[-2]
    freq_y = torch.fft.fftfreq(box, d=1.0 / box, dtype=torch.float64, device=spectra.device)
    freq_x = torch.fft.rfftfreq(box, d=1.0 / box, dtype=torch.float64, device=spectra.device)
    y, x = torch.meshgrid(freq_y, freq_x, indexing="ij")
    pixel = batch.pixel_size[:, None, None]
    frequency = torch.hypot(x / (pixel * box), y / (pixel * box))
    alpha = torch.atan2(y, x)[None] - torch.deg2rad(batch.defocus_angle)[:, None, None]
    defocus_u, defocus_v = batch.defocus_u[:, None, None], batch.defocus_v[:, None, None]
    defocus = -(defocus_u + defocus_v + (defocus_u - defocus_v) * torch.cos(2 * alpha)) / 2
    volts = batch.voltage[:, None, None] * 1000
    wavelength = 12.2643247 / torch.sqrt(volts * (1 + volts * 0.978466e-6))
    cs = batch.spherical_aberration[:, None, None] * 1e7
    chi = (math.pi * wavelength * defocus * frequency**2
           + math.pi / 2 * cs * wavelength**3 * frequency**4
           - torch.deg2rad(batch.phase_shift)[:, None, None])
    amplitude = batch.amplitude_contrast[:, None, None]
    ctf = -torch.sqrt(1 - amplitude**2) * torch.sin(chi) + amplitude * torch.cos(chi)
    return spectra * ctf


def _published_highpass(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    box = images.shape[-1]
    spectra = torch.fft.rfftn(images, dim=(-2, -1))
    freq_y = torch.fft.fftfreq(box, d=1.0 / box, dtype=torch.float64, device=images.device)
    freq_x = torch.fft.rfftfreq(box, d=1.0 / box, dtype=torch.float64, device=images.device)
    y, x = torch.meshgrid(freq_y, freq_x, indexing="ij")
    frequency = torch.hypot(x / box, y / box)
    spectra = torch.where(frequency[None] < threshold[:, None, None], 0.0, spectra)
    return torch.fft.irfftn(spectra, dim=(-2, -1), s=(box, box))


def published_scores(volume: torch.Tensor, images: torch.Tensor, batch: ParticleBatch) -> torch.Tensor:
    """Scores exactly as the published CryoSieve computes them (float64, real space).

    ``volume``: ``(n, n, n)`` masked half map; ``images``: ``(b, n, n)``. The image is
    shifted by its origin, the real-space projection is CTF-modulated, the difference
    and the image are high-passed by FFT masking, and squared norms are subtracted.
    Returns ``(b,)`` float64.
    """
    box = images.shape[-1]
    images = images.to(torch.float64)
    freq_y = torch.fft.fftfreq(box, d=1.0 / box, dtype=torch.float64, device=images.device)
    freq_x = torch.fft.rfftfreq(box, d=1.0 / box, dtype=torch.float64, device=images.device)
    phi = -2 * math.pi * (batch.origin_x[:, None, None] * freq_x[None, None, :] / box
                          + batch.origin_y[:, None, None] * freq_y[None, :, None] / box)
    shifted = torch.fft.irfftn(torch.fft.rfftn(images, dim=(-2, -1)) * torch.polar(torch.ones_like(phi), phi),
                               dim=(-2, -1), s=(box, box))
    projections = published_realspace_projection(volume, batch.rot.cpu().numpy(), batch.tilt.cpu().numpy(),
                                                 batch.psi.cpu().numpy()).to(images.device)
    projections = torch.fft.irfftn(_published_ctf_multiply(torch.fft.rfftn(projections, dim=(-2, -1)), batch),
                                   dim=(-2, -1), s=(box, box))
    difference = _published_highpass(projections - shifted, batch.highpass_cycles_per_pixel)
    shifted = _published_highpass(shifted, batch.highpass_cycles_per_pixel)
    return (difference**2).sum(dim=(-2, -1)) - (shifted**2).sum(dim=(-2, -1))
