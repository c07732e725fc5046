"""The CPU kernel of the local search (numba): every particle of a batch, level by level, on all cores.

For one particle and one candidate pose ``A`` the kernel samples the reference's central slice at the
band's samples (trilinear interpolation in the padded, Friedel-folded transform of
:class:`~cryosieve.projection.FourierSliceProjector`), and forms, for every shift ``d`` of the level at
once, the whitened cross-correlation and the model's whitened power::

    C(A, d) = Re sum_k Y(k) conj(P_A(k)) exp(-2 pi i k . d / N),    Q(A) = sum_k q(k) |P_A(k)|^2

with ``Y = w CTF J / sigma^2`` and ``q = w CTF^2 / sigma^2`` (:mod:`cryosieve.align.search`). The sum over
shifts is separable (a truncated inverse DFT, row by row: ``Z(ky, dx) = sum_kx X(ky, kx) e_x(kx, dx)``, then
``C(dx, dy) = Re sum_ky Z(ky, dx) e_y(ky, dy)``), so every shift of a level costs two small matrix products
per pose, over the band-limited samples only (the tables from :func:`cryosieve.fourier.shift_phase_value`).
The score of ``(A, d)`` is ``C / sqrt(Q)``: the normalised cross-correlation of the image with the
CTF-modulated projection, in the noise's metric.

Levels (:mod:`cryosieve.align.orientations`): the first tries every rotation vector of ``first`` (times the
first step) and every integer shift within ``shift_range``; each next one the 27 neighbours of the best
rotation at its step and the 5 x 5 shifts around the best at half a pixel, a quarter... (``0.5 ** level``);
a level keeps its best pose and shift, the given pose winning ties. Last, the shift is refined below the
level's spacing by a parabola through the best score and its neighbours along x and along y.

The kernel takes no annotations: numba types its arguments (see pyproject.toml for mypy).
"""

from __future__ import annotations

import math

import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; the torch engine works without it
    numba = None  # type: ignore[assignment]  # None marks numba as missing

#: Whether the kernel can run (numba is installed).
AVAILABLE = numba is not None

#: Shifts per axis of the levels after the first (around the best, at ``0.5 ** level`` pixel).
FINE_SHIFTS = 5


def subpixel(left: float, centre: float, right: float) -> float:
    """The offset (in steps, within [-0.5, 0.5]) of the maximum of the parabola through three equally
    spaced scores; 0 where they have no maximum inside, or a side is missing (-inf)."""
    if not (math.isfinite(left) and math.isfinite(right)):
        return 0.0
    curvature = left - 2.0 * centre + right
    if curvature >= 0.0:
        return 0.0
    return min(0.5, max(-0.5, 0.5 * (left - right) / curvature))


def quadratic_peak(coefficients: np.ndarray) -> tuple[float, float, float]:
    """The maximum of the quadratic ``c + g . x + x^T H x / 2`` of :func:`cryosieve.align.orientations.quadratic_terms`
    coefficients (7 or 10), within the cube ``[-1, 1]^3``; the origin where it has no maximum there."""
    gx, gy, gz = coefficients[1], coefficients[2], coefficients[3]
    hxx, hyy, hzz = 2 * coefficients[4], 2 * coefficients[5], 2 * coefficients[6]
    hxy = hxz = hyz = 0.0
    if coefficients.shape[0] > 7:
        hxy, hxz, hyz = coefficients[7], coefficients[8], coefficients[9]
    minor2 = hxx * hyy - hxy * hxy
    det = hxx * (hyy * hzz - hyz * hyz) - hxy * (hxy * hzz - hyz * hxz) + hxz * (hxy * hyz - hyy * hxz)
    if not (hxx < 0 and minor2 > 0 and det < 0):  # not negative definite: no maximum
        return 0.0, 0.0, 0.0
    if det == 0.0:
        return 0.0, 0.0, 0.0
    # x = -H^-1 g (the adjugate over the determinant)
    x = -((hyy * hzz - hyz * hyz) * gx + (hxz * hyz - hxy * hzz) * gy + (hxy * hyz - hxz * hyy) * gz) / det
    y = -((hxz * hyz - hxy * hzz) * gx + (hxx * hzz - hxz * hxz) * gy + (hxy * hxz - hxx * hyz) * gz) / det
    z = -((hxy * hyz - hxz * hyy) * gx + (hxy * hxz - hxx * hyz) * gy + (hxx * hyy - hxy * hxy) * gz) / det
    if max(abs(x), abs(y), abs(z)) > 1.0:
        return 0.0, 0.0, 0.0
    return x, y, z


if numba is not None:
    from cryosieve.fourier import shift_phase_value

    _subpixel = numba.njit(inline="always", cache=True)(subpixel)
    _quadratic_peak = numba.njit(inline="always", cache=True)(quadratic_peak)

    @numba.njit(inline="always", cache=True, fastmath=True)
    def _rotate(vx, vy, vz, given, out):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
        # out = R(v) @ given, R of the rotation vector v (Rodrigues)
        angle = math.sqrt(vx * vx + vy * vy + vz * vz)
        if angle > 0.0:
            ax, ay, az = vx / angle, vy / angle, vz / angle
        else:
            ax, ay, az = 0.0, 0.0, 1.0
        s = math.sin(angle)
        c = 1.0 - math.cos(angle)
        r00 = 1.0 - c * (ay * ay + az * az)
        r11 = 1.0 - c * (ax * ax + az * az)
        r22 = 1.0 - c * (ax * ax + ay * ay)
        r01 = -s * az + c * ax * ay
        r10 = s * az + c * ax * ay
        r02 = s * ay + c * ax * az
        r20 = -s * ay + c * ax * az
        r12 = -s * ax + c * ay * az
        r21 = s * ax + c * ay * az
        for j in range(3):
            out[0, j] = r00 * given[0, j] + r01 * given[1, j] + r02 * given[2, j]
            out[1, j] = r10 * given[0, j] + r11 * given[1, j] + r12 * given[2, j]
            out[2, j] = r20 * given[0, j] + r21 * given[1, j] + r22 * given[2, j]

    @numba.njit(inline="always", cache=True, fastmath=True)
    def _sample(grid, half, x, y, z):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
        # trilinear value of the stored transform at (x, y, z) (padded voxels, |k| < half), Friedel-folded
        sign = np.float32(1.0)
        if x < 0.0:
            x, y, z, sign = -x, -y, -z, np.float32(-1.0)
        x0 = math.floor(x)
        y0 = math.floor(y)
        z0 = math.floor(z)
        fx = np.float32(x - x0)
        fy = np.float32(y - y0)
        fz = np.float32(z - z0)
        ix = int(x0)
        iy = int(y0) + half
        iz = int(z0) + half
        c00 = grid[iz, iy, ix] + fx * (grid[iz, iy, ix + 1] - grid[iz, iy, ix])
        c01 = grid[iz, iy + 1, ix] + fx * (grid[iz, iy + 1, ix + 1] - grid[iz, iy + 1, ix])
        c10 = grid[iz + 1, iy, ix] + fx * (grid[iz + 1, iy, ix + 1] - grid[iz + 1, iy, ix])
        c11 = grid[iz + 1, iy + 1, ix] + fx * (grid[iz + 1, iy + 1, ix + 1] - grid[iz + 1, iy + 1, ix])
        c0 = c00 + fy * (c01 - c00)
        c1 = c10 + fy * (c11 - c10)
        value = c0 + fz * (c1 - c0)
        return np.float32(value.real), np.float32(value.imag) * sign

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def project_kernel(grid, half, pad, rotations, ky, kx, out_real, out_imag):  # type: ignore[no-untyped-def]
        # out[i, p] = the slice of rotations[i] (b, 3, 3) at (kx[p], ky[p]) cycles per box (|k| < half / pad)
        for i in numba.prange(rotations.shape[0]):  # pragma: no cover - compiled
            a00 = rotations[i, 0, 0] * pad
            a01 = rotations[i, 0, 1] * pad
            a02 = rotations[i, 0, 2] * pad
            a10 = rotations[i, 1, 0] * pad
            a11 = rotations[i, 1, 1] * pad
            a12 = rotations[i, 1, 2] * pad
            for p in range(ky.shape[0]):
                out_real[i, p], out_imag[i, p] = _sample(grid, half, a00 * kx[p] + a10 * ky[p],
                                                         a01 * kx[p] + a11 * ky[p], a02 * kx[p] + a12 * ky[p])

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def search_kernel(grid, half, pad, data_real, data_imag, model_weight, ky, kx,  # type: ignore[no-untyped-def]
                      given, first, neighbours, last, fit, steps, limits, search_range, prior_weight, shift_range, box,
                      out_vector, out_shift, out_score):  # pragma: no cover - compiled
        # grid: (Z, Y, X) complex64 stored transform, zero frequency at [half, half, 0];
        # data_real, data_imag, model_weight: (b, R, C) float32 Y and q on the band (rows ky = -K..K,
        # columns kx = 0..K); given: (b, 3, 3) float64; first (m, 3), neighbours (27, 3): rotation vectors
        # in steps; steps (L,) radians; limits (L,) cycles per box; search_range radians; shift_range pixels.
        count = data_real.shape[0]
        rows = data_real.shape[1]
        columns = data_real.shape[2]
        centre_row = (rows - 1) // 2
        reach = math.floor(shift_range + 1e-9)
        most_shifts = max(2 * reach + 1, FINE_SHIFTS)
        flat = grid.reshape(-1).view(np.float32)  # re, im interleaved
        size_y = np.int32(grid.shape[1])
        size_x = np.int32(grid.shape[2])
        half32 = np.int32(half)
        row_stride = 2 * np.int64(size_x)
        plane_stride = 2 * np.int64(size_x) * np.int64(size_y)
        for i in numba.prange(count):
            ex_real = np.empty((most_shifts, columns), dtype=np.float32)
            ex_imag = np.empty((most_shifts, columns), dtype=np.float32)
            ey_real = np.empty((rows, most_shifts), dtype=np.float32)
            ey_imag = np.empty((rows, most_shifts), dtype=np.float32)
            offset_x = np.empty(columns, dtype=np.float32)
            offset_y = np.empty(columns, dtype=np.float32)
            offset_z = np.empty(columns, dtype=np.float32)
            sign = np.empty(columns, dtype=np.float32)
            corner = np.empty(columns, dtype=np.int32)
            x_real = np.empty(columns, dtype=np.float32)
            x_imag = np.empty(columns, dtype=np.float32)
            z_real = np.empty(most_shifts, dtype=np.float32)
            z_imag = np.empty(most_shifts, dtype=np.float32)
            scores = np.empty((most_shifts, most_shifts), dtype=np.float64)
            best_scores = np.empty((most_shifts, most_shifts), dtype=np.float64)
            offsets = np.empty(most_shifts, dtype=np.float64)
            order = np.empty(most_shifts, dtype=np.int64)  # the centre first: it wins ties
            rotation = np.empty((3, 3), dtype=np.float64)
            most = max(first.shape[0], neighbours.shape[0], last.shape[0])
            candidate_best = np.empty(most, dtype=np.float64)
            vectors_of = np.empty((most, 3), dtype=np.float64)
            coefficients_of = np.empty((most, 6), dtype=np.float64)
            allowed = np.empty(most, dtype=np.bool_)
            powers = np.empty(most, dtype=np.float64)
            sums = np.empty((most, most_shifts, most_shifts), dtype=np.float64)
            vector_x, vector_y, vector_z = 0.0, 0.0, 0.0
            shift_x, shift_y = 0.0, 0.0
            best_score = -np.inf
            spacing = 1.0
            shifts = 1
            best_row, best_column = 0, 0
            levels = steps.shape[0]
            for level in range(levels):
                step = steps[level]
                limit = limits[level]
                limit2 = limit * limit
                last_row = min(centre_row, math.ceil(limit) - 1)
                if level == 0:
                    shifts = 2 * reach + 1
                    spacing = 1.0
                    for j in range(shifts):
                        offsets[j] = j - reach
                    centre_x, centre_y = 0.0, 0.0
                    candidates = first.shape[0]
                else:
                    shifts = FINE_SHIFTS
                    spacing = 0.5 ** level
                    for j in range(shifts):
                        offsets[j] = (j - FINE_SHIFTS // 2) * spacing
                    centre_x, centre_y = shift_x, shift_y
                    candidates = last.shape[0] if level == levels - 1 else neighbours.shape[0]
                middle = shifts // 2
                order[0] = middle
                for j in range(middle):
                    order[j + 1] = j
                for j in range(middle + 1, shifts):
                    order[j] = j
                # the level's shift tables: e_x(kx, dx) and e_y(ky, dy) = exp(-2 pi i k d / N)
                for j in range(shifts):
                    for c in range(columns):
                        ex_real[j, c], ex_imag[j, c] = shift_phase_value(kx[c], centre_x + offsets[j], box)
                for r in range(rows):
                    for j in range(shifts):
                        ey_real[r, j], ey_imag[r, j] = shift_phase_value(ky[r], centre_y + offsets[j], box)
                level_best = -np.inf
                level_vector_x, level_vector_y, level_vector_z = vector_x, vector_y, vector_z
                level_row, level_column = 0, 0
                # the candidates' poses (the sample rows of neighbouring poses are read one after the other,
                # while their grid lines are still in the caches)
                for m in range(candidates):
                    if level == 0:
                        vx = first[m, 0] * step
                        vy = first[m, 1] * step
                        vz = first[m, 2] * step
                    elif level == levels - 1:
                        vx = vector_x + last[m, 0] * step
                        vy = vector_y + last[m, 1] * step
                        vz = vector_z + last[m, 2] * step
                    else:
                        vx = vector_x + neighbours[m, 0] * step
                        vy = vector_y + neighbours[m, 1] * step
                        vz = vector_z + neighbours[m, 2] * step
                    candidate_best[m] = -np.inf
                    vectors_of[m, 0] = vx
                    vectors_of[m, 1] = vy
                    vectors_of[m, 2] = vz
                    allowed[m] = vx * vx + vy * vy + vz * vz <= search_range * search_range * (1 + 1e-9)
                    _rotate(vx, vy, vz, given[i], rotation)
                    for j in range(3):
                        coefficients_of[m, j] = rotation[0, j] * pad
                        coefficients_of[m, 3 + j] = rotation[1, j] * pad
                    powers[m] = 0.0
                    for t in range(shifts):
                        for s in range(shifts):
                            sums[m, t, s] = 0.0
                for r in range(centre_row - last_row, centre_row + last_row + 1):
                    row_ky = ky[r]
                    room = limit2 - row_ky * row_ky
                    if room <= 0.0:
                        continue
                    last_column = min(columns - 1, math.ceil(math.sqrt(room)) - 1)
                    if last_column * last_column >= room:
                        last_column -= 1
                    for m in range(candidates):
                        if not allowed[m]:
                            continue
                        f00 = np.float32(coefficients_of[m, 0])
                        f01 = np.float32(coefficients_of[m, 1])
                        f02 = np.float32(coefficients_of[m, 2])
                        bx = np.float32(coefficients_of[m, 3] * row_ky)
                        by = np.float32(coefficients_of[m, 4] * row_ky)
                        bz = np.float32(coefficients_of[m, 5] * row_ky)
                        width = last_column + 1
                        # 1. where each sample lands (a fixed-form loop the compiler vectorises)
                        for c in range(width):
                            column_kx = kx[c]
                            x = bx + f00 * column_kx
                            y = by + f01 * column_kx
                            z = bz + f02 * column_kx
                            flip = np.float32(-1.0) if x < 0 else np.float32(1.0)
                            x *= flip
                            y *= flip
                            z *= flip
                            x0 = np.floor(x)
                            y0 = np.floor(y)
                            z0 = np.floor(z)
                            offset_x[c] = x - x0
                            offset_y[c] = y - y0
                            offset_z[c] = z - z0
                            sign[c] = flip
                            corner[c] = ((np.int32(z0) + half32) * size_y + np.int32(y0) + half32) * size_x \
                                + np.int32(x0)
                        # 2. trilinear interpolation from the float32 view of the grid, and the products
                        row_power = np.float32(0.0)
                        for c in range(width):
                            fx = offset_x[c]
                            fy = offset_y[c]
                            fz = offset_z[c]
                            gx = np.float32(1.0) - fx
                            gy = np.float32(1.0) - fy
                            gz = np.float32(1.0) - fz
                            w00 = gz * gy
                            w01 = gz * fy
                            w10 = fz * gy
                            w11 = fz * fy
                            base = 2 * np.int64(corner[c])
                            b01 = base + row_stride
                            b10 = base + plane_stride
                            b11 = b10 + row_stride
                            model_real = (gx * (w00 * flat[base] + w01 * flat[b01] + w10 * flat[b10]
                                                + w11 * flat[b11])
                                          + fx * (w00 * flat[base + 2] + w01 * flat[b01 + 2] + w10 * flat[b10 + 2]
                                                  + w11 * flat[b11 + 2]))
                            model_imag = (gx * (w00 * flat[base + 1] + w01 * flat[b01 + 1] + w10 * flat[b10 + 1]
                                                + w11 * flat[b11 + 1])
                                          + fx * (w00 * flat[base + 3] + w01 * flat[b01 + 3]
                                                  + w10 * flat[b10 + 3] + w11 * flat[b11 + 3])) * sign[c]
                            q = model_weight[i, r, c]
                            row_power += q * (model_real * model_real + model_imag * model_imag)
                            yr = data_real[i, r, c]
                            yi = data_imag[i, r, c]
                            x_real[c] = yr * model_real + yi * model_imag
                            x_imag[c] = yi * model_real - yr * model_imag
                        powers[m] += row_power
                        for s in range(shifts):
                            sum_real = np.float32(0.0)
                            sum_imag = np.float32(0.0)
                            for c in range(last_column + 1):
                                sum_real += x_real[c] * ex_real[s, c] - x_imag[c] * ex_imag[s, c]
                                sum_imag += x_real[c] * ex_imag[s, c] + x_imag[c] * ex_real[s, c]
                            z_real[s] = sum_real
                            z_imag[s] = sum_imag
                        for t in range(shifts):
                            er = ey_real[r, t]
                            ei = ey_imag[r, t]
                            for s in range(shifts):
                                sums[m, t, s] += z_real[s] * er - z_imag[s] * ei
                for m in range(candidates):
                    if not allowed[m]:
                        continue
                    power = powers[m]
                    vx, vy, vz = vectors_of[m, 0], vectors_of[m, 1], vectors_of[m, 2]
                    norm = 1.0 / math.sqrt(power) if power > 0.0 else 0.0
                    penalty = (vx * vx + vy * vy + vz * vz) * prior_weight
                    improved = False
                    for ot in range(shifts):
                        t = order[ot]
                        dy = centre_y + offsets[t]
                        for os in range(shifts):
                            s = order[os]
                            dx = centre_x + offsets[s]
                            if dx * dx + dy * dy > shift_range * shift_range * (1 + 1e-9):
                                scores[t, s] = -np.inf
                                continue
                            correlation = sums[m, t, s] * norm
                            scores[t, s] = 0.5 * correlation * abs(correlation) - penalty
                            if scores[t, s] > candidate_best[m]:
                                candidate_best[m] = scores[t, s]
                            if scores[t, s] > level_best:
                                level_best = scores[t, s]
                                level_row, level_column = t, s
                                improved = True
                    if improved:
                        level_vector_x, level_vector_y, level_vector_z = vx, vy, vz
                        for t in range(shifts):
                            for s in range(shifts):
                                best_scores[t, s] = scores[t, s]
                if level_best > -np.inf:
                    if level > 0 and level == levels - 1:
                        # below the step: the peak of the quadratic through the scores around the centre, where
                        # it has one within their cube
                        complete = True
                        for m in range(candidates):
                            if not candidate_best[m] > -np.inf:
                                complete = False
                        if complete:
                            coefficients = np.zeros(fit.shape[0], dtype=np.float64)
                            for term in range(fit.shape[0]):
                                for m in range(candidates):
                                    coefficients[term] += fit[term, m] * candidate_best[m]
                            px, py, pz = _quadratic_peak(coefficients)
                            if px != 0.0 or py != 0.0 or pz != 0.0:
                                level_vector_x = vector_x + step * px
                                level_vector_y = vector_y + step * py
                                level_vector_z = vector_z + step * pz
                    vector_x, vector_y, vector_z = level_vector_x, level_vector_y, level_vector_z
                    shift_x = centre_x + offsets[level_column]
                    shift_y = centre_y + offsets[level_row]
                    best_score = level_best
                    best_row, best_column = level_row, level_column
            # the shift below the last level's spacing: a parabola along x and along y
            if best_score > -np.inf:
                if 0 < best_column < shifts - 1:
                    left = best_scores[best_row, best_column - 1]
                    right = best_scores[best_row, best_column + 1]
                    if left > -np.inf and right > -np.inf:
                        shift_x += spacing * _subpixel(left, best_score, right)
                if 0 < best_row < shifts - 1:
                    below = best_scores[best_row - 1, best_column]
                    above = best_scores[best_row + 1, best_column]
                    if below > -np.inf and above > -np.inf:
                        shift_y += spacing * _subpixel(below, best_score, above)
            out_vector[i, 0] = vector_x
            out_vector[i, 1] = vector_y
            out_vector[i, 2] = vector_z
            out_shift[i, 0] = shift_x
            out_shift[i, 1] = shift_y
            out_score[i] = best_score
