"""The numba engine: insertion of particle images into the grid on the CPU.

The insertion is the hot path of a reconstruction. Three numba passes per batch, each
parallel: :func:`prepare_slices_cpu` computes every sample's value ``C S`` and weight
``C^2`` (one fused pass over the image transforms, the origin phases and the CTF of
:func:`cryosieve.ctf.ctf_value`), :func:`locate_samples` its place in the grid (the
grid's conventions: :mod:`cryosieve.reconstruct.grid`), and the scatter spreads it to its
8 trilinear neighbours. :class:`GridAccumulators` gives each thread a grid of its own
(the two half maps, or copies of one map summed at the end, as long as they fit in
:data:`ACCUMULATION_MEMORY`; beyond that, threads share a grid by z planes), so there are
no write races and no atomics. The scatter prefetches the grid rows of the sample
:data:`PREFETCH_DISTANCE` ahead; without that it waits on a cache miss at nearly every
update. Measured on 2 cores at box 128 (128 random-pose slices of 6,434 samples): 0.09 ms
per particle, against 3.2 ms for the batched ``index_add_`` of the tensor engine
(:mod:`.tensor_path`, kept for CUDA) and 3.9 ms for
``torch_fourier_slice.insert_central_slices_rfft_3d`` (whole padded slices, no CTF
weight, generic ``index_put_``), which was therefore not used.

numpy, scipy's FFT and numba only: this engine does not import torch (about a second of
start-up, a quarter of the whole run at box 128 with 5,000 particles).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.fft

from cryosieve.batch import ParticleBatch
from cryosieve.fourier import fft_workers, origin_phases
from cryosieve.reconstruct.grid import grid_shape
from cryosieve.reconstruct.samples import SliceSamples

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; the tensor engine works without it
    numba = None  # type: ignore[assignment]  # None marks numba as missing

#: Whether this engine can run (numba is installed).
AVAILABLE = numba is not None

#: How many samples ahead the CPU scatter prefetches its grid rows.
PREFETCH_DISTANCE = 16
#: Memory (bytes) the CPU accumulation grids may take when they are copied per thread
#: (one grid per map is always allocated; beyond that threads share a grid by planes):
#: box 128 needs 0.2 GB per grid, box 256 1.6 GB.
ACCUMULATION_MEMORY = 2 * 1024**3

if numba is not None:
    from cryosieve._intrinsics import prefetch_for_write as _prefetch_for_write
    from cryosieve.ctf import ctf_value, particle_terms
    from cryosieve.reconstruct.grid import fold_and_locate

    # The kernels take no annotations: numba types their arguments.
    @numba.njit(parallel=True, cache=True, nogil=True)
    def _prepare_kernel(  # type: ignore[no-untyped-def]
            spectra, rows, columns, radius2, cos_sample2, sin_sample2, multiplicity, phase_y,
            phase_x, apply_ctf, ctf_terms, values):  # pragma: no cover - compiled
        # values[i, j] = (C S, C^2) of sample j of particle i (the CTF of cryosieve.ctf, its
        # terms per particle for frequencies in cycles per box), with the sample's direction
        # terms cos/sin(2 angle) shared by all particles.
        count = spectra.shape[0]
        points = rows.shape[0]
        for i in numba.prange(count):
            particle = particle_terms(ctf_terms, i)
            for j in range(points):
                value = spectra[i, rows[j], columns[j]] * phase_y[i, rows[j]] * phase_x[i, columns[j]]
                m = multiplicity[j]
                if apply_ctf:
                    ctf = ctf_value(radius2[j], cos_sample2[j], sin_sample2[j], particle)
                    values[i, j, 0] = value.real * ctf * m
                    values[i, j, 1] = value.imag * ctf * m
                    values[i, j, 2] = ctf * ctf * m
                else:
                    values[i, j, 0] = value.real * m
                    values[i, j, 1] = value.imag * m
                    values[i, j, 2] = m

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _locate_kernel(  # type: ignore[no-untyped-def]
            half, size_y, size_x, rotations, frequency_y, frequency_x, values, sharers, base,
            record, plane_owner):  # pragma: no cover - compiled
        # Where each sample lands (fold_and_locate): flat index of its lower trilinear
        # corner in a (size_z, size_y, size_x) grid, its fractional offsets, its value
        # (conjugated when the sample is stored as its Friedel mate, x < 0), and which of
        # ``sharers`` threads owns the plane of its lower corner.
        count = values.shape[0]
        points = frequency_x.shape[0]
        for i in numba.prange(count):
            a00 = rotations[i, 0, 0]
            a01 = rotations[i, 0, 1]
            a02 = rotations[i, 0, 2]
            a10 = rotations[i, 1, 0]
            a11 = rotations[i, 1, 1]
            a12 = rotations[i, 1, 2]
            for j in range(points):
                kx = frequency_x[j]
                ky = frequency_y[j]
                x = a00 * kx + a10 * ky
                y = a01 * kx + a11 * ky
                z = a02 * kx + a12 * ky
                plane, corner, fx, fy, fz, sign = fold_and_locate(x, y, z, half, size_y, size_x)
                base[i, j] = corner
                plane_owner[i, j] = plane % sharers
                record[i, j, 0] = values[i, j, 0]
                record[i, j, 1] = sign * values[i, j, 1]
                record[i, j, 2] = values[i, j, 2]
                record[i, j, 3] = fx
                record[i, j, 4] = fy
                record[i, j, 5] = fz

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _scatter_kernel(  # type: ignore[no-untyped-def]
            grids, base, record, plane_owner, particle_lists, tasks,
            distance):  # pragma: no cover - compiled
        # Task t = (grid g, owner r, sharers k) scatters the particles particle_lists[g]
        # (-1 ends a list) into grids[g], writing only the z planes with z % k == r: the
        # threads of a grid never write to the same plane, so there are no races. The grid
        # rows of the sample ``distance`` ahead are prefetched: without, the scatter waits
        # on cache misses (~70 ns per sample at box 128 on one core; ~15 ns with).
        points = base.shape[1]
        size_y = grids.shape[2]
        size_x = grids.shape[3]
        plane = size_y * size_x
        for t in numba.prange(tasks.shape[0]):
            g = tasks[t, 0]
            owner = tasks[t, 1]
            sharers = tasks[t, 2]
            flat = grids[g].reshape(-1)
            for slot in range(particle_lists.shape[1]):
                i = particle_lists[g, slot]
                if i < 0:
                    break
                for j in range(points):
                    if j + distance < points:
                        ahead = base[i, j + distance]
                        low_ahead = plane_owner[i, j + distance]
                        high_ahead = low_ahead + 1 if low_ahead + 1 < sharers else 0
                        if low_ahead == owner:
                            _prefetch_for_write(flat, ahead * 3)
                            _prefetch_for_write(flat, ahead * 3 + 5)
                            _prefetch_for_write(flat, (ahead + size_x) * 3)
                            _prefetch_for_write(flat, (ahead + size_x) * 3 + 5)
                        if high_ahead == owner:
                            _prefetch_for_write(flat, (ahead + plane) * 3)
                            _prefetch_for_write(flat, (ahead + plane) * 3 + 5)
                            _prefetch_for_write(flat, (ahead + plane + size_x) * 3)
                            _prefetch_for_write(flat, (ahead + plane + size_x) * 3 + 5)
                    corner = base[i, j]
                    low = plane_owner[i, j]
                    own_low = low == owner
                    own_high = (low + 1 if low + 1 < sharers else 0) == owner
                    if not (own_low or own_high):
                        continue
                    re = record[i, j, 0]
                    im = record[i, j, 1]
                    w = record[i, j, 2]
                    fx = record[i, j, 3]
                    fy = record[i, j, 4]
                    fz = record[i, j, 5]
                    for dz in range(2):
                        if dz == 0:
                            if not own_low:
                                continue
                            wz = 1.0 - fz
                        else:
                            if not own_high:
                                continue
                            wz = fz
                        for dy in range(2):
                            wzy = wz * (fy if dy == 1 else 1.0 - fy)
                            w0 = wzy * (1.0 - fx)
                            w1 = wzy * fx
                            o = (corner + dz * plane + dy * size_x) * 3
                            flat[o] += w0 * re
                            flat[o + 1] += w0 * im
                            flat[o + 2] += w0 * w
                            flat[o + 3] += w1 * re
                            flat[o + 4] += w1 * im
                            flat[o + 5] += w1 * w


def prepare_slices_cpu(images: np.ndarray, batch: ParticleBatch, samples: SliceSamples,
                       apply_ctf: bool, out: np.ndarray | None = None) -> np.ndarray:
    """Values and weights to insert for a batch of images, as one fused numba pass (CPU).

    Parameters
    ----------
    images:
        ``(b, n, n)`` real images ``[y, x]``.
    batch:
        The particles: origins, pixel sizes and CTF terms.
    samples:
        Which ``rfft2`` samples to keep.
    apply_ctf:
        Multiply by the particles' CTF (:func:`cryosieve.ctf.ctf_value`) and weigh by its
        square; otherwise weight 1.
    out:
        Optional ``(>= b, p, 3)`` float64 work space (reused from batch to batch).

    Returns
    -------
    ``(b, p, 3)`` float64: real and imaginary parts of ``C * S`` and ``C^2``, times the
    samples' multiplicity. ``S`` is the image's DFT, centred at pixel ``n // 2`` and
    shifted by the origin (:func:`cryosieve.fourier.origin_phases`).
    """
    box = images.shape[-1]
    count = images.shape[0]
    # complex64 (the images are float32); scipy's FFT runs on several threads
    spectra = scipy.fft.rfft2(np.asarray(images, dtype=np.float32), workers=fft_workers())
    phase_y, phase_x = origin_phases(box, batch.origin_y, batch.origin_x)
    # the direction terms of ctf_value, shared by all particles
    radius2 = samples.frequency_x ** 2 + samples.frequency_y ** 2
    safe = np.where(radius2 > 0, radius2, 1.0)
    cos_sample2 = np.where(radius2 > 0, (samples.frequency_x ** 2 - samples.frequency_y ** 2) / safe, 1.0)
    sin_sample2 = np.where(radius2 > 0, 2 * samples.frequency_x * samples.frequency_y / safe, 0.0)
    terms = batch.ctf.kernel_terms(box, batch.pixel_size)
    values = np.empty((count, samples.size, 3), dtype=np.float64) if out is None else out[:count]
    _prepare_kernel(spectra, samples.row, samples.column, radius2, cos_sample2, sin_sample2, samples.multiplicity,
                    phase_y, phase_x, bool(apply_ctf), terms, values)
    return values


def locate_samples(shape: tuple[int, ...], rotations: np.ndarray, frequency_y: np.ndarray,
                   frequency_x: np.ndarray, values: np.ndarray, pad_factor: int, sharers: int = 1,
                   buffers: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower trilinear corner and offsets of every sample (CPU, numba).

    ``rotations``: ``(b, 3, 3)`` RELION matrices; ``frequency_y``, ``frequency_x``:
    ``(p,)`` cycles per box; ``values``: ``(b, p, 3)`` from :func:`prepare_slices_cpu`.
    Returns ``(base, record, plane_owner)``: ``(b, p)`` int64 flat voxel indices into a
    grid of ``shape[:3]`` (:mod:`cryosieve.reconstruct.grid`), ``(b, p, 6)`` float64
    (real, imaginary, weight, fx, fy, fz), and ``(b, p)`` int8 ``z % sharers`` of the
    lower corner; written into ``buffers`` (sliced to ``b``) when given.
    """
    half = (shape[0] - 1) // 2
    count, points = values.shape[0], values.shape[1]
    scaled = np.ascontiguousarray(np.asarray(rotations, dtype=np.float64) * pad_factor)
    if buffers is None:
        base = np.empty((count, points), dtype=np.int64)
        record = np.empty((count, points, 6), dtype=np.float64)
        plane_owner = np.empty((count, points), dtype=np.int8)
    else:
        base, record, plane_owner = buffers[0][:count], buffers[1][:count], buffers[2][:count]
    _locate_kernel(half, shape[1], shape[2], scaled, np.ascontiguousarray(frequency_y, dtype=np.float64),
                   np.ascontiguousarray(frequency_x, dtype=np.float64), np.ascontiguousarray(values), sharers,
                   base, record, plane_owner)
    return base, record, plane_owner


def insert_slices_cpu(grid: np.ndarray, rotations: np.ndarray, frequency_y: np.ndarray,
                      frequency_x: np.ndarray, values: np.ndarray, pad_factor: int) -> None:
    """Trilinear insertion into one grid on the CPU with the numba kernels (in place, one thread).

    ``grid``: a numpy grid of :mod:`cryosieve.reconstruct.grid`, ``P = pad_factor * n``,
    added to; ``frequency_y``, ``frequency_x``: ``(p,)`` cycles per box of the image;
    ``rotations``: ``(b, 3, 3)`` RELION matrices;
    ``values``: ``(b, p, 3)`` float64 from :func:`prepare_slices_cpu`. The reconstruction
    itself uses :class:`GridAccumulators`, which scatters with one thread per grid copy.
    """
    base, record, plane_owner = locate_samples(grid.shape, rotations, frequency_y, frequency_x, values,
                                               pad_factor)
    lists = np.arange(values.shape[0], dtype=np.int64)[None]
    tasks = np.array([[0, 0, 1]], dtype=np.int64)
    _scatter_kernel(grid[None], base, record, plane_owner, lists, tasks, PREFETCH_DISTANCE)


class GridAccumulators:
    """The CPU accumulation grids of one reconstruction.

    Each map (half-set) gets ``copies`` float64 grids of ``shape``
    (:func:`~cryosieve.reconstruct.grid.grid_shape`, summed at the end), each filled with
    its share of every batch by ``sharers`` threads that split its z planes (plane ``z``
    belongs to thread ``z % sharers``). So threads never write to the same memory.
    Copies are preferred (no thread re-reads another's samples) as long as all grids fit
    in ``memory_budget`` bytes; two half maps on two threads need one grid each and no
    sharing at all.
    """

    def __init__(self, shape: tuple[int, ...], groups: Sequence[int], threads: int, memory_budget: int,
                 batch_size: int, points: int) -> None:
        grid_bytes = int(np.prod(shape)) * 8
        maps = len(groups)
        threads_per_map = max(1, threads // maps)
        copies = max(1, min(threads_per_map, memory_budget // (grid_bytes * maps)))
        self.shape = shape
        self.groups = list(groups)
        self.copies = copies
        self.sharers = max(1, threads_per_map // copies)
        self.grids = np.zeros((maps * copies, *shape), dtype=np.float64)
        self.tasks = np.array([[grid, owner, self.sharers] for grid in range(maps * copies)
                               for owner in range(self.sharers)], dtype=np.int64)
        # Work space reused by every batch (fresh large arrays cost a page fault per 4 kB).
        self.values = np.empty((batch_size, points, 3), dtype=np.float64)
        self.base = np.empty((batch_size, points), dtype=np.int64)
        self.record = np.empty((batch_size, points, 6), dtype=np.float64)
        self.plane_owner = np.empty((batch_size, points), dtype=np.int8)

    def insert(self, rotations: np.ndarray, frequency_y: np.ndarray, frequency_x: np.ndarray,
               values: np.ndarray, labels: np.ndarray, pad_factor: int) -> None:
        """Insert a batch: ``values`` ``(b, p, 3)``, ``labels`` ``(b,)`` the map of each particle."""
        base, record, plane_owner = locate_samples(self.shape, rotations, frequency_y, frequency_x, values,
                                                   pad_factor, self.sharers,
                                                   (self.base, self.record, self.plane_owner))
        shares: list[np.ndarray] = []
        for group in self.groups:
            members = np.flatnonzero(labels == group)
            shares.extend(np.array_split(members, self.copies))
        width = max(1, max(share.size for share in shares))
        lists = np.full((len(shares), width), -1, dtype=np.int64)
        for index, share in enumerate(shares):
            lists[index, :share.size] = share
        _scatter_kernel(self.grids, base, record, plane_owner, lists, self.tasks, PREFETCH_DISTANCE)

    def pop(self, group: int) -> np.ndarray:
        """The grid of one map, its copies summed in place (a view; valid until the next pop)."""
        first = self.groups.index(group) * self.copies
        for copy in range(1, self.copies):
            np.add(self.grids[first], self.grids[first + copy], out=self.grids[first])
        result: np.ndarray = self.grids[first]
        return result

    def snapshot(self, group: int) -> np.ndarray:
        """A new array holding the grid of one map so far (its copies summed); the accumulation goes on."""
        first = self.groups.index(group) * self.copies
        return np.asarray(self.grids[first:first + self.copies].sum(axis=0))

    def release(self) -> None:
        """Drop the grids and work space."""
        empty: Any = np.empty(0)
        self.grids = self.values = self.base = self.record = self.plane_owner = empty


class NumbaInsertion:
    """The numba engine's insertion of a reconstruction's batches (CPU only).

    ``box``: image size ``n``; ``pad_factor``: the grid's padding; ``groups``: the maps, one
    grid each; ``apply_ctf``: CTF correction; ``batch_size``: the most images per batch.
    """

    def __init__(self, box: int, pad_factor: int, groups: Sequence[int], apply_ctf: bool, batch_size: int) -> None:
        self.samples = SliceSamples.for_box(box)
        self.pad_factor = pad_factor
        self.apply_ctf = apply_ctf
        self.accumulators = GridAccumulators(grid_shape(box, pad_factor), groups, numba.get_num_threads(),
                                             ACCUMULATION_MEMORY, batch_size, self.samples.size)

    def insert(self, images: np.ndarray, batch: ParticleBatch, labels: np.ndarray) -> None:
        """Insert ``(b, n, n)`` float32 images of the particles ``batch`` into the grids of ``labels`` ``(b,)``."""
        values = prepare_slices_cpu(images, batch, self.samples, self.apply_ctf, out=self.accumulators.values)
        self.accumulators.insert(batch.rotations, self.samples.frequency_y, self.samples.frequency_x, values, labels,
                                 self.pad_factor)

    def pop(self, group: int) -> np.ndarray:
        """The accumulated numpy grid of one map (see :meth:`GridAccumulators.pop`)."""
        return self.accumulators.pop(group)

    def snapshot(self, group: int) -> np.ndarray:
        """A copy of one map's grid so far (see :meth:`GridAccumulators.snapshot`)."""
        return self.accumulators.snapshot(group)

    def release(self) -> None:
        """Drop the grids and work space."""
        self.accumulators.release()
