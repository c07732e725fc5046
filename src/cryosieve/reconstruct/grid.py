"""The padded half-transform grid a reconstruction accumulates, and every operation on it.

This docstring is the one statement of the grid's conventions; the insertion of the two
engines (:mod:`.cpu`, :mod:`.tensor_path`) and the operations below follow it.

Layout
------
A map of box ``n`` (voxels ``[z, y, x]``, centred at voxel ``n // 2``, voxel size the
particles' pixel size) is reconstructed on a Fourier grid padded by ``pad_factor`` (2,
as RELION): ``P = pad_factor * n`` and ``h = P // 2``.

* **Shape and dtype.** ``(P + 1, P + 1, h + 2, 3)`` float64 (:func:`grid_shape`), indexed
  ``[z, y, x, c]``: a numpy array for the numba engine, a torch tensor (any device) for the
  tensor engine. ``c = 0, 1``: real and imaginary parts of the data
  ``D(K) = sum_i C_i S_i``; ``c = 2``: the weight ``W(K) = sum_i C_i^2`` (``S_i`` the
  origin-shifted image transform and ``C_i`` the CTF of particle ``i``, see
  :mod:`.samples`; both unitless, ``C = 1`` without CTF correction).
* **Frequencies.** ``K = (Kx, Ky, Kz)`` in padded cycles per box, ``K = pad_factor * k``
  with ``k`` in cycles per box of the map (``k / (n * pixel_size)`` in 1/Å). A particle of
  RELION matrix ``A`` puts its image frequency ``(kx, ky)`` at
  ``K = pad_factor * A^T (kx, ky, 0)`` (:mod:`cryosieve.geometry`).
* **Centre.** ``K`` is stored at index ``[Kz + h, Ky + h, Kx]``, so the zero frequency is at
  ``[h, h, 0]``. ``Ky`` and ``Kz`` run over ``-h..h`` (both ends) and ``Kx`` over
  ``0..h + 1``: the 8 trilinear neighbours of every point with ``|K| < h`` are in the array.
  ``D`` is the transform of the map about its centre voxel ``n // 2``.
* **Half.** Only ``Kx >= 0`` is stored. The map is real, so ``D(-K) = conj D(K)`` and
  ``W(-K) = W(K)``: a point with ``Kx < 0`` is folded to its Friedel mate ``-K`` and its
  imaginary part negated (:func:`fold_and_locate`). On the plane ``Kx = 0`` both ``K`` and
  ``-K`` are stored; :func:`enforce_hermitian` makes them conjugate, index ``[i, j, 0]``
  pairing with ``[P - i, P - j, 0]``.
* **Sphere.** Only ``|K| < h`` carries data (images are inserted up to their Nyquist
  frequency, ``|k| < n / 2``); :func:`symmetrise_grid` and :func:`grid_to_map` zero the rest.
* **Interpolation.** A value at ``K`` is spread to the 8 voxels ``floor(K) + {0, 1}^3`` (after
  folding) with trilinear weights, and read back the same way; :func:`grid_to_map`'s
  gridding correction undoes the blur this spreading causes.
* **Weighting.** The map's transform is ``D M``, ``M`` the gridding weight of
  :func:`gridding_multiplier`: RELION's iterative weight correction (``M`` close to
  ``1 / W`` but smooth over a few voxels), or the plain ``1 / (W + lambda)``.

Operations
----------
Each operation is one function that takes either kind of grid. The Hermitian fill is one
code for both; where numpy/numba and torch need their own code, both live here side by
side, and the steps around them are written once:

=========================  ==================================  ==================================
operation                  numba, on a numpy grid              torch, on a tensor grid
=========================  ==================================  ==================================
fold and locate a point    ``fold_and_locate``                 ``fold_and_locate_torch``
symmetrisation             ``_symmetrise_kernel``              ``_symmetrise_torch``
mean weight                ``_NumbaGrid.mean_weight``          ``_TorchGrid.mean_weight``
gridding weight ``M``      ``_multiplier_kernel``              ``_gridding_multiplier_torch``
weighting ``D M``          ``_NumbaGrid.divided_columns``      ``_TorchGrid.divided_columns``
mask, gridding correction  ``_NumbaGrid.mask_and_correct``     ``_TorchGrid.mask_and_correct``
=========================  ==================================  ==================================

The two gridding weights agree to float32 rounding (the same sums, in another order).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Protocol, Union

import numpy as np
import scipy.fft

from cryosieve.errors import CryoSieveInputError
from cryosieve.fourier import centred_coordinates, fft_workers, raised_cosine

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; keep the torch engine usable
    numba = None  # type: ignore[assignment]  # None marks numba as missing

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch

#: An accumulation grid of either engine (see the module's docstring).
Grid = Union[np.ndarray, "torch.Tensor"]

#: Regularisation of the division, relative to the mean weight inside the sphere (and the
#: floor of the smoothed density in the gridding weight correction, relative to its mean).
RELATIVE_REGULARISATION = 1e-3
#: Iterations of the gridding weight correction (:func:`gridding_multiplier`; 0: plain division).
GRIDDING_ITERATIONS = 6
#: Radius (padded voxels) and shape parameter of the Kaiser-Bessel blob of the weight
#: correction: RELION's ``--blob_r 1.9`` (times 2) and ``--blob_a 15``.
BLOB_RADIUS = 3.8
BLOB_ALPHA = 15.0
#: Width (voxels) of the raised-cosine edge of RELION's mask outside the box's sphere.
MASK_EDGE_WIDTH = 3.0


def grid_shape(box: int, pad_factor: int) -> tuple[int, int, int, int]:
    """``(P + 1, P + 1, P // 2 + 2, 3)`` with ``P = pad_factor * box``: the shape of a grid."""
    padded = pad_factor * box
    return padded + 1, padded + 1, padded // 2 + 2, 3


# ---------------------------------------------------------------------------------------
# Folding a point into the stored half and locating its trilinear neighbours
# ---------------------------------------------------------------------------------------

if numba is not None:
    @numba.njit(inline="always", cache=True)
    def friedel_fold(x, y, z):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
        """A 3D frequency moved to the stored ``x >= 0`` half of a Hermitian transform, with the sign
        its value's imaginary part takes there (-1 when it was mirrored)."""
        if x < 0:
            return -x, -y, -z, -1.0
        return x, y, z, 1.0

    @numba.njit(inline="always", cache=True)
    def fold_and_locate(x, y, z, half, size_y, size_x):  # type: ignore[no-untyped-def]  # pragma: no cover
        """Point ``K = (x, y, z)`` (padded cycles per box, ``|K| < half``) in a grid of
        ``size_y`` rows of ``size_x`` voxels: ``(plane, corner, fx, fy, fz, sign)``, the z
        index of its lower corner, the flat voxel index of that corner, its offsets in
        ``[0, 1)`` from it, and the sign of the imaginary part there (-1 if folded)."""
        x, y, z, sign = friedel_fold(x, y, z)
        x0 = math.floor(x)
        y0 = math.floor(y)
        z0 = math.floor(z)
        plane = int(z0) + half
        corner = (plane * size_y + int(y0) + half) * size_x + int(x0)
        return plane, corner, x - x0, y - y0, z - z0, sign


def fold_and_locate_torch(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, half: int, size_y: int, size_x: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fold_and_locate` on tensors of points (any shape, same for all):
    ``(corner, fx, fy, fz, sign)``, ``corner`` int64, the others of ``x``'s dtype."""
    import torch

    sign = torch.where(x < 0, -1.0, 1.0).to(x.dtype)
    x, y, z = x * sign, y * sign, z * sign
    x0, y0, z0 = torch.floor(x), torch.floor(y), torch.floor(z)
    corner = ((z0.long() + half) * size_y + (y0.long() + half)) * size_x + x0.long()
    return corner, x - x0, y - y0, z - z0, sign


def trilinear_corners_torch(corner: torch.Tensor, fx: torch.Tensor, fy: torch.Tensor, fz: torch.Tensor,
                            size_y: int, size_x: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The 8 neighbours of located points: ``(flat voxel index, trilinear weight)`` for each
    ``(dz, dy, dx)`` in ``{0, 1}^3``, each of ``corner``'s shape."""
    for dz, wz in ((0, 1 - fz), (1, fz)):
        for dy, wy in ((0, 1 - fy), (1, fy)):
            for dx, wx in ((0, 1 - fx), (1, fx)):
                yield corner + (dz * size_y + dy) * size_x + dx, wz * wy * wx


# ---------------------------------------------------------------------------------------
# Hermitian fill of the x = 0 plane: one code for both kinds of grid
# ---------------------------------------------------------------------------------------


def enforce_hermitian(grid: Grid) -> None:
    """Add each ``Kx = 0`` sample's Friedel mate to it (in place).

    ``grid``: a grid (numpy or torch). Frequency ``(0, Ky, Kz)`` and ``(0, -Ky, -Kz)`` both
    become the sum of the two (conjugated for the imaginary part), which is what a full
    (both halves) Hermitian insertion would have accumulated there.
    """
    plane: Any = grid[:, :, 0, :]  # an array or a tensor: the same operators below
    mirror = plane[::-1, ::-1].copy() if isinstance(grid, np.ndarray) else plane.flip((0, 1))
    plane[..., 0] += mirror[..., 0]
    plane[..., 1] -= mirror[..., 1]
    plane[..., 2] += mirror[..., 2]


# ---------------------------------------------------------------------------------------
# Symmetrisation
# ---------------------------------------------------------------------------------------


def symmetrise_grid(grid: Grid, rotations: Any) -> Grid:
    """``G(K) <- sum_R G(R K)`` by trilinear interpolation, for every ``|K| < h``.

    ``grid``: a grid (numpy or torch, Hermitian on ``Kx = 0``); ``rotations``: ``(m, 3, 3)``
    point-group matrices acting on ``(x, y, z)`` (array or tensor). Returns a new grid of the
    same kind, zero outside the sphere (RELION's ``BackProjector::applyPointGroupSymmetry``).
    """
    if isinstance(grid, np.ndarray):
        out = np.zeros_like(grid)
        _symmetrise_kernel(np.ascontiguousarray(grid), out, (grid.shape[0] - 1) // 2,
                           np.ascontiguousarray(rotations, dtype=np.float64))
        return out
    return _symmetrise_torch(grid, rotations)


if numba is not None:

    # The kernels take no annotations: numba types their arguments.
    @numba.njit(parallel=True, cache=True)
    def _symmetrise_kernel(source, target, half, rotations):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
        size_z = target.shape[0]
        size_y = target.shape[1]
        size_x = target.shape[2]
        plane = size_y * size_x
        flat = source.reshape(-1)
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
                        _, corner, fx, fy, fz, sign = fold_and_locate(x, y, z, half, size_y, size_x)
                        re = 0.0
                        im = 0.0
                        w = 0.0
                        for dz in range(2):
                            wz = fz if dz == 1 else 1.0 - fz
                            for dy in range(2):
                                wzy = wz * (fy if dy == 1 else 1.0 - fy)
                                for dx in range(2):
                                    c = wzy * (fx if dx == 1 else 1.0 - fx)
                                    o = (corner + dz * plane + dy * size_x + dx) * 3
                                    re += c * flat[o]
                                    im += c * flat[o + 1]
                                    w += c * flat[o + 2]
                        re_sum += re
                        im_sum += sign * im
                        w_sum += w
                    target[iz, iy, ix, 0] = re_sum
                    target[iz, iy, ix, 1] = im_sum
                    target[iz, iy, ix, 2] = w_sum


def _symmetrise_torch(grid: torch.Tensor, rotations: Any, chunk_planes: int = 8) -> torch.Tensor:
    import torch

    half = (grid.shape[0] - 1) // 2
    size_z, size_y, size_x = grid.shape[:3]
    device, real = grid.device, grid.dtype
    flat = grid.reshape(-1, 3)
    out = torch.zeros_like(grid)
    ky = torch.arange(size_y, device=device, dtype=real) - half
    kx = torch.arange(size_x, device=device, dtype=real)
    matrices = torch.as_tensor(rotations, device=device, dtype=real)
    for start in range(0, size_z, chunk_planes):
        kz = torch.arange(start, min(start + chunk_planes, size_z), device=device, dtype=real) - half
        z, y, x = torch.meshgrid(kz, ky, kx, indexing="ij")
        inside = x * x + y * y + z * z < half * half
        px, py, pz = x[inside], y[inside], z[inside]
        total = torch.zeros((px.numel(), 3), device=device, dtype=real)
        for matrix in matrices:
            rx = matrix[0, 0] * px + matrix[0, 1] * py + matrix[0, 2] * pz
            ry = matrix[1, 0] * px + matrix[1, 1] * py + matrix[1, 2] * pz
            rz = matrix[2, 0] * px + matrix[2, 1] * py + matrix[2, 2] * pz
            corner, fx, fy, fz, sign = fold_and_locate_torch(rx, ry, rz, half, size_y, size_x)
            sample = torch.zeros_like(total)
            for index, weight in trilinear_corners_torch(corner, fx, fy, fz, size_y, size_x):
                sample += weight[:, None] * flat[index]
            sample[:, 1] *= sign
            total += sample
        block = out[start:start + kz.numel()]
        block[inside] = total
    return out


# ---------------------------------------------------------------------------------------
# Gridding weight: the factor each voxel's data is multiplied by (the iterative weight
# correction of RELION's BackProjector::reconstruct, with a separable blob)
# ---------------------------------------------------------------------------------------


def blob_taps(radius: float = BLOB_RADIUS, alpha: float = BLOB_ALPHA) -> np.ndarray:
    """The 1D Kaiser-Bessel blob of order 0 sampled on the grid and normalised to sum 1.

    ``radius`` (padded voxels) and ``alpha`` as RELION's blob (``--blob_r 1.9`` times 2,
    ``--blob_a 15``). Returns ``(2 floor(radius) + 1,)`` float64 values at offsets
    ``-floor(radius)..floor(radius)``: ``I0(alpha sqrt(1 - (d / radius)^2))``, normalised.
    The 3D kernel of :func:`gridding_multiplier` is their product along the three axes.
    """
    reach = math.floor(radius)
    offsets = np.arange(-reach, reach + 1, dtype=np.float64)
    values = np.i0(alpha * np.sqrt(np.clip(1.0 - (offsets / radius) ** 2, 0.0, None)))
    result: np.ndarray = values / values.sum()
    return result


def gridding_multiplier(grid: Grid, iterations: int, relative_regularisation: float,
                        workspace: list[np.ndarray] | None = None) -> tuple[Grid, float]:
    """The factor ``M(K)`` that turns the accumulated data into the map's transform, ``D M``.

    ``grid``: an accumulated grid (numpy or torch; Hermitian, symmetrised);
    ``relative_regularisation``: ``rho``, a floor relative to the mean weight ``mean(W)``
    over the sphere ``|K| < h``; ``workspace``: an empty list to be filled with the numba
    engine's work arrays, or one so filled by an earlier call on a grid of the same shape,
    whose arrays are then reused (the returned array is one of them: valid until the next
    call with the same workspace).

    With ``iterations = 0``: plain division, ``M = 1 / (W + rho mean(W))``. Otherwise the
    iterative weight correction of Pipe & Menon (1999), as RELION's
    ``BackProjector::reconstruct`` does (10 iterations there): with ``w = W / mean(W)``,
    ``v = 1`` inside the sphere, and ``B`` the blob of :func:`blob_taps` along each axis,
    each iteration sets

        ``v <- v / max((v w) * B / (1 * B), rho)``    (``*``: convolution, inside ``|K| < h``)

    so that the blob-smoothed density of the weighted samples becomes uniform; then
    ``M = v / mean(W)``. The correction weighs each voxel by the smoothed density of its
    neighbourhood rather than by its own weight, so that voxels few samples reached are
    not noisier than their neighbours: against the known truth, the map's FSC is higher
    than with the plain division from a quarter of Nyquist on.

    Where this differs from RELION (3.1, ``BackProjector::reconstruct`` and
    ``convoluteBlobRealSpace``):

    * the blob is the product of 1D profiles (:func:`blob_taps`), applied by a direct
      convolution on the half grid, not RELION's radial blob applied by FFTs of the
      padded grid: with the same iterations, the two maps' FSC against the truth agree
      to 3e-4 at every shell but the last before Nyquist (8e-4; box 96, 3,000
      particles), and the convolution costs a few percent of the FFTs' time;
    * the smoothed density is divided by ``1 * B`` (the blob-smoothed sphere, 1 except
      within the blob's reach of the sphere's surface), so that the empty outside of the
      sphere does not count as missing data; RELION's weights grow there, and its maps
      lose FSC against the truth in the last shells before Nyquist;
    * :data:`GRIDDING_ITERATIONS` (6) iterations instead of RELION's 10: the iteration
      is stopped before ``v`` follows every voxel's weight, which keeps more of the
      smoothing's gain at high resolution (measured in ``docs/benchmarks.md``).

    Returns
    -------
    ``(density, scale)``: ``density`` ``(P + 1, P + 1, h + 1)`` float32
    ``[Kz + h, Ky + h, Kx]`` (numpy, or a tensor on the grid's device), zero outside
    ``|K| < h``, and ``scale`` (``1 / mean(W)``), with ``M = scale * density / W`` (and
    ``M = 0`` where ``W = 0``: no data there). ``density`` is ``v W`` (``W / (W / mean(W) +
    rho)`` without iterations): the weighting divides by ``W`` as it reads the data next
    to it.
    """
    taps = blob_taps().astype(np.float32)
    if isinstance(grid, np.ndarray):
        return _gridding_multiplier_numba(grid, iterations, relative_regularisation, taps, workspace)
    return _gridding_multiplier_torch(grid, iterations, relative_regularisation, taps)


def _gridding_multiplier_numba(grid: np.ndarray, iterations: int, floor: float, taps: np.ndarray,
                               workspace: list[np.ndarray] | None) -> tuple[np.ndarray, float]:
    padded = grid.shape[0] - 1
    half = padded // 2
    shape = (padded + 1, padded + 1, half + 1)
    # Work arrays: written only inside the sphere (|K| < h + 6 for the passes' own), so
    # zero elsewhere, as the passes need, however often they are reused.
    if workspace is None:
        workspace = []
    if not workspace or workspace[0].shape != shape:
        workspace[:] = [np.zeros(shape, dtype=np.float32) for _ in range(3)]
    if iterations <= 0:
        scale = 1.0 / (_NumbaGrid.mean_weight(grid) + 1e-300)
        _plain_multiplier_kernel(grid, half, scale, floor, workspace[0])
        return workspace[0], scale
    if taps.size != 7:  # the kernel's convolutions are written out for 7 taps
        raise ValueError(f"the gridding blob has {taps.size} taps, the numba kernel 7")
    # One slab of z planes per thread, of about equal numbers of voxels in the sphere.
    reach = taps.size // 2
    kz = np.arange(padded + 1) - half
    work = np.cumsum(np.maximum((half + 2 * reach) ** 2 - kz * kz, 0).astype(np.float64))
    threads = max(1, min(numba.get_num_threads(), padded + 1))
    bounds = np.searchsorted(work, work[-1] * np.arange(1, threads) / threads)
    slabs = np.unique(np.concatenate([[0], bounds, [padded + 1]])).astype(np.int64)
    density, scale = _multiplier_kernel(grid, half, floor, iterations, taps, slabs, *workspace)
    return density, float(scale)


if numba is not None:

    @numba.njit(inline="always", cache=True)
    def _row_length(limit, ky, kz, width):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
        # How many Kx = 0, 1, ... of row (ky, kz) have Kx^2 + ky^2 + kz^2 < limit (at most width).
        rest = limit - ky * ky - kz * kz
        if rest <= 0:
            return 0
        count = int(math.sqrt(rest))
        while count * count < rest:
            count += 1
        while count > 0 and (count - 1) * (count - 1) >= rest:
            count -= 1
        return min(count, width)

    @numba.njit(parallel=True, cache=True)
    def _plain_multiplier_kernel(grid, half, scale, floor, out):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
        # out = W / (W / mean + rho) inside |K| < h (out is zero elsewhere)
        size = out.shape[0]
        width = out.shape[2]
        for iz in numba.prange(size):
            for iy in range(size):
                for ix in range(_row_length(half * half, iy - half, iz - half, width)):
                    value = grid[iz, iy, ix, 2]
                    out[iz, iy, ix] = value / (value * scale + floor)

    # Its parallel loops must stay apart (no loop fusion): each reads what the previous one
    # wrote. (numba takes a dict of parallel options; its type stubs know only a bool.)
    @numba.njit(parallel={"fusion": False}, cache=True)  # type: ignore[call-overload]
    def _multiplier_kernel(grid, half, floor, iterations, taps, slabs, current, following,  # type: ignore[no-untyped-def]
                           norm):  # pragma: no cover - compiled
        # (p, 1 / mean(W)) of gridding_multiplier (p = v W float32 (P + 1, P + 1, h + 1),
        # zero outside |K| < h), for a blob of 7 symmetric taps. The iterations run on p,
        # which the convolution reads: p <- p / max(smoothed p / (mean(W) 1 * B), rho),
        # alternating between the arrays current and following (following holds W before
        # the first). norm holds the inverse of the smoothed sphere 1 * B; it is read only
        # near the sphere's surface, as it equals its value at K = 0 wherever the blob's
        # cube lies inside the sphere.
        # Each thread smooths the z planes of its slab: per plane, the convolution along x
        # (the half grid continued across Kx = 0 by Friedel mates, f(-x, y, z) = f(x, -y,
        # -z)) at |K| < h + 2 reach, then along y at |K| < h + reach into a ring of
        # 2 reach + 1 planes, from which the convolution along z inside the sphere follows
        # (the slab's reach planes on either side are smoothed along x and y twice, once by
        # each neighbouring thread).
        size = current.shape[0]
        width = current.shape[2]
        last = size - 1
        count = 7  # the blob's taps, symmetric: t0 t1 t2 t3 t2 t1 t0
        reach = 3
        t0, t1, t2, t3 = taps[0], taps[1], taps[2], taps[3]
        # lengths[p, z, y]: the row's voxels with |K| < h + (2 - p) reach (p = 0: along x,
        # 1: along y, 2: inside the sphere); p = 3: those whose blob cube lies inside the sphere
        lengths = np.zeros((4, size, size), dtype=np.int64)
        total = 0.0
        voxels = 0
        for iz in numba.prange(size):
            for iy in range(size):
                for p in range(3):
                    lengths[p, iz, iy] = _row_length((half + (2 - p) * reach) ** 2, iy - half, iz - half, width)
                deep = _row_length(half * half, abs(iy - half) + reach, abs(iz - half) + reach, width + reach)
                lengths[3, iz, iy] = max(deep - reach, 0)
                for ix in range(lengths[2, iz, iy]):  # p = 1 (the sphere) for 1 * B; then p = W
                    current[iz, iy, ix] = 1.0
                    value = grid[iz, iy, ix, 2]
                    following[iz, iy, ix] = value
                    total += value
                    voxels += 1
        scale = 1.0 / (total / max(voxels, 1) + 1e-300)
        one = np.float32(1.0)
        lowest = np.float32(floor)
        factor = np.float32(scale)
        centre = one
        for step in range(iterations + 1):  # step 0: 1 * B; then the iterations
            for slab in numba.prange(slabs.shape[0] - 1):
                start = slabs[slab]
                stop = slabs[slab + 1]
                along_x = np.zeros((size, width), dtype=np.float32)
                ring = np.zeros((count, size, width), dtype=np.float32)
                line = np.zeros(width + 2 * reach, dtype=np.float32)  # p at Kx = -reach..width + reach - 1
                row = np.zeros(width, dtype=np.float32)
                zero = np.zeros(width, dtype=np.float32)
                for plane in range(start - reach, stop + reach):
                    slot = (plane + count) % count
                    if plane < 0 or plane > last:
                        ring[slot] = 0.0
                    else:
                        mirror = last - plane
                        for iy in range(size):
                            length = lengths[0, plane, iy]
                            if length == 0:
                                continue
                            for ix in range(min(width, length + reach)):
                                line[reach + ix] = current[plane, iy, ix]
                            for m in range(1, reach + 1):
                                line[reach - m] = current[mirror, last - iy, m]
                            target = along_x[iy]
                            for ix in range(length):
                                target[ix] = (t0 * (line[ix] + line[ix + 6]) + t1 * (line[ix + 1] + line[ix + 5])
                                              + t2 * (line[ix + 2] + line[ix + 4]) + t3 * line[ix + 3])
                        for iy in range(size):
                            length = lengths[1, plane, iy]
                            if length == 0:
                                continue
                            y0 = along_x[iy - 3] if iy >= 3 else zero
                            y1 = along_x[iy - 2] if iy >= 2 else zero
                            y2 = along_x[iy - 1] if iy >= 1 else zero
                            y3 = along_x[iy]
                            y4 = along_x[iy + 1] if iy + 1 <= last else zero
                            y5 = along_x[iy + 2] if iy + 2 <= last else zero
                            y6 = along_x[iy + 3] if iy + 3 <= last else zero
                            target = ring[slot, iy]
                            for ix in range(length):
                                target[ix] = (t0 * (y0[ix] + y6[ix]) + t1 * (y1[ix] + y5[ix])
                                              + t2 * (y2[ix] + y4[ix]) + t3 * y3[ix])
                    iz = plane - reach  # all planes iz - reach..iz + reach are in the ring
                    if iz < start:
                        continue
                    for iy in range(size):
                        length = lengths[2, iz, iy]
                        if length == 0:
                            continue
                        z0 = ring[(iz + 4) % 7, iy]  # plane iz - 3
                        z1 = ring[(iz + 5) % 7, iy]
                        z2 = ring[(iz + 6) % 7, iy]
                        z3 = ring[iz % 7, iy]
                        z4 = ring[(iz + 1) % 7, iy]
                        z5 = ring[(iz + 2) % 7, iy]
                        z6 = ring[(iz + 3) % 7, iy]
                        for ix in range(length):
                            row[ix] = (t0 * (z0[ix] + z6[ix]) + t1 * (z1[ix] + z5[ix])
                                       + t2 * (z2[ix] + z4[ix]) + t3 * z3[ix])
                        if step == 0:
                            for ix in range(length):
                                norm[iz, iy, ix] = one / row[ix]
                        else:  # float32 throughout
                            deep = lengths[3, iz, iy]
                            source = current[iz, iy]
                            target = following[iz, iy]
                            inverse = norm[iz, iy]
                            for ix in range(deep):
                                target[ix] = source[ix] / max(row[ix] * centre, lowest)
                            for ix in range(deep, length):
                                target[ix] = source[ix] / max(row[ix] * (inverse[ix] * factor), lowest)
            if step == 0:  # 1 / (1 * B) where the blob's cube lies inside the sphere, times 1 / mean(W)
                centre = norm[half, half, 0] * factor
            current, following = following, current
        return current, scale


def _blur_torch(values: torch.Tensor, taps: list[float]) -> torch.Tensor:
    """:func:`gridding_multiplier`'s separable blob convolution (the twin of the passes of
    ``_multiplier_kernel``).

    ``values``: ``(P + 1, P + 1, h + 1)`` float32 ``[Kz + h, Ky + h, Kx]``, continued across
    ``Kx = 0`` by Friedel mates (``f(-x, y, z) = f(x, -y, -z)``) and zero beyond the array;
    ``taps``: the ``2 r + 1`` values of the 1D kernel. Returns the convolution along x, then
    y, then z, of ``values``' shape and dtype, at every voxel (the sums the numba kernel
    computes where they are needed, to float32 rounding).
    """
    import torch

    reach = len(taps) // 2
    shape = values.shape
    mirror = values[:, :, 1:reach + 1].flip((0, 1, 2))  # Kx = -reach..-1
    padded = torch.cat([mirror, values, values.new_zeros((*shape[:2], reach))], dim=2)
    for axis in (2, 1, 0):
        if axis != 2:
            pad_shape = list(shape)
            pad_shape[axis] = reach
            padded = torch.cat([values.new_zeros(pad_shape), values, values.new_zeros(pad_shape)], dim=axis)
        values = values.new_zeros(shape)
        for t, tap in enumerate(taps):
            values.add_(padded.narrow(axis, t, shape[axis]), alpha=tap)
    return values


def _gridding_multiplier_torch(grid: torch.Tensor, iterations: int, floor: float,
                               taps: np.ndarray) -> tuple[torch.Tensor, float]:
    import torch

    half = (grid.shape[0] - 1) // 2
    device, work = grid.device, torch.float32
    inside = _TorchGrid.sphere(grid)
    scale = 1.0 / (_TorchGrid.mean_weight(grid) + 1e-300)
    weight = grid[:, :, :half + 1, 2] * scale
    zero = torch.zeros((), device=device, dtype=work)
    if iterations <= 0:
        return torch.where(inside, (weight / scale / (weight + floor)).to(work), zero), scale
    weight = weight.to(work)
    kernel = [float(tap) for tap in taps]
    sphere = inside.to(work)
    norm = torch.where(inside, _blur_torch(sphere, kernel), torch.ones((), device=device, dtype=work))
    multiplier = sphere
    for _ in range(iterations):
        density = _blur_torch(multiplier * weight, kernel) / norm
        multiplier = torch.where(inside, multiplier / torch.clamp(density, min=floor), zero)
    return multiplier * weight / scale, scale


# ---------------------------------------------------------------------------------------
# Grid -> map: weighting, inverse FFT, crop, mask and gridding correction
# ---------------------------------------------------------------------------------------


class _GridOperations(Protocol):
    """The steps of :func:`grid_to_map` that each kind of grid implements."""

    @staticmethod
    def divided_columns(grid: Any, multiplier: Any, scale: float, x_start: int, x_end: int) -> Any: ...

    @staticmethod
    def empty_complex(shape: tuple[int, ...], like: Any) -> Any: ...

    @staticmethod
    def ifft(values: Any, axis: int) -> Any: ...

    @staticmethod
    def irfft(values: Any, size: int, axis: int) -> Any: ...

    @staticmethod
    def mask_and_correct(volume: Any, radius: float, width: float, padded: int) -> Any: ...


class _NumbaGrid:
    """:func:`grid_to_map`'s steps on a numpy grid: numba kernels and scipy's FFT."""

    @staticmethod
    def mean_weight(grid: np.ndarray) -> float:
        """Mean of ``W`` over ``|K| < h``."""
        total, voxels = _sphere_weight_kernel(grid, (grid.shape[0] - 1) // 2)
        return float(total) / max(int(voxels), 1)

    @staticmethod
    def divided_columns(grid: np.ndarray, multiplier: np.ndarray, scale: float, x_start: int,
                        x_end: int) -> np.ndarray:
        """Columns ``x_start <= Kx < x_end`` of ``(-1)^(Kx+Ky+Kz) D M`` with ``M = scale
        multiplier / W`` (0 where ``W = 0``; :func:`gridding_multiplier`): ``(P, P,
        x_end - x_start)`` complex128 in FFT order along z and y, zero outside ``|K| < h``
        (the sign centres the inverse transform at voxel ``h``)."""
        padded = grid.shape[0] - 1
        columns = np.empty((padded, padded, x_end - x_start), dtype=np.complex128)
        _divide_kernel(grid, multiplier, padded // 2, scale, x_start, columns)
        return columns

    @staticmethod
    def empty_complex(shape: tuple[int, ...], like: np.ndarray) -> np.ndarray:
        return np.empty(shape, dtype=np.complex128)

    @staticmethod
    def ifft(values: np.ndarray, axis: int) -> np.ndarray:
        result: np.ndarray = scipy.fft.ifft(values, axis=axis, workers=fft_workers(), overwrite_x=True)
        return result

    @staticmethod
    def irfft(values: np.ndarray, size: int, axis: int) -> np.ndarray:
        result: np.ndarray = scipy.fft.irfft(values, n=size, axis=axis, workers=fft_workers())
        return result

    @staticmethod
    def mask_and_correct(volume: np.ndarray, radius: float, width: float, padded: int) -> np.ndarray:
        """RELION's ``softMaskOutsideMap`` then division by ``sinc^2(r / P)`` (in place)."""
        volume = np.ascontiguousarray(volume)
        _finish_kernel(volume, radius, width, float(padded))
        return volume


if numba is not None:
    from cryosieve.fourier import raised_cosine_value

    @numba.njit(parallel=True, cache=True)
    def _sphere_weight_kernel(grid, half):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
        # Sum of the weights over |K| < h, and the number of voxels there.
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
    def _divide_kernel(grid, multiplier, half, scale, x_start, spectrum):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
        # spectrum[Kz mod P, Ky mod P, Kx - x_start] = (-1)^(Kx+Ky+Kz) D(K) M(K) inside |K| < h,
        # else 0, with M = scale * multiplier / W (0 where W = 0).
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
                    weight = grid[iz, iy, ix, 2]
                    factor = scale * multiplier[iz, iy, ix] / weight if weight > 0 else 0.0
                    if (ix + iy + iz) % 2 != 0:
                        factor = -factor
                    spectrum[oz, oy, c] = complex(grid[iz, iy, ix, 0] * factor, grid[iz, iy, ix, 1] * factor)

    @numba.njit(parallel=True, cache=True)
    def _finish_kernel(volume, radius, width, padded):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
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
                    blend = 1.0 if r > outer else raised_cosine_value((outer - r) / width)
                    total += blend * volume[z, y, x]
                    weight_sum += blend
        background = total / weight_sum if weight_sum > 0 else 0.0
        for z in numba.prange(size):
            for y in range(size):
                for x in range(size):
                    r = math.sqrt((z - centre) ** 2 + (y - centre) ** 2 + (x - centre) ** 2)
                    value = volume[z, y, x]
                    if r >= radius and weight_sum > 0:
                        blend = 1.0 if r > outer else raised_cosine_value((outer - r) / width)
                        value = (1.0 - blend) * value + blend * background
                    argument = math.pi * r / padded
                    if argument > 0:
                        sinc = math.sin(argument) / argument
                        value /= sinc * sinc
                    volume[z, y, x] = value


class _TorchGrid:
    """:func:`grid_to_map`'s steps on a tensor grid (any device), same results as :class:`_NumbaGrid`."""

    @staticmethod
    def mean_weight(grid: torch.Tensor) -> float:
        """Mean of ``W`` over ``|K| < h``."""
        inside = _TorchGrid.sphere(grid)
        return float(grid[:, :, :inside.shape[2], 2][inside].sum()) / max(int(inside.sum()), 1)

    @staticmethod
    def sphere(grid: torch.Tensor) -> torch.Tensor:
        """``(P + 1, P + 1, h + 1)`` bool ``[Kz + h, Ky + h, Kx]`` on the grid's device: ``|K| < h``."""
        import torch

        padded = grid.shape[0] - 1
        half = padded // 2
        k = torch.arange(padded + 1, device=grid.device, dtype=torch.float64) - half
        kx = torch.arange(half + 1, device=grid.device, dtype=torch.float64)
        return (k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2) < half * half

    @staticmethod
    def divided_columns(grid: torch.Tensor, multiplier: torch.Tensor, scale: float, x_start: int,
                        x_end: int) -> torch.Tensor:
        import torch

        padded = grid.shape[0] - 1
        half = padded // 2
        device, real = grid.device, grid.dtype
        block = grid[:padded, :padded, x_start:x_end]
        k = torch.arange(padded, device=device, dtype=real) - half
        kx = torch.arange(x_start, x_end, device=device, dtype=real)
        radius2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2
        index = torch.arange(padded, device=device)
        parity = (index[:, None, None] + index[None, :, None]
                  + torch.arange(x_start, x_end, device=device)[None, None, :]) % 2
        sign = torch.where(parity == 0, 1.0, -1.0).to(real)
        weight = block[..., 2]
        factor = sign * (scale * multiplier[:padded, :padded, x_start:x_end].to(real))
        factor = torch.where(weight > 0, factor / torch.where(weight > 0, weight, 1.0), torch.zeros_like(factor))
        factor = torch.where(radius2 < half * half, factor, torch.zeros_like(factor))
        spectrum = torch.complex(block[..., 0] * factor, block[..., 1] * factor)
        result: torch.Tensor = torch.fft.ifftshift(spectrum, dim=(0, 1))
        return result

    @staticmethod
    def empty_complex(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.empty(shape, dtype=torch.complex128, device=like.device)

    @staticmethod
    def ifft(values: torch.Tensor, axis: int) -> torch.Tensor:
        import torch

        result: torch.Tensor = torch.fft.ifft(values, dim=axis)
        return result

    @staticmethod
    def irfft(values: torch.Tensor, size: int, axis: int) -> torch.Tensor:
        import torch

        result: torch.Tensor = torch.fft.irfft(values, n=size, dim=axis)
        return result

    @staticmethod
    def mask_and_correct(volume: torch.Tensor, radius: float, width: float, padded: int) -> torch.Tensor:
        import torch

        from cryosieve.projection import gridding_correction

        size = volume.shape[-1]
        axis = centred_coordinates(size, volume.device).to(volume.dtype)
        distance = torch.sqrt(axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2)
        outer = radius + width
        blend = raised_cosine((outer - distance) / width)
        blend = torch.where(distance < radius, torch.zeros_like(blend), blend)
        blend = torch.where(distance > outer, torch.ones_like(blend), blend)
        total = blend.sum()
        if float(total) > 0:
            volume = (1 - blend) * volume + blend * ((blend * volume).sum() / total)
        return volume / gridding_correction(size, padded, dtype=volume.dtype, device=volume.device)


def grid_to_map(grid: Grid, size: int, pad_factor: int, relative_regularisation: float | None = None,
                column_chunk: int = 16, gridding_iterations: int | None = None,
                workspace: list[np.ndarray] | None = None) -> Grid:
    """Weight the data, inverse FFT, crop, mask outside the sphere and gridding-correct.

    Parameters
    ----------
    grid:
        An accumulated grid (numpy or torch; Hermitian, symmetrised).
    size:
        Box ``n`` of the map.
    pad_factor:
        The grid's padding (``P = pad_factor * n``).
    relative_regularisation:
        ``rho`` of :func:`gridding_multiplier`: the floor of the smoothed density, or with
        no iterations ``lambda`` in ``D / (W + lambda)`` as a fraction of the mean weight
        over the sphere ``|K| < h`` (keeps voxels that no slice reached at zero and tames
        nearly empty ones); default :data:`RELATIVE_REGULARISATION`.
    gridding_iterations:
        Iterations of the gridding weight correction (:func:`gridding_multiplier`; 0 for
        the plain division ``D / (W + lambda)``); default :data:`GRIDDING_ITERATIONS`.
    workspace:
        Work arrays of :func:`gridding_multiplier` to reuse from map to map (a list, empty
        at first), or None.
    column_chunk:
        ``Kx`` columns divided and transformed along z at a time (bounds the memory to
        the grid plus a ``(n, P, h + 1)`` complex array).

    Raises :class:`~cryosieve.errors.CryoSieveInputError` when the grid is not one of
    ``P = pad_factor * size``.

    Returns
    -------
    ``(n, n, n)`` float64 map ``[z, y, x]`` centred at voxel ``n // 2``, of the grid's kind
    (numpy array, or tensor on the grid's device): the inverse transform of ``D M``
    (:func:`gridding_multiplier`), cropped to the central ``n`` voxels. Voxels outside the sphere of radius
    ``n / 2`` are blended into their mean (RELION's ``softMaskOutsideMap``, edge
    :data:`MASK_EDGE_WIDTH` voxels), then the map is divided by ``sinc^2(r / P)``, the
    transform of the trilinear kernel (RELION's ``griddingCorrect``).
    """
    if relative_regularisation is None:
        relative_regularisation = RELATIVE_REGULARISATION
    if gridding_iterations is None:
        gridding_iterations = GRIDDING_ITERATIONS
    operations: _GridOperations = _NumbaGrid if isinstance(grid, np.ndarray) else _TorchGrid
    padded = grid.shape[0] - 1
    half = padded // 2
    if padded != pad_factor * size:
        raise CryoSieveInputError(f"a grid of {padded} padded voxels is not for box {size} padded {pad_factor} times")
    multiplier, scale = gridding_multiplier(grid, gridding_iterations, relative_regularisation, workspace)
    start = half - size // 2
    # Inverse transform one axis at a time, keeping only the n central real-space planes
    # of each axis as soon as it is transformed.
    partial = operations.empty_complex((size, padded, half + 1), grid)
    for x_start in range(0, half + 1, column_chunk):
        x_end = min(half + 1, x_start + column_chunk)
        columns = operations.divided_columns(grid, multiplier, scale, x_start, x_end)
        partial[:, :, x_start:x_end] = operations.ifft(columns, 0)[start:start + size]
    partial = operations.ifft(partial, 1)[:, start:start + size]
    volume = operations.irfft(partial, padded, 2)[:, :, start:start + size]
    result: Grid = operations.mask_and_correct(volume, size / 2, MASK_EDGE_WIDTH, padded)
    return result


def finish_grid(grid: Grid, size: int, pad_factor: int, symmetry_rotations: np.ndarray,
                workspace: list[np.ndarray] | None = None) -> np.ndarray:
    """The map of an accumulated grid: Hermitian fill (in place), symmetrisation when the
    group has more than one ``(3, 3)`` matrix in ``symmetry_rotations`` ``(m, 3, 3)``, and
    :func:`grid_to_map` (``workspace`` as there). Returns a ``(n, n, n)`` float32 numpy map
    ``[z, y, x]``."""
    enforce_hermitian(grid)
    if symmetry_rotations.shape[0] > 1:
        grid = symmetrise_grid(grid, symmetry_rotations)
    volume = grid_to_map(grid, size, pad_factor, workspace=workspace)
    if isinstance(volume, np.ndarray):
        return volume.astype(np.float32)
    import torch

    return volume.to(torch.float32).cpu().numpy()
