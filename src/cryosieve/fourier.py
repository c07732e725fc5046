"""Fourier conventions, defined once for every consumer (scoring, reconstruction, refinement,
post-processing, masks, the simulator), on the CPU and on any torch device.

* Frequencies in **cycles per box** in FFT order (:func:`fft_frequencies`: ``0, 1, ..., -n/2, ...,
  -1``, the Nyquist row at ``-n/2`` as ``numpy.fft.fftfreq`` and RELION have it; the published
  CryoSieve's ``+n/2`` is a named variant in :mod:`cryosieve.scoring.published`), and the half
  plane or half volume of ``rfft2``/``rfftn`` (:func:`rfft_frequencies`, :func:`image_frequencies`,
  :func:`volume_frequencies`).
* Real-space coordinates relative to the centre voxel ``n // 2`` (:func:`centred_coordinates`).
* The **origin phase** that centres an image's transform at pixel ``n // 2`` and moves it by the
  particle's origin (:func:`origin_phases`): ``S(k) = FT(I)(k) exp(2 pi i k . (c - o) / n)``.
* The **raised-cosine edge** ``(1 + cos(pi t)) / 2`` of masks and filters (:func:`raised_cosine`; inside
  numba kernels :func:`raised_cosine_value`).
* **Whole-map transforms** (:func:`rfftn`, :func:`irfftn`): on the CPU through scipy's pocketfft,
  whose result does not depend on the number of threads (MKL's 3D transforms, which torch uses on
  the CPU, round differently with 1 and 2 threads, so a run in several processes would not give
  the scores of one process bit for bit); on other devices through ``torch.fft``.

Everything takes and returns numpy arrays unless a torch ``device`` (or tensor) is given, so the
CPU reconstruction stays free of torch.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import numpy as np

try:
    import numba as _NUMBA
except ImportError:  # pragma: no cover - numba is a dependency
    _NUMBA = None  # type: ignore[assignment]  # None marks numba as missing

if TYPE_CHECKING:
    import torch


def _tensor(values: np.ndarray, device: Any, dtype: Any = None) -> Any:
    """``values`` as a tensor on ``device``, of ``dtype`` (a torch dtype; ``None``: float64), cast on the host
    (so no float64 value reaches a device without float64, :mod:`cryosieve.precision`)."""
    import torch

    host = np.float32 if dtype == torch.float32 else np.float64
    return torch.from_numpy(np.ascontiguousarray(values, dtype=host)).to(device)


def fft_frequencies(size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Any:
    """``(size,)`` frequencies in cycles per box, FFT order (``numpy.fft.fftfreq(size, 1 / size)``): float64,
    or a tensor on ``device`` (of ``dtype``, float64 by default) when it is given."""
    values = np.fft.fftfreq(size, d=1.0 / size)
    return values if device is None else _tensor(values, device, dtype)


def rfft_frequencies(size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Any:
    """``(size // 2 + 1,)`` frequencies in cycles per box of the last axis of an ``rfft`` (as
    :func:`fft_frequencies`)."""
    values = np.fft.rfftfreq(size, d=1.0 / size)
    return values if device is None else _tensor(values, device, dtype)


def image_frequencies(box: int, device: torch.device | str | None = None) -> tuple[Any, Any]:
    """``(ky, kx)``: the frequencies (cycles per box, float64) of each sample of a ``box``-pixel image's
    ``rfft2``, each ``(box, box // 2 + 1)``; ``ky`` in FFT order."""
    ky, kx = np.meshgrid(np.fft.fftfreq(box, d=1.0 / box), np.fft.rfftfreq(box, d=1.0 / box), indexing="ij")
    if device is None:
        return ky, kx
    return _tensor(ky, device), _tensor(kx, device)


def volume_frequencies(size: int, device: torch.device | str | None = None) -> tuple[Any, Any, Any]:
    """``(kz, ky, kx)`` of a ``(size, size, size // 2 + 1)`` half transform, cycles per box, float64,
    broadcastable: ``(size, 1, 1)``, ``(1, size, 1)``, ``(1, 1, size // 2 + 1)``."""
    k = fft_frequencies(size, device)
    kx = rfft_frequencies(size, device)
    return k[:, None, None], k[None, :, None], kx[None, None, :]


def squared_radius(size: int, device: torch.device | str | None = None) -> Any:
    """``|k|^2`` (cycles per box, squared) of each voxel of a ``(size, size, size // 2 + 1)`` half
    transform, float64."""
    kz, ky, kx = volume_frequencies(size, device)
    return kz**2 + ky**2 + kx**2


def centred_coordinates(size: int, device: torch.device | str | None = None) -> Any:
    """``(size,)`` float64 voxel coordinates relative to the centre voxel ``size // 2``."""
    values = np.arange(size, dtype=np.float64) - size // 2
    return values if device is None else _tensor(values, device)


def origin_phases(box: int, origin_y: Any, origin_x: Any) -> tuple[Any, Any]:
    """The factors that centre an image's ``rfft2`` at pixel ``box // 2`` and shift it by its origin.

    ``S(k) = FT(I)(k) * exp(2 pi i k . (c - o) / n)`` with ``c = n // 2`` and ``o`` the origin
    (pixels, RELION's sign), split into a y and an x factor:
    ``S[i, r, c] = FT(I_i)[r, c] * phase_y[i, r] * phase_x[i, c]``.

    ``origin_y``, ``origin_x``: ``(b,)`` pixels, numpy arrays or tensors. Returns ``(b, box)`` and
    ``(b, box // 2 + 1)`` over the ``rfft2`` rows (FFT order) and columns: complex128 for arrays;
    for tensors, complex of their precision on their device.
    """
    centre = box // 2
    step = 2 * math.pi / box
    if isinstance(origin_y, np.ndarray) or not hasattr(origin_y, "device"):
        oy = np.asarray(origin_y, dtype=np.float64)
        ox = np.asarray(origin_x, dtype=np.float64)
        phase_y = np.exp(1j * step * fft_frequencies(box) * (centre - oy)[:, None])
        phase_x = np.exp(1j * step * rfft_frequencies(box) * (centre - ox)[:, None])
        return phase_y, phase_x
    import torch

    ky = fft_frequencies(box, origin_y.device, origin_y.dtype)
    kx = rfft_frequencies(box, origin_x.device, origin_x.dtype)
    one = torch.ones((), dtype=origin_y.dtype, device=origin_y.device)
    return (torch.polar(one, step * ky[None, :] * (centre - origin_y[:, None])),
            torch.polar(one, step * kx[None, :] * (centre - origin_x[:, None])))


def shift_phases(frequencies: Any, shifts: Any, box: int) -> np.ndarray:
    """``exp(-2 pi i k d / n)``: the factors that move an image by ``d`` pixels (``I(x - d)``, so that
    ``FT(I(x - d))(k) = FT(I)(k) exp(-2 pi i k d / n)``) along one axis.

    ``frequencies``: ``(m,)`` cycles per box; ``shifts``: pixels, any shape ``S``. Returns ``S + (m,)``
    complex128. :func:`origin_phases` is the same factor for ``d = n // 2 - o``; inside numba kernels
    :func:`shift_phase_value`.
    """
    angle = (-2 * math.pi / box) * np.asarray(frequencies, dtype=np.float64)
    phases: np.ndarray = np.exp(1j * (np.asarray(shifts, dtype=np.float64)[..., None] * angle))
    return phases


def raised_cosine(fraction: Any) -> Any:
    """``(1 + cos(pi t)) / 2`` of ``t`` in [0, 1] (1 at 0, 0 at 1): the soft edge of masks and filters.
    Arrays, tensors or numbers; ``t`` outside [0, 1] is the caller's to clamp."""
    if hasattr(fraction, "cos"):
        return 0.5 + 0.5 * (math.pi * fraction).cos()
    if isinstance(fraction, np.ndarray):
        return 0.5 + 0.5 * np.cos(math.pi * fraction)
    return 0.5 + 0.5 * math.cos(math.pi * fraction)


if _NUMBA is not None:

    @_NUMBA.njit(inline="always", cache=True)
    def raised_cosine_value(fraction):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
        """:func:`raised_cosine` of one number, inside numba kernels."""
        return 0.5 + 0.5 * math.cos(math.pi * fraction)

    @_NUMBA.njit(inline="always", cache=True)
    def shift_phase_value(frequency, shift, box):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
        """:func:`shift_phases` of one frequency (cycles per box) and one shift (pixels), inside numba kernels:
        ``(cos, sin)`` of ``-2 pi k d / n``."""
        angle = (-2.0 * math.pi / box) * frequency * shift
        return math.cos(angle), math.sin(angle)


def fft_workers() -> int:
    """Threads for scipy's FFTs on the CPU (numba's thread count where numba is installed)."""
    if _NUMBA is None:  # pragma: no cover - numba is a dependency
        return os.cpu_count() or 1
    return int(_NUMBA.get_num_threads())


def rfftn(volume: torch.Tensor, norm: str = "backward") -> torch.Tensor:
    """The half transform ``(n, n, n // 2 + 1)`` of a real ``(n, n, n)`` map tensor (``torch.fft.rfftn``
    over the last three axes), the same bits whatever the number of threads on the CPU."""
    import scipy.fft
    import torch

    if volume.device.type != "cpu":
        result: torch.Tensor = torch.fft.rfftn(volume, dim=(-3, -2, -1), norm=norm)
        return result
    return torch.from_numpy(scipy.fft.rfftn(volume.numpy(), axes=(-3, -2, -1), norm=norm, workers=fft_workers()))


def irfftn(spectrum: torch.Tensor, size: int, norm: str = "backward") -> torch.Tensor:
    """The real ``(size, size, size)`` map of a half transform (the inverse of :func:`rfftn`)."""
    import scipy.fft
    import torch

    shape = (size, size, size)
    if spectrum.device.type != "cpu":
        result: torch.Tensor = torch.fft.irfftn(spectrum, s=shape, dim=(-3, -2, -1), norm=norm)
        return result
    return torch.from_numpy(scipy.fft.irfftn(spectrum.numpy(), s=shape, axes=(-3, -2, -1), norm=norm,
                                             workers=fft_workers()))



def _fft_into(values: np.ndarray, axis: int, workers: int) -> None:
    """``values`` (a complex array or view) replaced by its FFT along ``axis``: in place where scipy can
    write over its input, else copied back."""
    import scipy.fft

    result = scipy.fft.fft(values, axis=axis, workers=workers, overwrite_x=True)
    if not np.may_share_memory(result, values):
        values[...] = result


def _centred_padded_rfftn_torch(volume: torch.Tensor, padded_size: int, pieces: tuple[tuple[slice, slice], ...],
                                out: torch.Tensor | None) -> torch.Tensor:
    """:func:`centred_padded_rfftn` through ``torch.fft`` on the volume's device: the padded grid, its
    whole transform, then the shift (``pieces``: the (source, target) ranges of each axis)."""
    import torch

    grid = torch.zeros((padded_size,) * 3, dtype=volume.dtype, device=volume.device)
    for source_z, target_z in pieces:
        for source_y, target_y in pieces:
            for source_x, target_x in pieces:
                grid[target_z, target_y, target_x] = volume[source_z, source_y, source_x]
    shifted: torch.Tensor = torch.fft.fftshift(torch.fft.rfftn(grid, dim=(-3, -2, -1)), dim=(0, 1))
    if out is None:
        return shifted
    out.copy_(shifted)
    return out


def centred_padded_rfftn(volume: torch.Tensor, padded_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The half transform of the real ``(n, n, n)`` map tensor zero-padded to ``(P, P, P)`` (``P =
    padded_size``, even) with its centre voxel ``n // 2`` at the array origin, with the zero frequency
    moved to ``[P/2, P/2, 0]`` (``fftshift`` along z and y): ``(P, P, P // 2 + 1)`` complex of the
    map's precision, written into ``out`` (a tensor of that shape, e.g. a view of a larger grid) or
    a new tensor. On the CPU through scipy's pocketfft (the same bits whatever the thread count),
    elsewhere ``torch.fft``.

    On the CPU no padded grid is made and no line of zeros is transformed: the real transform
    along x runs over the ``n^2`` rows that hold the map, the one along z over the columns of those
    y only, and the one along y, over the whole half volume, in place in ``out``. The shift to the
    centre costs nothing: each map value is multiplied by ``(-1)^(z + y)`` (its padded position), an
    exact sign change, and the transforms of the modulated map are the shifted transforms
    (``sum_j (-1)^j x_j w^(jk) = X_(k + P/2)``). At ``P = 2n``: 0.6 of the work of a whole 3D FFT.
    """
    import scipy.fft
    import torch

    size = volume.shape[-1]
    if volume.ndim != 3 or volume.shape != (size,) * 3 or padded_size < size or padded_size % 2:
        raise ValueError(f"centred_padded_rfftn needs a cubic map and an even padded size at least its size, got "
                         f"{tuple(volume.shape)} and {padded_size}")
    centre = size // 2
    lead = size - centre  # voxels centre..n-1 go to 0..lead-1, voxels 0..centre-1 to P-centre..P-1
    # (source, target) index ranges along an axis: the map's second half to the start, its first to the end
    pieces = ((slice(centre, size), slice(0, lead)), (slice(0, centre), slice(padded_size - centre, padded_size)))
    if volume.device.type != "cpu":
        return _centred_padded_rfftn_torch(volume, padded_size, pieces, out)
    data = volume.numpy()
    workers = fft_workers()
    # (-1)^(z + y) at the padded positions of the map's z and y, in the compact order of ``rows``
    positions = np.concatenate([np.arange(lead), np.arange(padded_size - centre, padded_size)])
    sign = np.where(positions % 2 == 0, 1, -1).astype(data.dtype)
    compact = ((slice(centre, size), slice(0, lead)), (slice(0, centre), slice(lead, size)))
    rows = np.zeros((size, size, padded_size), dtype=data.dtype)  # z and y compact, x padded
    for source_z, target_z in compact:
        for source_y, target_y in compact:
            for source_x, target_x in pieces:
                rows[target_z, target_y, target_x] = data[source_z, source_y, source_x]
    rows *= sign[:, None, None] * sign[None, :, None]
    along_x = scipy.fft.rfft(rows, axis=2, workers=workers)
    del rows
    width = along_x.shape[2]
    if out is None:
        out = torch.empty((padded_size, padded_size, width),
                          dtype=torch.complex64 if along_x.dtype == np.complex64 else torch.complex128)
    spectrum = out.numpy()
    if spectrum.shape != (padded_size, padded_size, width) or spectrum.dtype != along_x.dtype:
        raise ValueError(f"centred_padded_rfftn: out must be {(padded_size, padded_size, width)} {along_x.dtype}, "
                         f"got {spectrum.shape} {spectrum.dtype}")
    # the map's lines in FFT order along z and y; the transforms below shift them to P/2
    z_target = (pieces[0][1], pieces[1][1])
    y_target = z_target
    compact_ranges = (compact[0][1], compact[1][1])
    spectrum[lead:padded_size - centre] = 0
    for target_z, compact_z in zip(z_target, compact_ranges, strict=True):
        spectrum[target_z, lead:padded_size - centre] = 0
        for target_y, compact_y in zip(y_target, compact_ranges, strict=True):
            spectrum[target_z, target_y] = along_x[compact_z, compact_y]
    del along_x
    for target_y in y_target:  # along z over the y that hold the map, then along y: in place
        _fft_into(spectrum[:, target_y], 0, workers)
    _fft_into(spectrum, 1, workers)
    return out
