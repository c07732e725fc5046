"""The tensor engine: insertion of particle images into the grid with torch, on any device.

The same insertion as the numba engine (:mod:`.cpu`), written with batched torch
operations so that it runs on CUDA (and on the CPU, where the numba engine is about 30x
faster at inserting and needs no torch import; select this one with
``engine="torch"``): the values come from the same samples, origin phases and CTF
(:mod:`.samples`, :meth:`cryosieve.ctf.CtfParameters.evaluate`), and the insertion is an
``index_add_`` of the 8 trilinear neighbours of every sample, placed by the grid's
conventions (:mod:`cryosieve.reconstruct.grid`, :func:`~.grid.fold_and_locate_torch`).
The grids are torch tensors; the operations of :mod:`.grid` take them as they are.

Number formats (:mod:`cryosieve.precision`): the images are transformed in float32, as by
the numba engine; values, weights and grids are float64 where the device has float64, else
float32 with compensated grid sums (:class:`~cryosieve.precision.GridSum`), and the grids
come back in float64 (on the CPU for such a device).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cryosieve.batch import ParticleBatch
from cryosieve.fourier import origin_phases
from cryosieve.io.stack import images_on
from cryosieve.precision import GridSum, real_dtype, to_device
from cryosieve.reconstruct.grid import fold_and_locate_torch, grid_shape, trilinear_corners_torch
from cryosieve.reconstruct.samples import SliceSamples


@dataclass(frozen=True)
class TorchSamples:
    """:class:`~cryosieve.reconstruct.samples.SliceSamples` as ``(p,)`` tensors on one device
    (``flat_index``, ``row``, ``column`` int64; ``frequency_y``, ``frequency_x`` in cycles per
    box and ``multiplicity`` of the device's :func:`~cryosieve.precision.real_dtype`)."""

    box: int
    flat_index: torch.Tensor
    row: torch.Tensor
    column: torch.Tensor
    frequency_y: torch.Tensor
    frequency_x: torch.Tensor
    multiplicity: torch.Tensor

    @classmethod
    def from_samples(cls, samples: SliceSamples, device: torch.device | str = "cpu") -> TorchSamples:
        def tensor(values: np.ndarray) -> torch.Tensor:
            return to_device(values, device)

        return cls(box=samples.box, flat_index=tensor(samples.flat_index), row=tensor(samples.row),
                   column=tensor(samples.column), frequency_y=tensor(samples.frequency_y),
                   frequency_x=tensor(samples.frequency_x), multiplicity=tensor(samples.multiplicity))


def prepare_slices(images: torch.Tensor, batch: ParticleBatch, samples: TorchSamples,
                   apply_ctf: bool) -> torch.Tensor:
    """Values and weights to insert for a batch of images (the twin of
    :func:`cryosieve.reconstruct.cpu.prepare_slices_cpu`).

    Parameters
    ----------
    images:
        ``(b, n, n)`` real images ``[y, x]`` on the samples' device.
    batch:
        The particles: origins, pixel sizes and CTF terms.
    samples:
        Which ``rfft2`` samples to keep.
    apply_ctf:
        Multiply by the particles' CTF (:meth:`cryosieve.ctf.CtfParameters.evaluate`) and
        weigh by its square; otherwise weight 1.

    Returns
    -------
    ``(b, p, 3)`` of the device's :func:`~cryosieve.precision.real_dtype` on the images' device:
    real and imaginary parts of ``C * S`` and ``C^2``, times the samples' multiplicity. ``S`` is
    the image's DFT (of the float32 images, as the numba engine), centred at pixel ``n // 2``
    and shifted by the origin.
    """
    box = images.shape[-1]
    device = images.device
    spectra = torch.fft.rfft2(images.to(torch.float32)).reshape(images.shape[0], -1)[:, samples.flat_index]
    phase_y, phase_x = origin_phases(box, batch.on("origin_y", device), batch.on("origin_x", device))
    values = spectra * phase_y[:, samples.row] * phase_x[:, samples.column]
    if apply_ctf:
        scale = to_device(1.0 / (box * batch.pixel_size), device)[:, None]
        ctf = batch.ctf.evaluate(samples.frequency_x * scale, samples.frequency_y * scale)
        values = values * ctf
        weights = ctf * ctf
    else:
        weights = torch.ones(values.shape, dtype=real_dtype(device), device=device)
    multiplicity = samples.multiplicity
    return torch.stack([values.real * multiplicity, values.imag * multiplicity, weights * multiplicity], dim=-1)


def insert_slices_torch(grid: torch.Tensor, rotations: torch.Tensor, frequency_y: torch.Tensor,
                        frequency_x: torch.Tensor, values: torch.Tensor, pad_factor: int,
                        chunk_points: int = 1 << 21) -> None:
    """Trilinear insertion with ``index_add_`` (any device; the twin of
    :func:`cryosieve.reconstruct.cpu.insert_slices_cpu`).

    Parameters
    ----------
    grid:
        A tensor grid of :mod:`cryosieve.reconstruct.grid` with ``P = pad_factor * n``;
        added to.
    rotations:
        ``(b, 3, 3)`` RELION matrices ``A``.
    frequency_y, frequency_x:
        ``(p,)`` image frequencies in cycles per box (``|k| < n/2``).
    values:
        ``(b, p, 3)`` real and imaginary parts of the values, and the weights, to insert
        (:func:`prepare_slices`).
    chunk_points:
        Samples located at a time (bounds the work space).
    """
    half = (grid.shape[0] - 1) // 2
    size_y, size_x = grid.shape[1], grid.shape[2]
    flat = grid.view(-1, 3)
    real = grid.dtype
    count, points = values.shape[:2]
    per_chunk = max(1, chunk_points // max(points, 1))
    kx = frequency_x.to(real) * pad_factor
    ky = frequency_y.to(real) * pad_factor
    for start in range(0, count, per_chunk):
        a = rotations[start:start + per_chunk].to(real)
        x = a[:, 0, 0, None] * kx + a[:, 1, 0, None] * ky
        y = a[:, 0, 1, None] * kx + a[:, 1, 1, None] * ky
        z = a[:, 0, 2, None] * kx + a[:, 1, 2, None] * ky
        corner, fx, fy, fz, sign = fold_and_locate_torch(x, y, z, half, size_y, size_x)
        chunk = values[start:start + per_chunk].to(real)
        chunk = torch.stack([chunk[..., 0], chunk[..., 1] * sign, chunk[..., 2]], dim=-1)
        indices, sources = [], []
        for index, weight in trilinear_corners_torch(corner, fx, fy, fz, size_y, size_x):
            indices.append(index.reshape(-1))
            sources.append((chunk * weight[..., None]).reshape(-1, 3))
        flat.index_add_(0, torch.cat(indices), torch.cat(sources))


class TensorInsertion:
    """The tensor engine's insertion of a reconstruction's batches, on ``device``.

    ``box``: image size ``n``; ``pad_factor``: the grid's padding; ``groups``: the maps, one
    :class:`~cryosieve.precision.GridSum` each; ``apply_ctf``: CTF correction.
    """

    def __init__(self, box: int, pad_factor: int, groups: Sequence[int], apply_ctf: bool,
                 device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.samples = TorchSamples.from_samples(SliceSamples.for_box(box), self.device)
        self.pad_factor = pad_factor
        self.apply_ctf = apply_ctf
        self.grids = {group: GridSum(grid_shape(box, pad_factor), self.device) for group in groups}

    def insert(self, images: np.ndarray | torch.Tensor, batch: ParticleBatch, labels: np.ndarray) -> None:
        """Insert ``(b, n, n)`` float32 images (an array, or a page-locked tensor copied asynchronously) of the
        particles ``batch`` into the grids of ``labels`` ``(b,)``."""
        matrices = batch.on("rotations", self.device)
        values = prepare_slices(images_on(images, self.device), batch, self.samples,
                                self.apply_ctf)
        for group, grid in self.grids.items():
            index = torch.as_tensor(np.flatnonzero(labels == group), device=self.device)
            if index.numel():
                insert_slices_torch(grid.target, matrices[index], self.samples.frequency_y,
                                    self.samples.frequency_x, values[index], self.pad_factor)
                grid.added(int(index.numel()))

    def pop(self, group: int) -> torch.Tensor:
        """The accumulated float64 tensor grid of one map (no longer held here; on the CPU for a
        device without float64)."""
        return self.grids.pop(group).result()

    def snapshot(self, group: int) -> torch.Tensor:
        """A float64 copy of one map's grid so far; the accumulation goes on."""
        return self.grids[group].result(copy=True)

    def release(self) -> None:
        """Drop the grids."""
        self.grids.clear()
