"""Fourier shells, the Fourier shell correlation and FSC weighting: defined once.

Conventions (RELION's ``getFSC``): a component of the ``(n, n, n // 2 + 1)`` half transform
(``rfftn`` order, frequencies in cycles per box) belongs to shell ``round(|k|)``; shells
0 .. n // 2 are reported (shell ``i`` has resolution ``n * voxel / i`` Å; the cube's corners
beyond ``n / 2`` belong to none); every stored component of the half transform counts once.
The same shells serve post-processing, the sieve's reference weighting and per-shell filters
(the sieve sums over the full transform, Friedel mates counted: :func:`fsc_of_transforms`).
"""

from __future__ import annotations

import numpy as np
import torch

from cryosieve.fourier import irfftn, rfftn, squared_radius


def shell_index(size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Shell (rounded radius in cycles per box) of each component of a ``(size, size, size // 2 + 1)``
    half transform: int64 of that shape."""
    return torch.round(torch.sqrt(squared_radius(size, device))).long()


def shell_count(size: int) -> int:
    """Number of shells reported for an ``n`` box: 0 .. n // 2."""
    return size // 2 + 1


def shell_resolutions(size: int, voxel_size: float) -> np.ndarray:
    """Resolution (Å) of shells 0 .. n // 2: ``n * voxel / shell`` (infinite at shell 0); ``(n // 2 + 1,)``."""
    shells = np.arange(shell_count(size), dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(shells > 0, size * voxel_size / np.maximum(shells, 1e-300), np.inf)


def shell_sum(values: torch.Tensor, shells: torch.Tensor, count: int) -> torch.Tensor:
    """Sum of real ``values`` (half-transform shaped) per shell 0 .. ``count`` - 1 (others
    ignored): ``(count,)`` float64."""
    keep = shells < count
    return torch.zeros(count, dtype=torch.float64, device=values.device).index_add_(
        0, shells[keep], values[keep].to(torch.float64))


def friedel_weights(size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """How many components of the full transform each component of the ``(n, n, n // 2 + 1)`` half
    transform stands for: 2, or 1 on the planes ``kx = 0`` and (even ``n``) ``kx = n / 2``; float64."""
    weight = torch.full((size, size, size // 2 + 1), 2.0, dtype=torch.float64, device=device)
    weight[..., 0] = 1.0
    if size % 2 == 0:
        weight[..., -1] = 1.0
    return weight


def fsc_of_transforms(first: torch.Tensor, second: torch.Tensor, size: int,
                      friedel_weighted: bool = False) -> torch.Tensor:
    """FSC of two ``(n, n, n // 2 + 1)`` half transforms of an ``n`` box: ``(n // 2 + 1,)`` float64;
    a shell without power gives 0.

    ``friedel_weighted``: sum over every component of the full transform (each half-transform
    component weighted by :func:`friedel_weights`) instead of RELION's one count per stored
    component. The two differ by noise only; post-processing uses RELION's, to report RELION's
    numbers, and the sieve's reference weighting the full transform, as it always has.
    """
    shells = shell_index(size, first.device)
    count = shell_count(size)
    weight = friedel_weights(size, first.device) if friedel_weighted else torch.ones((), dtype=torch.float64,
                                                                                     device=first.device)
    cross = shell_sum((first * second.conj()).real * weight, shells, count)
    power_first = shell_sum(first.abs() ** 2 * weight, shells, count)
    power_second = shell_sum(second.abs() ** 2 * weight, shells, count)
    denominator = torch.sqrt(power_first * power_second)
    return torch.where(denominator > 0, cross / denominator.clamp_min(1e-300), torch.zeros_like(cross))


def fourier_shell_correlation(first: torch.Tensor, second: torch.Tensor, friedel_weighted: bool = False
                              ) -> torch.Tensor:
    """FSC of two ``(n, n, n)`` real maps: ``(n // 2 + 1,)`` float64 for shells 0 .. n // 2 (RELION's
    ``getFSC``, or over the full transform: see :func:`fsc_of_transforms`)."""
    size = first.shape[-1]
    return fsc_of_transforms(rfftn(first.to(torch.float64)), rfftn(second.to(torch.float64)), size, friedel_weighted)


def fsc_weight(fsc: np.ndarray) -> np.ndarray:
    """Per-shell weight ``sqrt(2 FSC / (1 + FSC))`` (Rosenthal and Henderson 2003; RELION's
    ``applyFscWeighting``), zero where the FSC is not positive: ``(m,)`` float64."""
    values = np.asarray(fsc, dtype=np.float64)
    positive = np.clip(values, 0.0, 1.0)
    return np.where(values > 0, np.sqrt(2 * positive / (1 + positive)), 0.0)


def threshold_crossing(fsc: torch.Tensor | np.ndarray, threshold: float = 0.143) -> float | None:
    """The shell (cycles per box, linearly interpolated between shells) where the FSC first falls below
    ``threshold`` after shell 0; ``None`` when it never does."""
    values = fsc.detach().cpu().double().tolist() if isinstance(fsc, torch.Tensor) else \
        np.asarray(fsc, dtype=np.float64).tolist()
    for shell in range(1, len(values)):
        if values[shell] < threshold:
            previous, current = values[shell - 1], values[shell]
            fraction = (previous - threshold) / (previous - current) if previous != current else 0.0
            return float(shell - 1 + fraction)
    return None


def resolution_at_threshold(fsc: torch.Tensor, box: int, voxel_size: float, threshold: float = 0.143) -> float:
    """Resolution in Å where the FSC first falls below ``threshold`` (linear interpolation between
    shells, :func:`threshold_crossing`). Returns the Nyquist resolution ``2 * voxel_size`` when it never does."""
    crossing = threshold_crossing(fsc, threshold)
    if crossing is None:
        return 2.0 * voxel_size
    return box * voxel_size / max(crossing, 1e-6)


def filter_by_shell(volume: torch.Tensor, weight: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Multiply a ``(n, n, n)`` map's transform by a per-shell weight.

    ``weight``: ``(n // 2 + 1,)`` values for the shells of :func:`shell_index`; shells beyond
    them (the corners of the cube) get zero. Returns a map of the input's dtype.
    """
    size = volume.shape[-1]
    shells = shell_index(size, volume.device)
    weight = torch.as_tensor(weight, device=volume.device)
    values = torch.cat([weight.to(volume.dtype), torch.zeros(1, dtype=volume.dtype, device=volume.device)])
    values = values[shells.clamp_max(weight.numel())]
    return irfftn(rfftn(volume) * values, size)
