"""Projection of a volume along particle poses.

:class:`FourierSliceProjector` samples central slices of the padded volume's
transform (Fourier slice theorem) by trilinear interpolation, at an arbitrary list of
2D frequencies, after RELION's gridding correction. This is the scoring hot path.
``torch-fourier-slice`` extracts whole padded slices and needs an inverse FFT to
return to the image grid (about 90 slices/s at box 128 on 2 cores); the scorer only
needs the slice at the image's own frequencies inside the high-pass band, so this
kernel gathers exactly those points from a pre-transformed, Friedel-folded grid.

The published real-space projector lives with the rest of the published scoring in
:mod:`cryosieve.scoring.published`.
"""

from __future__ import annotations

import functools
import math

import torch

from cryosieve.fourier import centred_coordinates, centred_padded_rfftn
from cryosieve.fsc import filter_by_shell


def gridding_correction(size: int, padded_size: int, dtype: torch.dtype = torch.float64,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """RELION's radial ``sinc^2`` gridding correction for trilinear interpolation.

    Returns ``(size, size, size)`` values ``sinc^2(r / padded_size)`` with ``r`` the
    distance in voxels from the centre voxel ``size // 2``; divide the volume by it (the
    tensor is shared by the callers of the same arguments: do not change it in place).
    """
    key = (size, padded_size, dtype, str(torch.device(device)))
    if size ** 3 * torch.finfo(dtype).bits // 8 <= _CACHED_CORRECTION_BYTES:
        return _cached_gridding_correction(*key)
    return _gridding_correction(*key)


#: The largest correction kept for the next call (the two half maps of a sieve, every round, 12 ms
#: each at box 128 on 2 cores): box 128 in float64, box 256 in float32.
_CACHED_CORRECTION_BYTES = 64 << 20


def _gridding_correction(size: int, padded_size: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    coordinate = centred_coordinates(size, device) ** 2
    radius = torch.sqrt(coordinate[:, None, None] + coordinate[None, :, None] + coordinate[None, None, :])
    radius = (radius / padded_size).to(dtype)
    sinc = torch.where(radius > 0, torch.sin(math.pi * radius) / (math.pi * radius).clamp_min(1e-30),
                       torch.ones_like(radius))
    return sinc * sinc


_cached_gridding_correction = functools.lru_cache(maxsize=2)(_gridding_correction)


class FourierSliceProjector:
    """Central slices of one volume's transform, sampled at chosen 2D frequencies.

    Parameters
    ----------
    volume:
        ``(n, n, n)`` real map indexed ``[z, y, x]``, centre at voxel ``n // 2``.
    pad_factor:
        Zero-padding factor before the 3D FFT (2, as RELION).
    spectrum_weight:
        Optional ``(n // 2 + 1,)`` real weight per Fourier shell of the volume (rounded
        radius in cycles per box, as :func:`cryosieve.fsc.fourier_shell_correlation`),
        e.g. FSC weighting; applied with :func:`cryosieve.fsc.filter_by_shell`.
    dtype:
        Complex dtype of the stored grid (``torch.complex64`` by default).
    """

    def __init__(self, volume: torch.Tensor, pad_factor: int = 2,
                 spectrum_weight: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.complex64) -> None:
        if volume.ndim != 3 or len(set(volume.shape)) != 1:
            raise ValueError(f"volume must be cubic, got shape {tuple(volume.shape)}")
        device = volume.device
        size = volume.shape[-1]
        padded = pad_factor * size
        half = padded // 2
        self.size, self.padded_size, self.pad_factor = size, padded, pad_factor
        real_dtype = torch.float64 if dtype == torch.complex128 else torch.float32
        real = volume.to(real_dtype)
        if spectrum_weight is not None:
            real = filter_by_shell(real, spectrum_weight)
        real = real / gridding_correction(size, padded, dtype=real_dtype, device=device)
        # Zero-padded with the centre voxel (size // 2) at the array origin, transformed, and stored
        # with zero frequency at [P/2, P/2, 0], plus the periodic copy of the -P/2 planes at +P/2 and
        # one zero column in x, so the 8 trilinear neighbours of any point with |k| < P/2 are in range.
        stored = torch.empty((padded + 1, padded + 1, half + 2), dtype=dtype, device=device)
        centred_padded_rfftn(real, padded, out=stored[:padded, :padded, :half + 1])
        stored[:, :, half + 1] = 0
        stored[padded, :padded] = stored[0, :padded]
        stored[:, padded] = stored[:, 0]
        self.grid = stored.reshape(-1)
        self.shape = (padded + 1, padded + 1, half + 2)
        self.device = device

    def to(self, device: torch.device | str) -> FourierSliceProjector:
        """This projector with its grid on ``device`` (itself when it is there already). The grid is
        complex64 by default, so a projector built on the CPU (:func:`cryosieve.precision.map_device`)
        can sample on a device without float64."""
        device = torch.device(device)
        if device == self.device:
            return self
        self.grid = self.grid.to(device)
        self.device = device
        return self

    def sample(self, rotations: torch.Tensor, frequency_y: torch.Tensor, frequency_x: torch.Tensor,
               scale: torch.Tensor | None = None) -> torch.Tensor:
        """Values of the central slices at the given 2D frequencies.

        Parameters
        ----------
        rotations:
            ``(b, 3, 3)`` RELION matrices ``A`` (see :mod:`cryosieve.geometry`).
        frequency_y, frequency_x:
            ``(p,)`` frequencies in cycles per box of the volume (|k| < n/2).
        scale:
            Optional ``(b,)`` factor multiplying the frequencies per particle (ratio of
            the volume's to the particle's pixel size).

        Returns
        -------
        ``(b, p)`` complex: the 2D DFT (unnormalised, centre at pixel ``n // 2``) of the
        projection at those frequencies.
        """
        real_dtype = torch.float32 if self.grid.dtype == torch.complex64 else torch.float64
        matrices = rotations.to(device=self.device, dtype=real_dtype)
        kx = frequency_x.to(device=self.device, dtype=real_dtype) * self.pad_factor
        ky = frequency_y.to(device=self.device, dtype=real_dtype) * self.pad_factor
        # k3 = A^T (kx, ky, 0): coordinates (x, y, z) of the 3D frequency.
        x = matrices[:, 0, 0, None] * kx + matrices[:, 1, 0, None] * ky
        y = matrices[:, 0, 1, None] * kx + matrices[:, 1, 1, None] * ky
        z = matrices[:, 0, 2, None] * kx + matrices[:, 1, 2, None] * ky
        if scale is not None:
            factor = scale.to(device=self.device, dtype=real_dtype)[:, None]
            x, y, z = x * factor, y * factor, z * factor
        # Friedel symmetry: the stored grid holds x >= 0 only.
        flip = x < 0
        sign = torch.where(flip, -1.0, 1.0).to(real_dtype)
        x, y, z = x * sign, y * sign, z * sign
        half = self.padded_size // 2
        x0, y0, z0 = torch.floor(x), torch.floor(y), torch.floor(z)
        fx, fy, fz = x - x0, y - y0, z - z0
        _, ny, nx = self.shape
        limit = half
        outside = (x0 >= limit) | (y0 + 1 > limit) | (z0 + 1 > limit) | (y0 < -limit) | (z0 < -limit)
        base = ((z0.long() + half) * ny + (y0.long() + half)) * nx + x0.long()
        base = torch.where(outside, torch.zeros_like(base), base)
        grid = self.grid
        result = torch.zeros(base.shape, dtype=grid.dtype, device=self.device)
        for dz, wz in ((0, 1 - fz), (1, fz)):
            for dy, wy in ((0, 1 - fy), (1, fy)):
                weight_zy = wz * wy
                offset = dz * ny * nx + dy * nx
                result += (weight_zy * (1 - fx)) * grid[base + offset]
                result += (weight_zy * fx) * grid[base + offset + 1]
        result = torch.where(flip, result.conj(), result)
        return torch.where(outside, torch.zeros_like(result), result)
