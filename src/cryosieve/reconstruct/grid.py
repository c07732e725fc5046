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
regularisation (lambda)    ``_NumbaGrid.mean_weight``          ``_TorchGrid.mean_weight``
division ``D / (W + l)``   ``_NumbaGrid.divided_columns``      ``_TorchGrid.divided_columns``
mask, gridding correction  ``_NumbaGrid.mask_and_correct``     ``_TorchGrid.mask_and_correct``
=========================  ==================================  ==================================
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Protocol, Union

import numpy as np
import scipy.fft

from cryosieve.errors import CryoSieveInputError

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; keep the torch engine usable
    numba = None  # type: ignore[assignment]  # None marks numba as missing

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch

#: An accumulation grid of either engine (see the module's docstring).
Grid = Union[np.ndarray, "torch.Tensor"]

#: Regularisation of the division, relative to the mean weight inside the sphere.
RELATIVE_REGULARISATION = 1e-3
#: Width (voxels) of the raised-cosine edge of RELION's mask outside the box's sphere.
MASK_EDGE_WIDTH = 3.0


def grid_shape(box: int, pad_factor: int) -> tuple[int, int, int, int]:
    """``(P + 1, P + 1, P // 2 + 2, 3)`` with ``P = pad_factor * box``: the shape of a grid."""
    padded = pad_factor * box
    return padded + 1, padded + 1, padded // 2 + 2, 3


def fft_workers() -> int:
    """Threads for scipy's FFTs on the CPU (numba's thread count)."""
    return numba.get_num_threads() if numba is not None else 1


# ---------------------------------------------------------------------------------------
# Folding a point into the stored half and locating its trilinear neighbours
# ---------------------------------------------------------------------------------------

if numba is not None:
    from cryosieve._kernels import friedel_fold

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
# Grid -> map: division by the weight, inverse FFT, crop, mask and gridding correction
# ---------------------------------------------------------------------------------------


class _GridOperations(Protocol):
    """The steps of :func:`grid_to_map` that each kind of grid implements."""

    @staticmethod
    def mean_weight(grid: Any) -> float: ...

    @staticmethod
    def divided_columns(grid: Any, regularisation: float, x_start: int, x_end: int) -> Any: ...

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
    def divided_columns(grid: np.ndarray, regularisation: float, x_start: int, x_end: int) -> np.ndarray:
        """Columns ``x_start <= Kx < x_end`` of ``(-1)^(Kx+Ky+Kz) D / (W + lambda)``:
        ``(P, P, x_end - x_start)`` complex128 in FFT order along z and y, zero outside
        ``|K| < h`` (the sign centres the inverse transform at voxel ``h``)."""
        padded = grid.shape[0] - 1
        columns = np.empty((padded, padded, x_end - x_start), dtype=np.complex128)
        _divide_kernel(grid, padded // 2, regularisation, x_start, columns)
        return columns

    @staticmethod
    def empty_complex(shape: tuple[int, ...], like: np.ndarray) -> np.ndarray:
        return np.empty(shape, dtype=np.complex128)

    @staticmethod
    def ifft(values: np.ndarray, axis: int) -> np.ndarray:
        return scipy.fft.ifft(values, axis=axis, workers=fft_workers(), overwrite_x=True)

    @staticmethod
    def irfft(values: np.ndarray, size: int, axis: int) -> np.ndarray:
        return scipy.fft.irfft(values, n=size, axis=axis, workers=fft_workers())

    @staticmethod
    def mask_and_correct(volume: np.ndarray, radius: float, width: float, padded: int) -> np.ndarray:
        """RELION's ``softMaskOutsideMap`` then division by ``sinc^2(r / P)`` (in place)."""
        volume = np.ascontiguousarray(volume)
        _finish_kernel(volume, radius, width, float(padded))
        return volume


if numba is not None:

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
    def _divide_kernel(grid, half, regularisation, x_start, spectrum):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
        # spectrum[Kz mod P, Ky mod P, Kx - x_start] = (-1)^(Kx+Ky+Kz) D(K) / (W(K) + lambda)
        # inside |K| < h, else 0.
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


class _TorchGrid:
    """:func:`grid_to_map`'s steps on a tensor grid (any device), same results as :class:`_NumbaGrid`."""

    @staticmethod
    def mean_weight(grid: torch.Tensor) -> float:
        import torch

        half = (grid.shape[0] - 1) // 2
        device, real = grid.device, grid.dtype
        ky = (torch.arange(2 * half, device=device, dtype=real) - half)[:, None]
        kx = torch.arange(half + 1, device=device, dtype=real)[None, :]
        total, voxels = 0.0, 0
        for iz in range(2 * half):
            inside = (ky * ky + kx * kx + (iz - half) ** 2) < half * half
            total += float(grid[iz, :2 * half, :half + 1, 2][inside].sum())
            voxels += int(inside.sum())
        return total / max(voxels, 1)

    @staticmethod
    def divided_columns(grid: torch.Tensor, regularisation: float, x_start: int, x_end: int) -> torch.Tensor:
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
        factor = torch.where(parity == 0, 1.0, -1.0).to(real) / (block[..., 2] + regularisation)
        factor = torch.where(radius2 < half * half, factor, torch.zeros_like(factor))
        spectrum = torch.complex(block[..., 0] * factor, block[..., 1] * factor)
        return torch.fft.ifftshift(spectrum, dim=(0, 1))

    @staticmethod
    def empty_complex(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.empty(shape, dtype=torch.complex128, device=like.device)

    @staticmethod
    def ifft(values: torch.Tensor, axis: int) -> torch.Tensor:
        import torch

        return torch.fft.ifft(values, dim=axis)

    @staticmethod
    def irfft(values: torch.Tensor, size: int, axis: int) -> torch.Tensor:
        import torch

        return torch.fft.irfft(values, n=size, dim=axis)

    @staticmethod
    def mask_and_correct(volume: torch.Tensor, radius: float, width: float, padded: int) -> torch.Tensor:
        import torch

        from cryosieve.projection import gridding_correction

        size = volume.shape[-1]
        axis = torch.arange(size, device=volume.device, dtype=volume.dtype) - size // 2
        distance = torch.sqrt(axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2)
        outer = radius + width
        blend = 0.5 + 0.5 * torch.cos(math.pi * (outer - distance) / width)
        blend = torch.where(distance < radius, torch.zeros_like(blend), blend)
        blend = torch.where(distance > outer, torch.ones_like(blend), blend)
        total = blend.sum()
        if float(total) > 0:
            volume = (1 - blend) * volume + blend * ((blend * volume).sum() / total)
        return volume / gridding_correction(size, padded, dtype=volume.dtype, device=volume.device)


def grid_to_map(grid: Grid, size: int, pad_factor: int, relative_regularisation: float | None = None,
                column_chunk: int = 16) -> Grid:
    """Divide data by weight, inverse FFT, crop, mask outside the sphere and gridding-correct.

    Parameters
    ----------
    grid:
        An accumulated grid (numpy or torch; Hermitian, symmetrised).
    size:
        Box ``n`` of the map.
    pad_factor:
        The grid's padding (``P = pad_factor * n``).
    relative_regularisation:
        ``lambda`` in ``D / (W + lambda)`` as a fraction of the mean weight over the
        sphere ``|K| < h`` (keeps voxels that no slice reached at zero and tames
        nearly empty ones); default :data:`RELATIVE_REGULARISATION`.
    column_chunk:
        ``Kx`` columns divided and transformed along z at a time (bounds the memory to
        the grid plus a ``(n, P, h + 1)`` complex array).

    Raises :class:`~cryosieve.errors.CryoSieveInputError` when the grid is not one of
    ``P = pad_factor * size``.

    Returns
    -------
    ``(n, n, n)`` float64 map ``[z, y, x]`` centred at voxel ``n // 2``, of the grid's kind
    (numpy array, or tensor on the grid's device). Voxels outside the sphere of radius
    ``n / 2`` are blended into their mean (RELION's ``softMaskOutsideMap``, edge
    :data:`MASK_EDGE_WIDTH` voxels), then the map is divided by ``sinc^2(r / P)``, the
    transform of the trilinear kernel (RELION's ``griddingCorrect``).
    """
    if relative_regularisation is None:
        relative_regularisation = RELATIVE_REGULARISATION
    operations: _GridOperations = _NumbaGrid if isinstance(grid, np.ndarray) else _TorchGrid
    padded = grid.shape[0] - 1
    half = padded // 2
    if padded != pad_factor * size:
        raise CryoSieveInputError(f"a grid of {padded} padded voxels is not for box {size} padded {pad_factor} times")
    regularisation = relative_regularisation * operations.mean_weight(grid) + 1e-300
    start = half - size // 2
    # Inverse transform one axis at a time, keeping only the n central real-space planes
    # of each axis as soon as it is transformed.
    partial = operations.empty_complex((size, padded, half + 1), grid)
    for x_start in range(0, half + 1, column_chunk):
        x_end = min(half + 1, x_start + column_chunk)
        columns = operations.divided_columns(grid, regularisation, x_start, x_end)
        partial[:, :, x_start:x_end] = operations.ifft(columns, 0)[start:start + size]
    partial = operations.ifft(partial, 1)[:, start:start + size]
    volume = operations.irfft(partial, padded, 2)[:, :, start:start + size]
    return operations.mask_and_correct(volume, size / 2, MASK_EDGE_WIDTH, padded)


def finish_grid(grid: Grid, size: int, pad_factor: int, symmetry_rotations: np.ndarray) -> np.ndarray:
    """The map of an accumulated grid: Hermitian fill (in place), symmetrisation when the
    group has more than one ``(3, 3)`` matrix in ``symmetry_rotations`` ``(m, 3, 3)``, and
    :func:`grid_to_map`. Returns a ``(n, n, n)`` float32 numpy map ``[z, y, x]``."""
    enforce_hermitian(grid)
    if symmetry_rotations.shape[0] > 1:
        grid = symmetrise_grid(grid, symmetry_rotations)
    volume = grid_to_map(grid, size, pad_factor)
    if isinstance(volume, np.ndarray):
        return volume.astype(np.float32)
    import torch

    return volume.to(torch.float32).cpu().numpy()
