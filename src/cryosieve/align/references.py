"""The reference of one half-set: its own masked half map, weighted by its own estimate of the half-map FSC.

Gold standard: a half-set is refined against the map of its own particles only, and nothing of the other
half-set reaches it, not even the FSC between the two half maps. So each half-set's particles are split
once more in two (alternately, in the order of the file), and the FSC between the two masked quarter
maps, ``FSC_q``, gives the FSC the half map would have with an independent half map of as many particles:
``FSC_half = 2 FSC_q / (1 + FSC_q)`` (twice the signal-to-noise ratio per shell). The reference is the
masked half map weighted per shell by ``sqrt(2 FSC_half / (1 + FSC_half))`` (:func:`cryosieve.fsc.fsc_weight`,
as the sieve weighs its references), and searched up to where ``FSC_half`` first falls below 0.143 (the
current resolution), never below the frequency of ``lowest_resolution``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cryosieve.fsc import fourier_shell_correlation, fsc_weight, threshold_crossing
from cryosieve.postprocess.report import FSC_THRESHOLD
from cryosieve.precision import map_device
from cryosieve.projection import FourierSliceProjector


def quarter_labels(halves: np.ndarray) -> np.ndarray:
    """Each particle's quarter: ``10 h + 1`` or ``10 h + 2`` for half-set ``h``, alternately in the order of
    the file within each half-set: ``(n,)`` int64."""
    halves = np.asarray(halves, dtype=np.int64)
    labels = np.empty_like(halves)
    for half in np.unique(halves):
        members = np.flatnonzero(halves == half)
        labels[members] = 10 * half + 1 + np.arange(len(members)) % 2
    return labels


def half_map_fsc(quarter_fsc: np.ndarray) -> np.ndarray:
    """``2 FSC_q / (1 + FSC_q)``: the FSC of a map of twice the particles of two quarter maps of FSC ``FSC_q``
    (per shell; negative values kept, at most 1)."""
    values = np.clip(np.asarray(quarter_fsc, dtype=np.float64), -0.5, 1.0)
    return 2 * values / (1 + values)


def crossing(fsc: np.ndarray, threshold: float = FSC_THRESHOLD) -> float:
    """The frequency (shells, cycles per box; interpolated) where ``fsc`` first falls below ``threshold``
    after shell 0 (:func:`cryosieve.fsc.threshold_crossing`); the last shell when it never does."""
    reached = threshold_crossing(fsc, threshold)
    return float(len(fsc) - 1) if reached is None else reached


@dataclass
class HalfReference:
    """One half-set's reference.

    Attributes
    ----------
    masked:
        ``(n, n, n)`` float32: the half map times the mask.
    fsc:
        ``(n // 2 + 1,)`` the half-map FSC estimated from the half-set's own quarter maps.
    limit:
        Frequency (cycles per box, exclusive) the search compares up to.
    resolution:
        Å: the half-set's own resolution, ``n * pixel / crossing`` of ``fsc`` at 0.143.
    """

    masked: np.ndarray
    fsc: np.ndarray
    limit: float
    resolution: float
    _projectors: dict[str, FourierSliceProjector] = field(default_factory=dict, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_projectors"] = {}  # rebuilt where it is used (a grid of 8 (n + 1)^3 bytes or more)
        return state

    @property
    def weight(self) -> np.ndarray:
        """``(n // 2 + 1,)`` per-shell weight of the map: ``fsc_weight(fsc)`` up to the limit's shell, 0 beyond."""
        weight = fsc_weight(self.fsc)
        weight[int(np.ceil(self.limit)) + 1:] = 0.0
        return weight

    def better_than(self, other: HalfReference) -> bool:
        """Whether this map is better than ``other``: its resolution is finer or, where both reach the same
        shell (Nyquist, for clean data), its FSC is higher in sum."""
        if abs(self.resolution - other.resolution) > 1e-9 * other.resolution:
            return self.resolution < other.resolution
        return float(self.fsc[1:].sum()) > float(other.fsc[1:].sum())

    def projector(self, device: torch.device | str) -> FourierSliceProjector:
        """The central-slice sampler of the weighted reference on ``device`` (built where whole maps are, once
        per device)."""
        key = str(torch.device(device))
        if key not in self._projectors:
            volume = torch.from_numpy(self.masked).to(map_device(device))
            self._projectors[key] = FourierSliceProjector(volume, spectrum_weight=torch.from_numpy(self.weight)
                                                          ).to(device)
        return self._projectors[key]


def half_reference(half_map: np.ndarray, quarters: tuple[np.ndarray, np.ndarray], mask: np.ndarray,
                   pixel_size: float, lowest_resolution: float) -> HalfReference:
    """The reference of a half-set from its map, its two quarter maps and the mask (all ``(n, n, n)``);
    ``pixel_size`` and ``lowest_resolution`` in Å."""
    box = half_map.shape[-1]
    masked = np.multiply(half_map, mask, dtype=np.float32)
    first, second = (torch.from_numpy(np.multiply(quarter, mask, dtype=np.float32)) for quarter in quarters)
    fsc = half_map_fsc(fourier_shell_correlation(first, second, friedel_weighted=True).numpy())
    reached = crossing(fsc)
    floor = box * pixel_size / lowest_resolution
    limit = float(min(max(reached, floor, 2.0), box / 2 - 1e-6))
    return HalfReference(masked=masked, fsc=fsc, limit=limit, resolution=box * pixel_size / max(reached, 1e-6))
