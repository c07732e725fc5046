"""Direct Fourier inversion of a particle stack (a stand-in for ``relion_reconstruct``).

For a particle with RELION matrix ``A``, origin ``o`` (pixels) and CTF ``C``, the
origin-shifted, centred transform of its image satisfies
``S(k) = C(k) * Vhat(A^T k)`` (see :mod:`cryosieve.geometry`), ``Vhat`` being the 3D
DFT of the map centred at voxel ``n // 2``. The reconstruction is the least-squares
solution, one Fourier voxel at a time::

    Vhat(K) = sum_i C_i S_i / (sum_i C_i^2 + lambda)

accumulated on a grid padded by ``pad_factor`` (2, as RELION):

1. each image's ``rfft2`` is shifted by its origin and multiplied by its CTF
   (``rlnCtfBfactor`` and ``rlnCtfScalefactor`` included, as RELION does);
2. every half-plane sample with ``|k| < n/2`` is placed at ``pad * A^T k`` and spread
   to its 8 trilinear neighbours, ``C S`` into the data grid and ``C^2`` into the
   weight grid (only the ``x >= 0`` half of the Hermitian grid is stored; samples with
   ``x < 0`` are stored as their Friedel mates);
3. the ``x = 0`` plane is made Hermitian (each sample's Friedel mate adds there too);
4. for a point group, both grids are symmetrised: ``D(K) <- sum_R D(R K)`` by
   trilinear interpolation (RELION's ``BackProjector::applyPointGroupSymmetry``);
5. data / (weight + lambda) inside ``|K| < pad * n / 2`` (lambda: 1e-3 of the mean
   weight), inverse FFT, crop to ``n``, RELION's soft mask outside the sphere of radius
   ``n/2`` (``softMaskOutsideMap``, which ``relion_reconstruct`` applies too), and
   division by ``sinc^2`` (the trilinear kernel's transform: RELION's ``griddingCorrect``).

The insertion is the hot path. On the CPU it is done by numba kernels: one pass per
batch (parallel over particles) computes each sample's value and CTF weight, another
its lower trilinear corner and offsets, and the scatter gives each thread a grid of its
own (the two half maps, or copies of one map summed at the end, as long as they fit in
:data:`ACCUMULATION_MEMORY`; beyond that, threads share a grid by z planes), so there
are no write races and no atomics. The scatter prefetches the grid rows of the sample
16 ahead; without that it waits on a cache miss at nearly every update. Measured on 2
cores at box 128 (128 random-pose slices of 6,434 samples): 0.09 ms per particle, against
3.2 ms for the batched ``index_add_`` path (eight index/weight tensors per sample; kept
for CUDA and as a reference in :mod:`cryosieve._reconstruct_torch`) and 3.9 ms for
``torch_fourier_slice.insert_central_slices_rfft_3d`` (whole padded slices, no CTF
weight, generic ``index_put_``), which was therefore not used.

The CPU path is numpy, scipy's FFT and numba only: it does not import torch (about a
second of start-up, a quarter of the whole run at box 128 with 5,000 particles).

The stack is streamed in batches through :func:`~cryosieve.io.stack.prefetch_batches`;
memory is bounded by the padded grids (``(2n+1)^2 (n+2)`` voxels of 3 float64 each:
0.2 GB at box 128, 1.6 GB at box 256) plus one batch, never by the number of particles.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.fft

from cryosieve.ctf import CtfParameters
from cryosieve.errors import CryoSieveInputError, setting
from cryosieve.geometry import euler_to_matrix
from cryosieve.io.stack import StackReader, prefetch_batches
from cryosieve.io.star import ParticleTable
from cryosieve.progress import ProgressFactory, no_progress
from cryosieve.symmetry import canonical_name, symmetry_matrices

log = logging.getLogger("cryosieve")

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; keep the torch path usable
    numba = None

if TYPE_CHECKING:
    import torch

#: Regularisation of the division, relative to the mean weight inside the sphere.
RELATIVE_REGULARISATION = 1e-3
#: Width (voxels) of the raised-cosine edge of RELION's mask outside the box's sphere.
MASK_EDGE_WIDTH = 3.0


# ---------------------------------------------------------------------------------------
# Half-plane samples of an image
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SliceSamples:
    """The half-plane samples of a ``box``-pixel image that are inserted.

    Samples of the ``rfft2`` grid with ``|k| < box / 2`` and (``kx > 0`` or ``ky >= 0``),
    so that each Friedel pair of the full image transform appears exactly once.

    Attributes
    ----------
    flat_index:
        ``(p,)`` int64 indices into a flattened ``(box, box // 2 + 1)`` ``rfft2`` array.
    frequency_y, frequency_x:
        ``(p,)`` float64 frequencies in cycles per box.
    multiplicity:
        ``(p,)`` float64: 1, except 0.5 for the zero frequency (its own Friedel mate,
        counted twice when the ``x = 0`` plane is made Hermitian).
    """

    box: int
    flat_index: np.ndarray
    frequency_y: np.ndarray
    frequency_x: np.ndarray
    multiplicity: np.ndarray

    @classmethod
    def for_box(cls, box: int) -> "SliceSamples":
        ky = np.fft.fftfreq(box, d=1.0 / box)
        kx = np.fft.rfftfreq(box, d=1.0 / box)
        grid_y, grid_x = np.meshgrid(ky, kx, indexing="ij")
        grid_y, grid_x = grid_y.reshape(-1), grid_x.reshape(-1)
        keep = (grid_x * grid_x + grid_y * grid_y < (box / 2) ** 2) & ((grid_x > 0) | (grid_y >= 0))
        flat_index = np.flatnonzero(keep).astype(np.int64)
        multiplicity = np.ones(flat_index.size, dtype=np.float64)
        multiplicity[(grid_x[flat_index] == 0) & (grid_y[flat_index] == 0)] = 0.5
        return cls(box=box, flat_index=flat_index, frequency_y=grid_y[flat_index].copy(),
                   frequency_x=grid_x[flat_index].copy(), multiplicity=multiplicity)


# ---------------------------------------------------------------------------------------
# Insertion kernels
# ---------------------------------------------------------------------------------------


#: How many samples ahead the CPU scatter prefetches its grid rows.
PREFETCH_DISTANCE = 16
#: Memory (bytes) the CPU accumulation grids may take when they are copied per thread
#: (one grid per map is always allocated; beyond that threads share a grid by planes):
#: box 128 needs 0.2 GB per grid, box 256 1.6 GB.
ACCUMULATION_MEMORY = 2 * 1024**3

if numba is not None:
    from cryosieve._kernels import friedel_fold
    from cryosieve.ctf import ctf_value
    from cryosieve._kernels import prefetch_for_write as _prefetch_for_write

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _prepare_kernel(spectra, rows, columns, radius2, cos_sample2, sin_sample2, multiplicity, phase_y,
                        phase_x, apply_ctf, defocus_average, deviation_cos, deviation_sin, k1, k2, phase_constant,
                        envelope, scale, values):  # pragma: no cover - compiled
        # values[i, j] = (C S, C^2) of sample j of particle i (the CTF of cryosieve.ctf, its
        # terms per particle for frequencies in cycles per box), with the sample's direction
        # terms cos/sin(2 angle) shared by all particles.
        count = spectra.shape[0]
        points = rows.shape[0]
        for i in numba.prange(count):
            for j in range(points):
                value = spectra[i, rows[j], columns[j]] * phase_y[i, rows[j]] * phase_x[i, columns[j]]
                m = multiplicity[j]
                if apply_ctf:
                    ctf = ctf_value(radius2[j], cos_sample2[j], sin_sample2[j], defocus_average[i],
                                    deviation_cos[i], deviation_sin[i], k1[i], k2[i], phase_constant[i],
                                    envelope[i], scale[i])
                    values[i, j, 0] = value.real * ctf * m
                    values[i, j, 1] = value.imag * ctf * m
                    values[i, j, 2] = ctf * ctf * m
                else:
                    values[i, j, 0] = value.real * m
                    values[i, j, 1] = value.imag * m
                    values[i, j, 2] = m

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _locate_kernel(half, size_y, size_x, rotations, frequency_y, frequency_x, values, sharers, base,
                       record, plane_owner):  # pragma: no cover - compiled
        # Where each sample lands: flat index of its lower trilinear corner in a
        # (size_z, size_y, size_x) grid, its fractional offsets, its value (conjugated
        # when the sample is stored as its Friedel mate, x < 0), and which of ``sharers``
        # threads owns the plane of its lower corner.
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
                x, y, z, sign = friedel_fold(x, y, z)
                x0 = math.floor(x)
                y0 = math.floor(y)
                z0 = math.floor(z)
                base[i, j] = ((int(z0) + half) * size_y + int(y0) + half) * size_x + int(x0)
                plane_owner[i, j] = (int(z0) + half) % sharers
                record[i, j, 0] = values[i, j, 0]
                record[i, j, 1] = sign * values[i, j, 1]
                record[i, j, 2] = values[i, j, 2]
                record[i, j, 3] = x - x0
                record[i, j, 4] = y - y0
                record[i, j, 5] = z - z0

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _scatter_kernel(grids, base, record, plane_owner, particle_lists, tasks,
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

    @numba.njit(parallel=True, cache=True)
    def _symmetrise_kernel(source, target, half, rotations):  # pragma: no cover - compiled
        size_z = target.shape[0]
        size_y = target.shape[1]
        size_x = target.shape[2]
        limit = half * half
        count = rotations.shape[0]
        for iz in numba.prange(size_z):
            kz = iz - half
            for iy in range(size_y):
                ky = iy - half
                for ix in range(size_x):
                    kx = ix
                    if kx * kx + ky * ky + kz * kz >= limit:
                        continue
                    re_sum = 0.0
                    im_sum = 0.0
                    w_sum = 0.0
                    for r in range(count):
                        x = rotations[r, 0, 0] * kx + rotations[r, 0, 1] * ky + rotations[r, 0, 2] * kz
                        y = rotations[r, 1, 0] * kx + rotations[r, 1, 1] * ky + rotations[r, 1, 2] * kz
                        z = rotations[r, 2, 0] * kx + rotations[r, 2, 1] * ky + rotations[r, 2, 2] * kz
                        x, y, z, sign = friedel_fold(x, y, z)
                        x0 = math.floor(x)
                        y0 = math.floor(y)
                        z0 = math.floor(z)
                        fx = x - x0
                        fy = y - y0
                        fz = z - z0
                        jx = int(x0)
                        jy = int(y0) + half
                        jz = int(z0) + half
                        re = 0.0
                        im = 0.0
                        w = 0.0
                        for dz in range(2):
                            wz = fz if dz == 1 else 1.0 - fz
                            for dy in range(2):
                                wzy = wz * (fy if dy == 1 else 1.0 - fy)
                                for dx in range(2):
                                    c = wzy * (fx if dx == 1 else 1.0 - fx)
                                    re += c * source[jz + dz, jy + dy, jx + dx, 0]
                                    im += c * source[jz + dz, jy + dy, jx + dx, 1]
                                    w += c * source[jz + dz, jy + dy, jx + dx, 2]
                        re_sum += re
                        im_sum += sign * im
                        w_sum += w
                    target[iz, iy, ix, 0] = re_sum
                    target[iz, iy, ix, 1] = im_sum
                    target[iz, iy, ix, 2] = w_sum

    @numba.njit(parallel=True, cache=True)
    def _sphere_weight_kernel(grid, half):  # pragma: no cover - compiled
        # Sum of the weights over |K| < P/2, and the number of voxels there.
        limit = half * half
        total = 0.0
        voxels = 0
        for iz in numba.prange(2 * half):
            kz = iz - half
            for iy in range(2 * half):
                ky = iy - half
                for ix in range(half + 1):
                    if ix * ix + ky * ky + kz * kz < limit:
                        total += grid[iz, iy, ix, 2]
                        voxels += 1
        return total, voxels

    @numba.njit(parallel=True, cache=True)
    def _divide_kernel(grid, half, regularisation, x_start, spectrum):  # pragma: no cover - compiled
        # spectrum[Kz mod P, Ky mod P, Kx - x_start] = (-1)^(Kx+Ky+Kz) D(K) / (W(K) + lambda)
        # inside |K| < P/2, else 0 (the sign centres the inverse transform).
        padded = 2 * half
        limit = half * half
        width = spectrum.shape[2]
        for iz in numba.prange(padded):
            kz = iz - half
            oz = (kz + padded) % padded
            for iy in range(padded):
                ky = iy - half
                oy = (ky + padded) % padded
                for c in range(width):
                    ix = x_start + c
                    if ix * ix + ky * ky + kz * kz >= limit:
                        spectrum[oz, oy, c] = 0.0
                        continue
                    factor = 1.0 / (grid[iz, iy, ix, 2] + regularisation)
                    if (ix + iy + iz) % 2 != 0:
                        factor = -factor
                    spectrum[oz, oy, c] = complex(grid[iz, iy, ix, 0] * factor, grid[iz, iy, ix, 1] * factor)


    @numba.njit(parallel=True, cache=True)
    def _finish_kernel(volume, radius, width, padded):  # pragma: no cover - compiled
        # In place: RELION's softMaskOutsideMap (outside ``radius`` blend to the raised-cosine
        # weighted mean over the outside) then division by sinc^2(r / padded).
        size = volume.shape[0]
        centre = size // 2
        outer = radius + width
        total = 0.0
        weight_sum = 0.0
        for z in numba.prange(size):
            for y in range(size):
                for x in range(size):
                    r = math.sqrt((z - centre) ** 2 + (y - centre) ** 2 + (x - centre) ** 2)
                    if r < radius:
                        continue
                    blend = 1.0 if r > outer else 0.5 + 0.5 * math.cos(math.pi * (outer - r) / width)
                    total += blend * volume[z, y, x]
                    weight_sum += blend
        background = total / weight_sum if weight_sum > 0 else 0.0
        for z in numba.prange(size):
            for y in range(size):
                for x in range(size):
                    r = math.sqrt((z - centre) ** 2 + (y - centre) ** 2 + (x - centre) ** 2)
                    value = volume[z, y, x]
                    if r >= radius and weight_sum > 0:
                        blend = 1.0 if r > outer else 0.5 + 0.5 * math.cos(math.pi * (outer - r) / width)
                        value = (1.0 - blend) * value + blend * background
                    argument = math.pi * r / padded
                    if argument > 0:
                        sinc = math.sin(argument) / argument
                        value /= sinc * sinc
                    volume[z, y, x] = value


def _fft_workers() -> int:
    return numba.get_num_threads() if numba is not None else 1


def prepare_slices_cpu(images: np.ndarray, batch: dict[str, np.ndarray], samples: SliceSamples,
                       apply_ctf: bool, out: np.ndarray | None = None) -> np.ndarray:
    """Values and weights to insert for a batch of images, as one fused numba pass (CPU).

    Parameters
    ----------
    images:
        ``(b, n, n)`` real images ``[y, x]``.
    batch:
        ``(b,)`` float64 arrays: ``origin_x``, ``origin_y`` (pixels), ``pixel_size`` (Å),
        ``defocus_u``, ``defocus_v`` (Å), ``defocus_angle`` (degrees), ``voltage`` (kV),
        ``spherical_aberration`` (mm), ``amplitude_contrast``, ``phase_shift``
        (degrees), ``ctf_bfactor`` (Å^2), ``ctf_scalefactor``.
    samples:
        Which ``rfft2`` samples to keep.
    apply_ctf:
        Multiply by RELION's CTF (:func:`cryosieve.ctf.ctf_2d`) and weigh by its square;
        otherwise weight 1.
    out:
        Optional ``(>= b, p, 3)`` float64 work space (reused from batch to batch).

    Returns
    -------
    ``(b, p, 3)`` float64: real and imaginary parts of ``C * S`` and ``C^2``, times the
    samples' multiplicity. ``S`` is the image's DFT, centred at pixel ``n // 2`` and
    shifted by the origin.
    """
    box = images.shape[-1]
    count = images.shape[0]
    # complex64 (the images are float32); scipy's FFT runs on several threads
    spectra = scipy.fft.rfft2(np.asarray(images, dtype=np.float32), workers=_fft_workers())
    centre = box // 2
    ky = np.fft.fftfreq(box, d=1.0 / box)
    kx = np.fft.rfftfreq(box, d=1.0 / box)
    # S(k) = FT(I)(k) * exp(2 pi i k . (centre - origin) / n), split into y and x factors
    phase_y = np.exp(1j * (2 * math.pi / box) * ky * (centre - batch["origin_y"])[:, None])
    phase_x = np.exp(1j * (2 * math.pi / box) * kx * (centre - batch["origin_x"])[:, None])
    width = box // 2 + 1
    rows = samples.flat_index // width
    columns = samples.flat_index % width
    radius2 = samples.frequency_x ** 2 + samples.frequency_y ** 2
    safe = np.where(radius2 > 0, radius2, 1.0)
    cos_sample2 = np.where(radius2 > 0, (samples.frequency_x ** 2 - samples.frequency_y ** 2) / safe, 1.0)
    sin_sample2 = np.where(radius2 > 0, 2 * samples.frequency_x * samples.frequency_y / safe, 0.0)
    ctf = CtfParameters.from_values(batch["defocus_u"], batch["defocus_v"], batch["defocus_angle"], batch["voltage"],
                                    batch["spherical_aberration"], batch["amplitude_contrast"], batch["phase_shift"],
                                    batch["ctf_bfactor"], batch["ctf_scalefactor"])
    terms = ctf.in_cycles_per_box(box, batch["pixel_size"])
    values = np.empty((count, rows.size, 3), dtype=np.float64) if out is None else out[:count]
    _prepare_kernel(spectra, rows, columns, radius2, cos_sample2, sin_sample2, samples.multiplicity,
                    phase_y, phase_x, bool(apply_ctf), terms["defocus_average"], terms["deviation_cos"],
                    terms["deviation_sin"], terms["k1"], terms["k2"], terms["phase_constant"], terms["envelope"],
                    terms["scale"], values)
    return values


def locate_samples(grid_shape: tuple[int, ...], rotations: np.ndarray, frequency_y: np.ndarray,
                   frequency_x: np.ndarray, values: np.ndarray, pad_factor: int, sharers: int = 1,
                   buffers: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower trilinear corner and offsets of every sample (CPU, numba).

    ``rotations``: ``(b, 3, 3)`` RELION matrices; ``frequency_y``, ``frequency_x``:
    ``(p,)`` cycles per box; ``values``: ``(b, p, 3)`` from :func:`prepare_slices_cpu`.
    Returns ``(base, record, plane_owner)``: ``(b, p)`` int64 flat voxel indices into a
    grid of ``grid_shape[:3]``, ``(b, p, 6)`` float64 (real, imaginary, weight, fx, fy,
    fz), and ``(b, p)`` int8 ``z % sharers`` of the lower corner; written into ``buffers``
    (sliced to ``b``) when given.
    """
    half = (grid_shape[0] - 1) // 2
    count, points = values.shape[0], values.shape[1]
    scaled = np.ascontiguousarray(np.asarray(rotations, dtype=np.float64) * pad_factor)
    if buffers is None:
        base = np.empty((count, points), dtype=np.int64)
        record = np.empty((count, points, 6), dtype=np.float64)
        plane_owner = np.empty((count, points), dtype=np.int8)
    else:
        base, record, plane_owner = buffers[0][:count], buffers[1][:count], buffers[2][:count]
    _locate_kernel(half, grid_shape[1], grid_shape[2], scaled, np.ascontiguousarray(frequency_y, dtype=np.float64),
                   np.ascontiguousarray(frequency_x, dtype=np.float64), np.ascontiguousarray(values), sharers,
                   base, record, plane_owner)
    return base, record, plane_owner


def insert_slices_cpu(grid: np.ndarray, rotations: np.ndarray, frequency_y: np.ndarray,
                      frequency_x: np.ndarray, values: np.ndarray, pad_factor: int) -> None:
    """Trilinear insertion into one grid on the CPU with the numba kernels (in place, one thread).

    ``grid``: ``(P + 1, P + 1, P // 2 + 2, 3)`` float64 accumulator ``[z, y, x, (re, im,
    weight)]`` with ``P = pad_factor * n``; frequency ``K`` (padded cycles per box) lives
    at index ``(Kz + P/2, Ky + P/2, Kx)``. ``rotations``: ``(b, 3, 3)`` RELION matrices;
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

    Each map (half-set) gets ``copies`` float64 grids of shape ``(P + 1, P + 1, P/2 + 2, 3)``
    (summed at the end), each filled with its share of every batch by ``sharers`` threads
    that split its z planes (plane ``z`` belongs to thread ``z % sharers``). So threads
    never write to the same memory. Copies are preferred (no thread re-reads another's
    samples) as long as all grids fit in ``memory_budget`` bytes; two half maps on two
    threads need one grid each and no sharing at all.
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
        return self.grids[first]

    def release(self) -> None:
        """Drop the grids and work space."""
        self.grids = self.values = self.base = self.record = self.plane_owner = np.empty(0)


def _numba_for(device: torch.device | str) -> bool:
    """Whether the numba CPU kernels run for ``device`` (else the torch code of
    :mod:`cryosieve._reconstruct_torch`)."""
    return numba is not None and str(device).split(":")[0] == "cpu"


# ---------------------------------------------------------------------------------------
# Accumulated grid -> map
# ---------------------------------------------------------------------------------------


def enforce_hermitian(grid: np.ndarray) -> None:
    """Add each ``x = 0`` plane sample's Friedel mate (in place).

    ``grid`` is ``(P + 1, P + 1, X, 3)``; frequency ``(0, Ky, Kz)`` and ``(0, -Ky, -Kz)``
    both become the sum of the two (conjugated for the imaginary part), which is what a
    full (both halves) Hermitian insertion would have accumulated there.
    """
    plane = grid[:, :, 0, :].copy()
    mirror = plane[::-1, ::-1]
    grid[:, :, 0, 0] = plane[..., 0] + mirror[..., 0]
    grid[:, :, 0, 1] = plane[..., 1] - mirror[..., 1]
    grid[:, :, 0, 2] = plane[..., 2] + mirror[..., 2]


def symmetrise_grid(grid: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """``D(K) <- sum_R D(R K)`` by trilinear interpolation, for every ``|K| < P/2``.

    ``grid``: ``(P + 1, P + 1, P // 2 + 2, 3)`` float64 (Hermitian on ``x = 0``);
    ``rotations``: ``(m, 3, 3)`` acting on ``(x, y, z)``. Returns a new grid, zero outside
    the sphere (RELION's ``BackProjector::applyPointGroupSymmetry``).
    """
    out = np.zeros_like(grid)
    half = (grid.shape[0] - 1) // 2
    _symmetrise_kernel(grid, out, half, np.ascontiguousarray(rotations, dtype=np.float64))
    return out


def grid_to_map(grid: np.ndarray, size: int, pad_factor: int,
                relative_regularisation: float | None = None, column_chunk: int = 16) -> np.ndarray:
    """Divide data by weight, inverse FFT, crop, mask outside the sphere and gridding-correct.

    Parameters
    ----------
    grid:
        ``(P + 1, P + 1, P // 2 + 2, 3)`` float64 accumulated (Hermitian, symmetrised) grid.
    size:
        Box ``n`` of the map.
    relative_regularisation:
        ``lambda`` in ``D / (W + lambda)`` as a fraction of the mean weight over the
        sphere ``|K| < P/2`` (keeps voxels that no slice reached at zero and tames
        nearly empty ones); default :data:`RELATIVE_REGULARISATION`.
    column_chunk:
        ``Kx`` columns divided and transformed along z at a time (bounds the memory to
        the grid plus a ``(n, P, P/2 + 1)`` complex array).

    Returns
    -------
    ``(n, n, n)`` float64 map ``[z, y, x]`` centred at voxel ``n // 2``.
    """
    if relative_regularisation is None:
        relative_regularisation = RELATIVE_REGULARISATION
    padded = grid.shape[0] - 1
    half = padded // 2
    total, voxels = _sphere_weight_kernel(grid, half)
    regularisation = relative_regularisation * float(total) / max(int(voxels), 1) + 1e-300
    start = half - size // 2
    workers = _fft_workers()
    # Inverse transform one axis at a time, keeping only the n central real-space planes
    # of each axis as soon as it is transformed. The divided spectrum is multiplied by
    # (-1)^(Kx+Ky+Kz) (so the transform comes out centred at P/2) and is in FFT order.
    partial = np.empty((size, padded, half + 1), dtype=np.complex128)
    for x_start in range(0, half + 1, column_chunk):
        x_end = min(half + 1, x_start + column_chunk)
        columns = np.empty((padded, padded, x_end - x_start), dtype=np.complex128)
        _divide_kernel(grid, half, regularisation, x_start, columns)
        partial[:, :, x_start:x_end] = scipy.fft.ifft(columns, axis=0, workers=workers,
                                                      overwrite_x=True)[start:start + size]
    partial = scipy.fft.ifft(partial, axis=1, workers=workers, overwrite_x=True)[:, start:start + size]
    volume = np.ascontiguousarray(scipy.fft.irfft(partial, n=padded, axis=2, workers=workers)[:, :, start:start + size])
    _finish_kernel(volume, size / 2, MASK_EDGE_WIDTH, float(padded))
    return volume


# ---------------------------------------------------------------------------------------
# Stack -> maps
# ---------------------------------------------------------------------------------------

#: The per-particle columns of :class:`~cryosieve.io.star.ParticleTable` a batch needs.
BATCH_COLUMNS = ("origin_x", "origin_y", "pixel_size", "defocus_u", "defocus_v", "defocus_angle", "voltage",
                 "spherical_aberration", "amplitude_contrast", "phase_shift", "ctf_bfactor", "ctf_scalefactor",
                 "rot", "tilt", "psi")


def _batch_parameters(table: ParticleTable, rows: np.ndarray) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(getattr(table, name)[rows], dtype=np.float64) for name in BATCH_COLUMNS}


def _selected_rows(table: ParticleTable, rows: np.ndarray | None) -> np.ndarray:
    if rows is None:
        return np.arange(len(table), dtype=np.int64)
    rows = np.asarray(rows)
    if rows.dtype == bool:
        if rows.shape != (len(table),):
            raise CryoSieveInputError(f"{table.path}: row mask has {rows.size} entries for {len(table)} particles")
        return np.flatnonzero(rows)
    rows = rows.astype(np.int64, copy=False).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= len(table)):
        raise CryoSieveInputError(f"{table.path}: selected row outside the {len(table)} particles")
    return rows


def _check_pixel_size(table: ParticleTable, rows: np.ndarray) -> float:
    pixel = table.pixel_size[rows]
    if np.any(np.abs(pixel - pixel[0]) > 1e-6 * pixel[0]):
        raise CryoSieveInputError(
            f"{table.path}: particles have different pixel sizes ({pixel.min():g} to {pixel.max():g} Å); "
            "reconstruct each optics group separately"
        )
    return float(pixel[0])


def reconstruct_subsets(table: ParticleTable, reader: StackReader, *, subsets: Sequence[int] = (1, 2),
                        rows: np.ndarray | None = None, symmetry: str = "C1", apply_ctf: bool = True,
                        pad_factor: int = 2, batch_size: int = 128, device: torch.device | str = "cpu",
                        progress: Callable[[int], None] | None = None) -> dict[int, np.ndarray]:
    """One map per half-set (``rlnRandomSubset``), reading the stack once.

    Parameters
    ----------
    table, reader:
        The particles and their images.
    subsets:
        ``rlnRandomSubset`` values to reconstruct; each must select at least one particle.
    rows:
        Optional selection (integer rows or boolean mask) of the table; default all.
    symmetry:
        RELION point group (:func:`cryosieve.symmetry.symmetry_matrices`).
    apply_ctf:
        CTF correction (``relion_reconstruct --ctf``).
    pad_factor:
        Oversampling of the Fourier grid (2, as RELION).
    batch_size:
        Images per batch.
    device:
        Where to compute.
    progress:
        Called with the number of particles just inserted, after each batch.

    Returns
    -------
    ``{subset: (n, n, n) float32 map [z, y, x]}``, voxel size = the particles' pixel size.
    """
    selected = _selected_rows(table, rows)
    if table.random_subset is None:
        raise CryoSieveInputError(f"{table.path}: column rlnRandomSubset missing (needed for half-set maps)")
    subsets = [int(value) for value in subsets]
    members = {value: selected[table.random_subset[selected] == value] for value in subsets}
    for value, chosen in members.items():
        if chosen.size == 0:
            raise CryoSieveInputError(f"{table.path}: no particles with rlnRandomSubset {value}")
    keep = np.isin(table.random_subset[selected], subsets)
    return _reconstruct(table, reader, selected[keep], table.random_subset[selected[keep]], subsets,
                        symmetry=symmetry, apply_ctf=apply_ctf, pad_factor=pad_factor, batch_size=batch_size,
                        device=device, progress=progress)


def reconstruct(table: ParticleTable, reader: StackReader, *, rows: np.ndarray | None = None,
                symmetry: str = "C1", apply_ctf: bool = True, pad_factor: int = 2, batch_size: int = 128,
                device: torch.device | str = "cpu", progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Reconstruct one map from the selected particles (all by default).

    Same keywords as :func:`reconstruct_subsets`. Returns a ``(n, n, n)`` float32 map
    ``[z, y, x]`` centred at voxel ``n // 2`` whose projections match the images (same
    scale as ``relion_reconstruct``); the voxel size is the particles' pixel size.
    """
    selected = _selected_rows(table, rows)
    if selected.size == 0:
        raise CryoSieveInputError(f"{table.path}: no particles selected for reconstruction")
    labels = np.zeros(selected.size, dtype=np.int64)
    return _reconstruct(table, reader, selected, labels, [0], symmetry=symmetry, apply_ctf=apply_ctf,
                        pad_factor=pad_factor, batch_size=batch_size, device=device, progress=progress)[0]


def _reconstruct(table: ParticleTable, reader: StackReader, rows: np.ndarray, labels: np.ndarray,
                 groups: Sequence[int], *, symmetry: str, apply_ctf: bool, pad_factor: int, batch_size: int,
                 device: torch.device | str, progress: Callable[[int], None] | None) -> dict[int, np.ndarray]:
    if rows.size == 0:
        raise CryoSieveInputError(f"{table.path}: no particles selected for reconstruction")
    if pad_factor < 1:
        raise CryoSieveInputError(f"pad factor must be >= 1, got {pad_factor}")
    if batch_size < 1:
        raise CryoSieveInputError(f"{setting('batch_size')} {batch_size}: must be at least 1")
    rotations_group = symmetry_matrices(symmetry)
    _check_pixel_size(table, rows)
    if not _numba_for(device):
        from cryosieve._reconstruct_torch import reconstruct_groups

        return reconstruct_groups(table, reader, rows, labels, groups, symmetry_rotations=rotations_group,
                                  apply_ctf=apply_ctf, pad_factor=pad_factor, batch_size=batch_size,
                                  device=device, progress=progress)
    box = reader.validate()
    padded = pad_factor * box
    samples = SliceSamples.for_box(box)
    shape = (padded + 1, padded + 1, padded // 2 + 2, 3)
    accumulators = GridAccumulators(shape, groups, numba.get_num_threads(), ACCUMULATION_MEMORY, batch_size,
                                    samples.flat_index.size)
    batches = [rows[start:start + batch_size] for start in range(0, rows.size, batch_size)]
    label_of = dict(zip(rows.tolist(), labels.tolist()))
    for batch_rows, images in prefetch_batches(reader, batches):
        parameters = _batch_parameters(table, batch_rows)
        matrices = euler_to_matrix(parameters["rot"], parameters["tilt"], parameters["psi"])
        batch_labels = np.array([label_of[row] for row in batch_rows.tolist()])
        values = prepare_slices_cpu(images, parameters, samples, apply_ctf, out=accumulators.values)
        accumulators.insert(matrices, samples.frequency_y, samples.frequency_x, values, batch_labels, pad_factor)
        if progress is not None:
            progress(len(batch_rows))
    maps = {}
    for group in groups:
        grid = accumulators.pop(group)
        enforce_hermitian(grid)
        if rotations_group.shape[0] > 1:
            grid = symmetrise_grid(grid, rotations_group)
        maps[group] = grid_to_map(grid, box, pad_factor).astype(np.float32)
        del grid
    accumulators.release()
    return maps


def reconstruct_star_file(star: str, out: str, *, angpix: float | None = None, symmetry: str = "C1",
                          apply_ctf: bool = True, subset: int | None = None, directory: str | None = None,
                          batch_size: int = 128, device: torch.device | str = "cpu",
                          progress: ProgressFactory = no_progress) -> tuple[Path, int]:
    """One map from files to a file (``cryosieve-reconstruct``, RELION's ``relion_reconstruct``).

    ``subset`` 1 or 2 selects that ``rlnRandomSubset`` (anything else: every particle, as
    RELION). Refuses an output that would land on an input or in an unwritable place
    before reading any image; writes ``out`` atomically. Returns its path and the number
    of particles used.
    """
    from cryosieve.io.atomic import remove_stale_temporaries_of
    from cryosieve.io.mrc import write_volume
    from cryosieve.io.paths import InputFile, check_outputs
    from cryosieve.io.stack import stack_paths
    from cryosieve.io.star import read_particles

    if not str(out).strip():
        raise CryoSieveInputError(f"{setting('output')}: empty output path")
    if batch_size < 1:
        raise CryoSieveInputError(f"{setting('batch_size')} {batch_size}: must be at least 1")
    symmetry = canonical_name(symmetry)
    table = read_particles(star, angpix)
    inputs = [InputFile(Path(star), "particle STAR file")]
    inputs += [InputFile(path, f"particle stack of {star}") for path in stack_paths(table, directory)]
    check_outputs([out], inputs)
    rows = np.arange(len(table))
    if subset in (1, 2):  # RELION: 1 or 2 selects a half-set, anything else all particles
        if table.random_subset is None:
            raise CryoSieveInputError(f"{star}: column rlnRandomSubset missing (needed by {setting('subset')})")
        rows = np.flatnonzero(table.random_subset == subset)
        if rows.size == 0:
            raise CryoSieveInputError(f"{setting('subset')} {subset}: no particles with rlnRandomSubset {subset} in {star}")
    remove_stale_temporaries_of([out])
    with StackReader(table, directory) as reader:
        box = reader.validate()
        pixel = _check_pixel_size(table, rows)
        log.info("reconstructing %d particles (box %d, %.4g Å/px, symmetry %s, CTF %s) on %s", rows.size, box, pixel,
                 symmetry, "on" if apply_ctf else "off", device)
        with progress("inserting", int(rows.size)) as update:
            volume = reconstruct(table, reader, rows=rows, symmetry=symmetry, apply_ctf=apply_ctf,
                                 batch_size=batch_size, device=device, progress=update)
    write_volume(out, volume, pixel)
    return Path(out), int(rows.size)
