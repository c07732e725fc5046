"""Fourier shell correlation between two cubic maps."""

from __future__ import annotations

import torch


def shell_index(size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Rounded radius (cycles per box) of each voxel of a ``(size, size, size // 2 + 1)`` rfft grid."""
    k = torch.fft.fftfreq(size, d=1.0 / size, device=device, dtype=torch.float64)
    kx = torch.fft.rfftfreq(size, d=1.0 / size, device=device, dtype=torch.float64)
    radius = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)
    return torch.round(radius).long()


def fourier_shell_correlation(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """FSC of two ``(n, n, n)`` real maps.

    Returns ``(n // 2 + 1,)`` float64 values for shells 0 .. n/2 (shell ``i`` holds
    voxels of rounded radius ``i`` cycles per box; its resolution is ``n * voxel / i`` Å).
    Uses every voxel of the full transform (the rfft half counted with Friedel weights).
    """
    size = first.shape[-1]
    f1 = torch.fft.rfftn(first.to(torch.float64), dim=(-3, -2, -1))
    f2 = torch.fft.rfftn(second.to(torch.float64), dim=(-3, -2, -1))
    shells = shell_index(size, first.device)
    weight = torch.full(shells.shape, 2.0, dtype=torch.float64, device=first.device)
    weight[..., 0] = 1.0
    if size % 2 == 0:
        weight[..., -1] = 1.0
    count = size // 2 + 1
    keep = shells < count
    index = shells[keep]
    w = weight[keep]

    def shell_sum(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(count, dtype=torch.float64, device=first.device).index_add_(0, index, values[keep] * w)

    cross = shell_sum((f1 * f2.conj()).real)
    power1 = shell_sum(f1.abs() ** 2)
    power2 = shell_sum(f2.abs() ** 2)
    denominator = torch.sqrt(power1 * power2)
    return torch.where(denominator > 0, cross / denominator.clamp_min(1e-300), torch.zeros_like(cross))


def resolution_at_threshold(fsc: torch.Tensor, box: int, voxel_size: float, threshold: float = 0.143) -> float:
    """Resolution in Å where the FSC first falls below ``threshold`` (linear interpolation).

    Returns the Nyquist resolution ``2 * voxel_size`` when it never does.
    """
    values = fsc.detach().cpu().double().tolist()
    for shell in range(1, len(values)):
        if values[shell] < threshold:
            previous, current = values[shell - 1], values[shell]
            fraction = (previous - threshold) / (previous - current) if previous != current else 0.0
            crossing = shell - 1 + fraction
            return box * voxel_size / max(crossing, 1e-6)
    return 2.0 * voxel_size


def filter_by_shell(volume: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Multiply a ``(n, n, n)`` map's transform by a per-shell weight.

    ``weight``: ``(n // 2 + 1,)`` values for the shells of :func:`shell_index`; shells beyond
    them (the corners of the cube) get zero. Returns a map of the input's dtype.
    """
    size = volume.shape[-1]
    shells = shell_index(size, volume.device)
    weight = torch.as_tensor(weight, device=volume.device)
    values = torch.cat([weight.to(volume.dtype), torch.zeros(1, dtype=volume.dtype, device=volume.device)])
    values = values[shells.clamp_max(weight.numel())]
    return torch.fft.irfftn(torch.fft.rfftn(volume, dim=(-3, -2, -1)) * values, s=volume.shape[-3:],
                            dim=(-3, -2, -1))
