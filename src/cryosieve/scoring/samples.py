"""The Fourier scorer's samples: which ``rfft2`` samples of a ``box``-pixel image a score sums over.

:class:`BandSamples` lists the half-plane samples inside the widest band in use (the high-pass of
:class:`cryosieve.band.HighPass` at the particles' smallest pixel size, up to Nyquist) for the tensor
path; :class:`SampleBlocks` lays the same samples out in blocks of consecutive columns for the CPU
kernel (:mod:`cryosieve.scoring.kernels`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cryosieve.band import HighPass
from cryosieve.fourier import fft_frequencies, image_frequencies
from cryosieve.precision import to_device
from cryosieve.scoring import kernels


class BandSamples:
    """The half-plane Fourier samples of a ``box``-pixel image used by the scorer.

    Samples with ``lowest_cycles_per_pixel <= |k|/N < 1/2`` of the ``rfft2`` grid, as
    flat indices into a ``(box, box // 2 + 1)`` array, with their frequencies (cycles
    per box) and Friedel weights (1 on the ``kx = 0`` column, else 2), in the device's
    :func:`~cryosieve.precision.real_dtype`.
    """

    def __init__(self, box: int, lowest_cycles_per_pixel: float, device: torch.device | str) -> None:
        grid_y, grid_x = image_frequencies(box, "cpu")
        radius = torch.sqrt(grid_y**2 + grid_x**2)
        keep = HighPass.inside(radius / box, lowest_cycles_per_pixel)
        self.box = box
        self.flat_index = torch.nonzero(keep.reshape(-1))[:, 0].to(device)
        self.ky = to_device(grid_y[keep], device)
        self.kx = to_device(grid_x[keep], device)
        self.row = torch.nonzero(keep)[:, 0].to(device)  # index into fftfreq order of ky
        self.column = torch.nonzero(keep)[:, 1].to(device)  # index of kx
        self.radius_cycles_per_pixel = to_device(radius[keep] / box, device)
        self.weight = to_device(torch.where(grid_x[keep] == 0, 1.0, 2.0), device)
        self._blocks: SampleBlocks | None = None

    @property
    def blocks(self) -> SampleBlocks:
        """The same samples in the block layout of the CPU kernel (computed once)."""
        if self._blocks is None:
            self._blocks = SampleBlocks.from_band(self)
        return self._blocks


@dataclass(frozen=True)
class SampleBlocks:
    """Band samples as blocks of :data:`cryosieve.scoring.kernels.BLOCK` consecutive ``rfft2`` columns.

    Each block is ``BLOCK`` consecutive columns of one row; together the blocks cover every
    band sample exactly once (weight as in :class:`BandSamples`); the other entries of a
    block (outside the band, or already covered by another block) have weight 0. Blocks
    stay inside their row (``column + BLOCK <= width``), so the kernel reads no memory
    beyond the spectra and phases it is given.

    Attributes
    ----------
    row, column:
        ``(m,)`` int64: row (``fftfreq`` order) and first column of each block.
    ky:
        ``(m,)`` float64 frequency of the row, cycles per box.
    u2_cycles, cos2, sin2:
        ``(m * BLOCK,)`` float64: ``|k|^2`` (cycles per box, squared) and ``cos``/``sin`` of
        twice the sample's polar angle (for the astigmatic defocus).
    weight:
        ``(m * BLOCK,)`` float32 Friedel weight, 0 where the entry is not scored.
    width:
        Columns of the spectra and x phases the kernel reads: ``box // 2 + 1``, or more
        (zero-padded by the caller) for boxes narrower than a block.
    """

    row: np.ndarray
    column: np.ndarray
    ky: np.ndarray
    u2_cycles: np.ndarray
    cos2: np.ndarray
    sin2: np.ndarray
    weight: np.ndarray
    width: int

    @classmethod
    def from_band(cls, samples: BandSamples) -> SampleBlocks:
        block = kernels.BLOCK
        box = samples.box
        width = max(box // 2 + 1, block)
        weight = np.zeros((box, width), dtype=np.float32)
        rows = samples.row.cpu().numpy()
        columns = samples.column.cpu().numpy()
        weight[rows, columns] = samples.weight.cpu().numpy()
        block_rows, block_columns, block_weights = [], [], []
        for r in range(box):
            remaining = weight[r].copy()
            while True:
                band = np.flatnonzero(remaining)
                if band.size == 0:
                    break
                start = min(int(band[0]), width - block)
                block_rows.append(r)
                block_columns.append(start)
                block_weights.append(remaining[start:start + block].copy())
                remaining[start:start + block] = 0.0
        row = np.asarray(block_rows, dtype=np.int64)
        column = np.asarray(block_columns, dtype=np.int64)
        ky = fft_frequencies(box)[row]
        kx = (column[:, None] + np.arange(block)[None, :]).astype(np.float64)
        ky_full = np.broadcast_to(ky[:, None], kx.shape)
        u2 = kx**2 + ky_full**2
        safe = np.where(u2 > 0, u2, 1.0)
        return cls(row=row, column=column, ky=ky, u2_cycles=u2.reshape(-1),
                   cos2=np.where(u2 > 0, (kx**2 - ky_full**2) / safe, 1.0).reshape(-1),
                   sin2=np.where(u2 > 0, 2 * kx * ky_full / safe, 0.0).reshape(-1),
                   weight=np.concatenate(block_weights).astype(np.float32) if block_weights
                   else np.zeros(0, dtype=np.float32),
                   width=width)
