"""Fused CPU kernel for the Fourier-space score (numba).

Measured on 2 cores at box 128 (256 particles, 6,466 band samples each): the batched
torch path spends ~0.21 s per batch in eight separate advanced-indexing gathers of the
trilinear neighbours (~130 ns per sample), about 900 particles/s. This kernel fuses
rotation, Friedel folding, trilinear interpolation, the CTF, the origin phase and the
score sum per particle. The band samples are laid out in blocks of :data:`BLOCK`
consecutive columns of one ``rfft2`` row, so that the position pass and the CTF/score
pass are fixed-length inner loops the compiler vectorises (with a polynomial sine,
:func:`fast_sin`, instead of a libm call); only the trilinear gathers stay scalar, with
the grid rows of the sample 32 ahead prefetched (the reads are cache misses: a plane
through a grid far larger than the caches). Kernel alone, box 128, 4,096 particles in
viewing-direction order on 2 cores (AMD EPYC, AVX-512): one fused scalar loop 8,600
particles/s; blocked and vectorised 13,500 to 15,300 particles/s, of which the gathers
are about two thirds. A 2x2x2-bricked grid layout (fewer cache lines per sample) was
slower (12,000) and was not kept. Compiled on first use (cached on disk) and used on the
CPU only; CUDA uses the batched torch path of :mod:`cryosieve.scoring.fourier`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency, but keep the torch path usable
    numba = None  # type: ignore[assignment]  # None marks numba as missing

AVAILABLE = numba is not None

#: How many band samples ahead the scoring kernel prefetches the grid rows it will read.
PREFETCH_DISTANCE = 32
#: The same for the 8-corner layout (one cache line per sample, so more lines in flight).
CORNER_PREFETCH_DISTANCE = 128
#: Largest 8-corner layout (bytes) built per reference: 8 complex64 per voxel of the padded
#: half-transform, 8x the grid (0.54 GB at box 128, 1.1 GB at box 160, 4.3 GB at box 256,
#: 34 GB at box 512). Within this cap, a layout is built only where it takes at most
#: CORNER_LAYOUT_SHARE of the memory available (see corner_layout_allowed).
CORNER_LAYOUT_MEMORY = 8 << 30
CORNER_LAYOUT_SHARE = 0.25
#: Band samples per block: consecutive columns of one rfft2 row, a fixed-length inner loop
#: that the compiler vectorises (a loop over runs of varying length mostly ran its scalar
#: remainder).
BLOCK = 16

if AVAILABLE:
    from llvmlite import ir as _llvm_ir
    from numba import types as _numba_types
    from numba.core.base import BaseContext as _TargetContext
    from numba.core.typing.context import BaseContext as _TypingContext
    from numba.core.typing.templates import Signature as _Signature
    from numba.extending import intrinsic as _intrinsic

    from cryosieve._fastmath import fast_sin  # noqa: F401 - re-exported for the kernels' tests
    from cryosieve._intrinsics import prefetch_for_read
    from cryosieve.ctf import ctf_value, particle_terms

    # The intrinsics' typing functions get numba types, their code generators llvmlite's IR
    # builder and values; both run in Python while a kernel is compiled.
    _Codegen = Callable[[_TargetContext, _llvm_ir.IRBuilder, _Signature, Sequence[_llvm_ir.Value]], _llvm_ir.Value]

    _FLOAT = _llvm_ir.FloatType()
    _INT32 = _llvm_ir.IntType(32)
    _INT64 = _llvm_ir.IntType(64)
    _VECTOR16 = _llvm_ir.VectorType(_FLOAT, 16)
    _VECTOR4 = _llvm_ir.VectorType(_FLOAT, 4)

    def _mask(lanes: Sequence[int]) -> _llvm_ir.Constant:
        return _llvm_ir.Constant(_llvm_ir.VectorType(_INT32, len(lanes)), list(lanes))

    #: Loads sample k's 8 trilinear neighbours (builder, source array, voxel, the intrinsic's arguments).
    _LoadNeighbours = Callable[[_llvm_ir.IRBuilder, _llvm_ir.Value, _llvm_ir.Value, Sequence[_llvm_ir.Value]],
                               _llvm_ir.Value]

    def _transpose16(builder: _llvm_ir.IRBuilder, rows: Sequence[_llvm_ir.Value]) -> list[_llvm_ir.Value]:
        # 16 vectors of 16 lanes -> columns[lane][k] = rows[k][lane]: four rounds of
        # two-source shuffles that swap off-diagonal blocks of 8, 4, 2, 1 lanes
        rows = list(rows)
        for distance in (8, 4, 2, 1):
            swapped = list(rows)
            low = [lane if not lane & distance else 16 + lane - distance for lane in range(16)]
            high = [lane + distance if not lane & distance else 16 + lane for lane in range(16)]
            for i in range(16):
                if not i & distance:
                    swapped[i] = builder.shuffle_vector(rows[i], rows[i + distance], _mask(low))
                    swapped[i + distance] = builder.shuffle_vector(rows[i], rows[i + distance], _mask(high))
            rows = swapped
        return rows

    def _interpolate_block(context: _TargetContext, builder: _llvm_ir.IRBuilder, sig: _Signature,
                           args: Sequence[_llvm_ir.Value], load_neighbours: _LoadNeighbours) -> _llvm_ir.Value:
        # Shared body of the two block intrinsics below. For the BLOCK samples from
        # ``start``: load each sample's 8 trilinear neighbours as one 16-lane vector
        # (re, im of corner dz dy dx = 000, 001, 010, ... in lanes 2c, 2c + 1), transpose
        # so that each lane becomes a vector over the samples, then 7 lerps per part in
        # x, y, z, times the Friedel signs, stored to model_real / model_imag.
        data = [context.make_array(kind)(context, builder, value).data
                for kind, value in zip(sig.args, args, strict=True) if isinstance(kind, _numba_types.Array)]
        start = args[-1]

        def vector_at(pointer: _llvm_ir.Value, vector_type: _llvm_ir.Type = _VECTOR16) -> _llvm_ir.Value:
            return builder.load(builder.bitcast(builder.gep(pointer, [start]), vector_type.as_pointer()), align=4)

        source, corner, offset_x, offset_y, offset_z, sign_real, sign_imag, model_real, model_imag = (
            data[0], data[-8], data[-7], data[-6], data[-5], data[-4], data[-3], data[-2], data[-1])
        indices = vector_at(corner, _llvm_ir.VectorType(_INT32, 16))
        rows = [load_neighbours(builder, source, builder.sext(builder.extract_element(indices, _INT32(k)), _INT64),
                                args) for k in range(16)]
        columns = _transpose16(builder, rows)
        fractions = [vector_at(offset_x), vector_at(offset_y), vector_at(offset_z)]

        def lerp(a: _llvm_ir.Value, b: _llvm_ir.Value, fraction: _llvm_ir.Value) -> _llvm_ir.Value:
            return builder.fadd(a, builder.fmul(fraction, builder.fsub(b, a)))

        for part, signs, target in ((0, sign_real, model_real), (1, sign_imag, model_imag)):
            values = [columns[2 * c + part] for c in range(8)]
            for axis in range(3):  # x, then y, then z: pairs of corners that differ in that bit
                values = [lerp(values[2 * k], values[2 * k + 1], fractions[axis]) for k in range(len(values) // 2)]
            result = builder.fmul(values[0], vector_at(signs))
            builder.store(result, builder.bitcast(builder.gep(target, [start]), _VECTOR16.as_pointer()), align=4)
        return context.get_dummy_value()

    # Trilinear interpolation of a block of BLOCK (= 16) samples as LLVM vector code: the
    # compiler leaves the scalar form (8 corner reads and 7 dependent lerps per sample and
    # part) scalar. Measured on 2 cores at box 128 (AMD EPYC, AVX-512), kernel alone:
    # scalar 36.6 us per particle; one 16-lane multiply and fold per sample 31 us; this
    # block form 22 us (the interpolation then mostly waits on memory: 4.6 us of its 12 us
    # with every read in cache). Machines without 512-bit vectors get the same code split
    # into narrower ones. The ``start`` entries must lie inside every array.
    @_intrinsic
    def interpolate_corner_block(typingctx: _TypingContext, corners: _numba_types.Type, corner: _numba_types.Type,
                                 offset_x: _numba_types.Type, offset_y: _numba_types.Type, offset_z: _numba_types.Type,
                                 sign_real: _numba_types.Type, sign_imag: _numba_types.Type,
                                 model_real: _numba_types.Type, model_imag: _numba_types.Type, start: _numba_types.Type,
                                 ) -> tuple[_Signature, _Codegen]:  # pragma: no cover - compiled
        """From the 8-corner layout (float32 view): ``corner[start + k]`` is sample k's
        voxel in it (16 floats each)."""
        signature = _numba_types.void(corners, corner, offset_x, offset_y, offset_z, sign_real, sign_imag,
                                      model_real, model_imag, _numba_types.intp)

        def load_neighbours(builder: _llvm_ir.IRBuilder, source: _llvm_ir.Value, voxel: _llvm_ir.Value,
                            args: Sequence[_llvm_ir.Value]) -> _llvm_ir.Value:
            pointer = builder.gep(source, [builder.mul(voxel, _llvm_ir.Constant(_INT64, 16))])
            return builder.load(builder.bitcast(pointer, _VECTOR16.as_pointer()), align=4)

        def codegen(context: _TargetContext, builder: _llvm_ir.IRBuilder, sig: _Signature,
                    args: Sequence[_llvm_ir.Value]) -> _llvm_ir.Value:
            return _interpolate_block(context, builder, sig, args, load_neighbours)

        return signature, codegen

    @_intrinsic
    def interpolate_grid_block(typingctx: _TypingContext, grid: _numba_types.Type, row: _numba_types.Type,
                               plane: _numba_types.Type, corner: _numba_types.Type, offset_x: _numba_types.Type,
                               offset_y: _numba_types.Type, offset_z: _numba_types.Type,
                               sign_real: _numba_types.Type, sign_imag: _numba_types.Type,
                               model_real: _numba_types.Type, model_imag: _numba_types.Type,
                               start: _numba_types.Type) -> tuple[_Signature, _Codegen]:  # pragma: no cover - compiled
        """From the grid itself (float32 view of the complex grid): ``corner[start + k]`` is
        sample k's lower corner (complex element), ``row`` and ``plane`` (int64) the complex
        strides of y and z."""
        signature = _numba_types.void(grid, row, plane, corner, offset_x, offset_y, offset_z, sign_real, sign_imag,
                                      model_real, model_imag, _numba_types.intp)

        def load_neighbours(builder: _llvm_ir.IRBuilder, source: _llvm_ir.Value, voxel: _llvm_ir.Value,
                            args: Sequence[_llvm_ir.Value]) -> _llvm_ir.Value:
            row, plane = args[1], args[2]

            def pair(offset: _llvm_ir.Value) -> _llvm_ir.Value:  # the x and x + 1 corners: 4 floats
                pointer = builder.gep(source, [builder.mul(offset, _llvm_ir.Constant(_INT64, 2))])
                return builder.load(builder.bitcast(pointer, _VECTOR4.as_pointer()), align=4)

            upper = builder.add(voxel, plane)
            lower_rows = builder.shuffle_vector(pair(voxel), pair(builder.add(voxel, row)), _mask(range(8)))
            upper_rows = builder.shuffle_vector(pair(upper), pair(builder.add(upper, row)), _mask(range(8)))
            return builder.shuffle_vector(lower_rows, upper_rows, _mask(range(16)))

        def codegen(context: _TargetContext, builder: _llvm_ir.IRBuilder, sig: _Signature,
                    args: Sequence[_llvm_ir.Value]) -> _llvm_ir.Value:
            return _interpolate_block(context, builder, sig, args, load_neighbours)

        return signature, codegen

    # The compiled functions below take no annotations: numba types their arguments itself, and
    # their bodies by its own rules (pyproject.toml leaves them out of mypy's checks).
    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def fourier_scores_kernel(grid, corners, shape_y, shape_x, half, pad_factor,  # type: ignore[no-untyped-def]
                              spectra, width, block_row, block_column, block_ky, u2_cycles, cos2_sample, sin2_sample,
                              sample_weight, rotations, scale, phase_y_real, phase_y_imag, phase_x_real,
                              phase_x_imag,
                              ctf_terms, highpass2_cycles, box, out):  # pragma: no cover - compiled
        # Three passes per particle over its band samples, laid out in blocks of BLOCK
        # consecutive columns of one rfft2 row (see BandSamples.blocks):
        #   1. where each sample lands in the padded grid: lower trilinear corner, offsets,
        #      Friedel sign (fixed-length inner loop: vectorised);
        #   2. trilinear interpolation: gathers from the grid, whose rows are prefetched
        #      PREFETCH_DISTANCE samples ahead (the grid is far larger than the caches), or,
        #      when ``corners`` is not empty, one 64-byte line of the 8-corner layout
        #      (see corner_layout_kernel) prefetched CORNER_PREFETCH_DISTANCE ahead;
        #   3. the CTF (cryosieve.ctf.ctf_value), the observed sample times the origin phase,
        #      and the score sum (fixed-length inner loop: vectorised).
        # ``spectra``: (count, box * width * 2) float32, the rfft2 of each image (interleaved
        # complex, zero columns beyond box // 2 + 1); ``phase_y_*``: (count, box) and
        # ``phase_x_*``: (count, width) float32, the origin phases of cryosieve.fourier.origin_phases
        # (T(I) and the move of the image centre to the origin, separable in y and x; zero
        # columns beyond box // 2 + 1); ``ctf_terms``: (count, T) float64, CtfParameters.kernel_terms.
        count = spectra.shape[0]
        blocks = block_row.shape[0]
        points = blocks * BLOCK
        plane = np.int32(shape_y * shape_x)
        row_length = np.int32(shape_x)
        use_corners = corners.shape[0] > 0
        # voxel index of the lower corner: in the grid, or in the corner layout (one entry
        # per voxel with z, y < P and x <= P/2)
        index_y = np.int32(shape_y - 1) if use_corners else np.int32(shape_y)
        index_x = np.int32(shape_x - 1) if use_corners else np.int32(shape_x)
        half32 = np.int32(half)
        limit = np.int32(2 * half)
        for i in numba.prange(count):
            model_real = np.empty(points, dtype=np.float32)
            model_imag = np.empty(points, dtype=np.float32)
            offset_x = np.empty(points, dtype=np.float32)
            offset_y = np.empty(points, dtype=np.float32)
            offset_z = np.empty(points, dtype=np.float32)
            sign_real = np.empty(points, dtype=np.float32)
            sign_imag = np.empty(points, dtype=np.float32)
            corner = np.empty(points, dtype=np.int32)
            factor = pad_factor * scale[i]
            a00 = rotations[i, 0, 0] * factor
            a01 = rotations[i, 0, 1] * factor
            a02 = rotations[i, 0, 2] * factor
            a10 = rotations[i, 1, 0] * factor
            a11 = rotations[i, 1, 1] * factor
            a12 = rotations[i, 1, 2] * factor
            # 1. positions (x >= 0 half of the Hermitian grid: a sample with x < 0 reads its
            #    Friedel mate, conjugated)
            for b in range(blocks):
                ky = block_ky[b]
                c0 = block_column[b]
                bx = a10 * ky + a00 * c0
                by = a11 * ky + a01 * c0
                bz = a12 * ky + a02 * c0
                o = b * BLOCK
                for lane in range(BLOCK):
                    x = bx + a00 * lane
                    y = by + a01 * lane
                    z = bz + a02 * lane
                    # friedel_fold, written as a select so that the block loop vectorises
                    flip = -1.0 if x < 0 else 1.0
                    x *= flip
                    y *= flip
                    z *= flip
                    x0 = math.floor(x)
                    y0 = math.floor(y)
                    z0 = math.floor(z)
                    offset_x[o + lane] = np.float32(x - x0)
                    offset_y[o + lane] = np.float32(y - y0)
                    offset_z[o + lane] = np.float32(z - z0)
                    ix = np.int32(x0)
                    iy = np.int32(y0) + half32
                    iz = np.int32(z0) + half32
                    # entries of a block that are not scored read voxel 0 (cached) instead
                    inside = ((ix < half32) & (iy >= 0) & (iz >= 0) & (iy < limit) & (iz < limit)
                              & (sample_weight[o + lane] > 0))
                    corner[o + lane] = ((iz * index_y + iy) * index_x + ix) if inside else np.int32(0)
                    sign_real[o + lane] = np.float32(1.0) if inside else np.float32(0.0)
                    sign_imag[o + lane] = np.float32(flip) if inside else np.float32(0.0)
            # 2. trilinear interpolation
            if use_corners:
                for b in range(blocks):
                    ahead = b * BLOCK + CORNER_PREFETCH_DISTANCE
                    if ahead + BLOCK <= points:
                        for k in range(BLOCK):
                            prefetch_for_read(corners, 16 * np.int64(corner[ahead + k]))
                    interpolate_corner_block(corners, corner, offset_x, offset_y, offset_z, sign_real, sign_imag,
                                             model_real, model_imag, b * BLOCK)
            else:
                for b in range(blocks):
                    ahead = b * BLOCK + PREFETCH_DISTANCE
                    if ahead + BLOCK <= points:
                        for k in range(BLOCK):
                            voxel = 2 * corner[ahead + k]
                            prefetch_for_read(grid, voxel)
                            prefetch_for_read(grid, voxel + 2 * row_length)
                            prefetch_for_read(grid, voxel + 2 * plane)
                            prefetch_for_read(grid, voxel + 2 * plane + 2 * row_length)
                    interpolate_grid_block(grid, np.int64(row_length), np.int64(plane), corner, offset_x, offset_y,
                                           offset_z, sign_real, sign_imag, model_real, model_imag, b * BLOCK)
            # 3. CTF, observed sample and the score: sum of w (M^2 - 2 M . O), M = CTF * V
            cut2 = highpass2_cycles[i]
            particle = particle_terms(ctf_terms, i)
            total = 0.0
            for b in range(blocks):
                r = block_row[b]
                pyr = phase_y_real[i, r]
                pyi = phase_y_imag[i, r]
                spectrum_start = 2 * (r * width + block_column[b])
                phase_start = block_column[b]
                o = b * BLOCK
                # views of the block's columns: lane indices from 0 let the loads be plain
                # vector loads (with flat indices the compiler emitted gathers)
                spectrum = spectra[i, spectrum_start:spectrum_start + 2 * BLOCK]
                phase_real = phase_x_real[i, phase_start:phase_start + BLOCK]
                phase_imag = phase_x_imag[i, phase_start:phase_start + BLOCK]
                block_total = np.float32(0.0)
                for lane in range(BLOCK):
                    j = o + lane
                    u2 = u2_cycles[j]
                    ctf = ctf_value(u2, cos2_sample[j], sin2_sample[j], particle)
                    sr = spectrum[2 * lane]
                    si = spectrum[2 * lane + 1]
                    ar = phase_real[lane]
                    ai = phase_imag[lane]
                    pr = ar * pyr - ai * pyi
                    pi = ar * pyi + ai * pyr
                    observed_real = sr * pr - si * pi
                    observed_imag = sr * pi + si * pr
                    mr = ctf * model_real[j]
                    mi = ctf * model_imag[j]
                    # float32 throughout: an integer 2 here made the term float64 (numba's type
                    # rules), with conversions that cost 14 % of this pass
                    term = mr * (mr - np.float32(2.0) * observed_real) + mi * (mi - np.float32(2.0) * observed_imag)
                    # the high-pass as a factor: a select here made the compiler load the
                    # spectrum only under it, as masked gathers (1.7x slower pass)
                    weight = sample_weight[j] * np.float32(u2 >= cut2)
                    block_total += weight * term
                total += block_total
            out[i] = total / (box * box)

    @numba.njit(parallel=True, cache=True)
    def corner_layout_kernel(grid, out):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
        # out[z, y, x] = the 8 trilinear neighbours of grid voxel (z, y, x), ordered
        # (dz, dy, dx) = 000, 001, 010, 011, 100, ...: 64 bytes, one cache line when
        # ``out`` is 64-byte aligned.
        size_z = out.shape[0]
        size_y = out.shape[1]
        size_x = out.shape[2]
        for z in numba.prange(size_z):
            for y in range(size_y):
                for x in range(size_x):
                    out[z, y, x, 0] = grid[z, y, x]
                    out[z, y, x, 1] = grid[z, y, x + 1]
                    out[z, y, x, 2] = grid[z, y + 1, x]
                    out[z, y, x, 3] = grid[z, y + 1, x + 1]
                    out[z, y, x, 4] = grid[z + 1, y, x]
                    out[z, y, x, 5] = grid[z + 1, y, x + 1]
                    out[z, y, x, 6] = grid[z + 1, y + 1, x]
                    out[z, y, x, 7] = grid[z + 1, y + 1, x + 1]


def corner_layout(grid: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The 8-corner layout of a stored half-transform, for the scoring kernel.

    ``grid``: ``(Z, Y, X)`` complex64 (a :class:`~cryosieve.projection.FourierSliceProjector`
    grid). Returns a 64-byte-aligned flat complex64 array of ``(Z - 1) (Y - 1) (X - 1) * 8``
    values: the trilinear neighbours of each voxel, so that the kernel reads one cache line
    per sample instead of four or five (8x the memory of the grid). ``out``: an earlier result
    of the same size to overwrite (the next reference of a sieve: 0.5 GB at box 128 that the
    system need not map and zero again, 0.1 s per reference on 2 cores), or ``None``.
    """
    size_z, size_y, size_x = (dimension - 1 for dimension in grid.shape)
    count = size_z * size_y * size_x * 8
    if out is None or out.shape != (count,) or out.dtype != np.complex64 or out.ctypes.data % 64:
        raw = np.empty(count + 8, dtype=np.complex64)
        start = (-raw.ctypes.data % 64) // 8
        out = raw[start:start + count]
    corner_layout_kernel(np.ascontiguousarray(grid), out.reshape(size_z, size_y, size_x, 8))
    return out


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (``MemAvailable`` of ``/proc/meminfo``,
    else free physical pages), or ``None`` where neither can be read."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def corner_layout_allowed(size_bytes: int) -> bool:
    """Whether an 8-corner layout of ``size_bytes`` is worth building: at most
    :data:`CORNER_LAYOUT_MEMORY`, and at most :data:`CORNER_LAYOUT_SHARE` of the available
    memory (where that is unknown, at most 1 GiB). Measured on 2 cores, kernel alone: box
    128 22 against 31 us per particle reading the grid; box 256 119 against 169 us."""
    if size_bytes > CORNER_LAYOUT_MEMORY:
        return False
    available = available_memory()
    if available is None:
        return size_bytes <= 1 << 30
    return size_bytes <= CORNER_LAYOUT_SHARE * available
