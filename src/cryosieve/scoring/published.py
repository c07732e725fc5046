"""The published CryoSieve 1.3.3 scoring, reproduced as a named variant.

``cryosieve-core --projector realspace --reference_weighting none`` scores every particle
as CryoSieve 1.3.3 does (Zhu et al., Nat. Commun. 2023), so that users can reproduce the
selections they made with it. Everything is float64, on any torch device::

    score = ||HP(CTF * P(V) - T(I))||^2 - ||HP(T(I))||^2

with the squared norms taken over the real-space pixels of the box. The conventions of
the published program, step by step, and where they differ from RELION's or from this
package's own scorer (:mod:`cryosieve.scoring.fourier`):

Inputs
    The half map is the map times the mask, both read as float32 and multiplied in
    float64 (a float32 product moves scores by about 5e-9 relative). Images are
    float32 pixels taken to float64 as they are (no normalisation). Poses become unit
    quaternions (:func:`published_quaternions`); origins are ``rlnOriginX/Y`` (RELION
    3.0, pixels) or ``rlnOriginX/YAngst / rlnImagePixelSize`` (3.1+); defocus angle and
    phase shift in radians, Cs in Å (``mm * 1e7``), voltage in volts (``kV * 1e3``).

The half-plane grid, and its Nyquist row
    Every Fourier-space step acts on the ``rfft2`` half-plane of a ``box``-pixel image:
    ``box`` rows by ``box // 2 + 1`` columns, column ``c`` at frequency ``kx = c``
    (cycles per box). Row ``r`` is at ``ky = r`` for ``r <= box // 2`` and ``r - box``
    above. For an even box the Nyquist row ``r = box / 2`` is therefore taken as
    ``ky = +box/2``, where ``numpy.fft.fftfreq`` (and RELION's and this package's
    scorer) give ``-box/2`` (:func:`published_row_frequencies`). The sign matters in two
    places: the phase of the origin shift (``exp(-i pi oy)`` instead of ``exp(+i pi oy)``
    on that row) and the polar angle of the astigmatic CTF (``atan2(+box/2, kx)``).
    Read as ``-box/2`` (box 64, 2 Å pixels, 10 Å cut-off), scores move by up to 10 % and
    6 of 300 particles change sides of the selection.

Projection ``P`` (:func:`published_realspace_projection`)
    Not a central slice: every voxel ``(x, y, z)``, counted from voxel ``box // 2``, is
    rotated by the first two rows of the quaternion's matrix and its value is splatted
    bilinearly on the four pixels around ``(x', y') + box // 2``; contributions that fall
    outside the image are dropped. The map is not padded, not gridding-corrected and
    not filtered; the projection is not band-limited.

CTF (:func:`published_ctf`)
    ``CTF = -sqrt(1 - Q0^2) sin(chi) + Q0 cos(chi)`` with
    ``chi = pi lambda dz f^2 + pi/2 Cs lambda^3 f^4 - phase_shift``,
    ``dz = -(dU + dV + (dU - dV) cos(2 (alpha - angle))) / 2`` (negative for underfocus),
    ``f = hypot(kx, ky) / (box * pixel)`` in 1/Å, ``alpha = atan2(ky, kx)`` on the
    grid above, and ``lambda = 12.2643247 / sqrt(V (1 + 0.978466e-6 V))`` Å for ``V`` in
    volts (:func:`cryosieve.ctf.electron_wavelength`, RELION's formula). This equals RELION's CTF
    (:func:`cryosieve.ctf.ctf_2d`) except on the Nyquist row. No B-factor envelope and
    no ``rlnCtfScalefactor``. It multiplies the ``rfft2`` of the projection (origin at
    pixel 0, not at the box centre).

Origin shift ``T`` (:func:`published_translate`)
    The image's ``rfft2`` times ``exp(-2 pi i (ox kx + oy ky) / box)``, the shift by
    ``+origin`` that RELION's origin convention asks for, with ``ky`` on the grid above.

High-pass ``HP`` (:func:`published_highpass`)
    Samples with ``hypot(kx / box, ky / box) < F_pixel`` are set to zero, ``F_pixel =
    angpix / F`` in cycles per pixel: the cut-off sample itself is kept. The published
    upper limit (1 cycle per pixel) removes nothing from a 2D grid, and samples beyond
    Nyquist (the corners, up to ``sqrt(2)/2`` cycles per pixel) stay in the score,
    unlike in :mod:`cryosieve.scoring.fourier`. ``angpix`` is ``--angpix`` where given (the
    published program always needs it), else the particle's pixel size.

Back to real space (:func:`inverse_half_plane`)
    The origin shift (a sub-pixel ``ox``) and the astigmatic CTF leave the ``kx = 0``
    and ``kx = box/2`` columns without Hermitian symmetry, which a complex-to-real
    transform assumes. Such input is read as ``numpy.fft.irfft2`` reads it (inverse
    along ``y``, then the real parts of the ``kx = 0`` and ``kx = box/2`` terms), which
    equals the inverse of the Hermitian part of those two columns; here the columns are
    symmetrised first, so every FFT library gives that result. The published program
    hands the raw columns to cuFFT's 2D complex-to-real transform, which documents no
    result for them; reading the columns from their upper halves instead would move
    scores by up to 6 % on the same data.

Selection
    ``round(R * n)`` (Python's rounding) lowest scores of each half-set
    (:func:`cryosieve.selection.select_lowest`). Ties keep the first in input order; the
    published ``numpy.argsort`` breaks them in an unspecified order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cryosieve.batch import ParticleBatch
from cryosieve.ctf import electron_wavelength
from cryosieve.fsc import filter_by_shell, fsc_weight
from cryosieve.io.stack import BatchImages


def published_row_frequencies(box: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``ky`` (cycles per box) of each row of an ``rfft2`` half-plane, as the published kernels index it.

    Returns ``(box,)`` float64: ``r`` for ``r <= box // 2``, else ``r - box``. For an even box
    the Nyquist row is ``+box/2`` (``numpy.fft.fftfreq`` gives ``-box/2``).
    """
    rows = torch.arange(box, dtype=torch.float64, device=device)
    return torch.where(rows <= box // 2, rows, rows - box)


def published_half_plane(box: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(ky, kx)`` of the ``rfft2`` half-plane, cycles per box, each ``(box, box // 2 + 1)``
    float64: rows from :func:`published_row_frequencies`, columns ``0 .. box // 2``."""
    ky = published_row_frequencies(box, device)
    kx = torch.arange(box // 2 + 1, dtype=torch.float64, device=device)
    return ky[:, None].expand(box, box // 2 + 1), kx[None, :].expand(box, box // 2 + 1)


def published_quaternions(rot: np.ndarray, tilt: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """Unit quaternions ``(w, x, y, z)`` of RELION poses, as the published program forms them.

    ``rot``, ``tilt``, ``psi``: ``(n,)`` degrees. Returns ``(n, 4)`` float64. With ``a`` =
    rot, ``b`` = tilt, ``g`` = psi in radians: ``(cos((g + a)/2) cos(b/2), -sin((g - a)/2)
    sin(b/2), -cos((g - a)/2) sin(b/2), -sin((g + a)/2) cos(b/2))``; the rotation they
    describe is RELION's matrix (:func:`cryosieve.geometry.euler_to_matrix`).
    """
    first, theta, last = (np.radians(np.asarray(angle, dtype=np.float64)) for angle in (rot, tilt, psi))
    return np.stack([
        np.cos((last + first) / 2) * np.cos(theta / 2),
        -np.sin((last - first) / 2) * np.sin(theta / 2),
        -np.cos((last - first) / 2) * np.sin(theta / 2),
        -np.sin((last + first) / 2) * np.cos(theta / 2),
    ], axis=-1)


def published_projection_rows(quaternions: np.ndarray) -> np.ndarray:
    """First two rows of each quaternion's rotation matrix, formed as the published program forms them.

    ``quaternions``: ``(n, 4)`` ``(w, x, y, z)``. Returns ``(n, 2, 3)`` float64: image ``x'``
    and ``y'`` of a voxel ``(x, y, z)`` are ``rows @ (x, y, z)``.
    """
    w, x, y, z = np.asarray(quaternions, dtype=np.float64).T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], axis=-1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], axis=-1),
    ], axis=-2)


def published_realspace_projection(volume: torch.Tensor, rot: np.ndarray, tilt: np.ndarray,
                                   psi: np.ndarray) -> torch.Tensor:
    """The published real-space projector, in float64.

    Every voxel ``(x, y, z)`` (counted from voxel ``n // 2``) goes to image position
    ``(x', y') = rows @ (x, y, z) + n // 2`` (:func:`published_projection_rows`); its value is
    split bilinearly over the pixels ``floor(x') + {0, 1}``, ``floor(y') + {0, 1}``;
    contributions outside the ``n x n`` image are dropped.

    Parameters
    ----------
    volume:
        ``(n, n, n)`` map indexed ``[z, y, x]``, any real dtype (used as float64).
    rot, tilt, psi:
        ``(b,)`` Euler angles in degrees.

    Returns
    -------
    ``(b, n, n)`` float64 projections indexed ``[y, x]``, on the volume's device.
    """
    size = volume.shape[-1]
    device = volume.device
    values = volume.to(torch.float64).reshape(size, size, size)
    axis = torch.arange(size, device=device, dtype=torch.float64) - size // 2
    # Splat onto an image with a margin wide enough for every rotated voxel and its +1
    # neighbour, then crop: the same sums as dropping outside contributions, without masks.
    margin = math.ceil(size * math.sqrt(3) / 2) + 2
    wide = size + 2 * margin
    rows = published_projection_rows(published_quaternions(rot, tilt, psi))
    images = torch.empty((len(rows), size, size), dtype=torch.float64, device=device)
    for index, matrix in enumerate(rows.tolist()):
        # x' = r0 x + r1 y + r2 z + n // 2 over the [z, y, x] grid, by broadcasting
        image_x = ((matrix[0][0] * axis)[None, None, :] + (matrix[0][1] * axis)[None, :, None]
                   + (matrix[0][2] * axis)[:, None, None] + size // 2).reshape(-1)
        image_y = ((matrix[1][0] * axis)[None, None, :] + (matrix[1][1] * axis)[None, :, None]
                   + (matrix[1][2] * axis)[:, None, None] + size // 2).reshape(-1)
        floor_x, floor_y = torch.floor(image_x), torch.floor(image_y)
        fraction_x, fraction_y = image_x - floor_x, image_y - floor_y
        pixel = (floor_y.long() + margin) * wide + (floor_x.long() + margin)
        left, right = values.reshape(-1) * (1 - fraction_x), values.reshape(-1) * fraction_x
        splat = torch.zeros(wide * wide, dtype=torch.float64, device=device)
        for offset, contribution in ((0, left * (1 - fraction_y)), (1, right * (1 - fraction_y)),
                                     (wide, left * fraction_y), (wide + 1, right * fraction_y)):
            splat.index_add_(0, pixel + offset, contribution)
        images[index] = splat.reshape(wide, wide)[margin:margin + size, margin:margin + size]
    return images


@dataclass(frozen=True)
class PublishedParticles:
    """What the published program reads of ``b`` particles, as ``(b,)`` float64 tensors on one device:
    poses (degrees), origins (pixels), the CTF values as RELION gives them (defocus Å, angle and phase
    shift degrees, voltage kV, Cs mm, amplitude contrast), pixel size (Å) and the published cut-off
    (cycles per pixel, :func:`published_cutoff`)."""

    rot: torch.Tensor
    tilt: torch.Tensor
    psi: torch.Tensor
    origin_x: torch.Tensor
    origin_y: torch.Tensor
    defocus_u: torch.Tensor
    defocus_v: torch.Tensor
    defocus_angle: torch.Tensor
    phase_shift: torch.Tensor
    voltage: torch.Tensor
    spherical_aberration: torch.Tensor
    amplitude_contrast: torch.Tensor
    pixel_size: torch.Tensor
    highpass_cycles_per_pixel: torch.Tensor

    @classmethod
    def of(cls, batch: ParticleBatch, highpass_angstrom: float, device: torch.device | str) -> PublishedParticles:
        """The particles of ``batch`` at the cut-off ``highpass_angstrom`` (Å), with the table's ``--angpix``."""
        table, rows = batch.table, batch.rows

        def tensor(values: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.asarray(values, dtype=np.float64), device=device)

        columns = {name: tensor(getattr(table, name)[rows]) for name in (
            "defocus_u", "defocus_v", "defocus_angle", "phase_shift", "voltage", "spherical_aberration",
            "amplitude_contrast")}
        cutoff = published_cutoff(batch.pixel_size, highpass_angstrom, table.angpix)
        return cls(rot=tensor(batch.rot), tilt=tensor(batch.tilt), psi=tensor(batch.psi),
                   origin_x=tensor(batch.origin_x), origin_y=tensor(batch.origin_y),
                   pixel_size=tensor(batch.pixel_size), highpass_cycles_per_pixel=tensor(cutoff), **columns)


def published_ctf(box: int, batch: PublishedParticles) -> torch.Tensor:
    """The published CTF on the ``rfft2`` half-plane of a ``box``-pixel image.

    ``batch``: ``b`` particles (see the module docstring for the formula). Returns
    ``(b, box, box // 2 + 1)`` float64 on the batch's device; the Nyquist row is ``+box/2``.
    """
    ky, kx = published_half_plane(box, batch.pixel_size.device)
    pixel = batch.pixel_size[:, None, None]
    frequency = torch.hypot(kx / (pixel * box), ky / (pixel * box))  # 1/Å
    alpha = torch.atan2(ky, kx) - torch.deg2rad(batch.defocus_angle)[:, None, None]
    defocus_u, defocus_v = batch.defocus_u[:, None, None], batch.defocus_v[:, None, None]
    defocus = -(defocus_u + defocus_v + (defocus_u - defocus_v) * torch.cos(2 * alpha)) / 2
    wavelength = electron_wavelength(batch.voltage)[:, None, None]
    cs = (batch.spherical_aberration * 1e7)[:, None, None]  # Å
    chi = (math.pi * wavelength * defocus * frequency**2 + math.pi / 2 * cs * wavelength**3 * frequency**4
           - torch.deg2rad(batch.phase_shift)[:, None, None])
    amplitude = batch.amplitude_contrast[:, None, None]
    return -torch.sqrt(1 - amplitude**2) * torch.sin(chi) + amplitude * torch.cos(chi)


def inverse_half_plane(spectra: torch.Tensor, box: int) -> torch.Tensor:
    """Real ``box x box`` images of ``rfft2`` half-planes, reading non-Hermitian columns as NumPy does.

    ``spectra``: ``(..., box, box // 2 + 1)`` complex128. The ``kx = 0`` column (and, for an
    even box, the ``kx = box/2`` column) is replaced by its Hermitian part
    ``(S[ky] + conj(S[-ky])) / 2`` before the inverse transform; this is what
    ``numpy.fft.irfft2`` computes from the raw columns, made independent of the FFT
    library. Returns ``(..., box, box)`` float64.
    """
    mirror = (-torch.arange(box, device=spectra.device)) % box
    columns = [0] if box % 2 else [0, box // 2]
    spectra = spectra.clone()
    for column in columns:
        values = spectra[..., column]
        spectra[..., column] = (values + values[..., mirror].conj()) / 2
    result: torch.Tensor = torch.fft.irfftn(spectra, s=(box, box), dim=(-2, -1))
    return result


def published_translate(images: torch.Tensor, origin_x: torch.Tensor, origin_y: torch.Tensor) -> torch.Tensor:
    """Shift images by their origins in Fourier space, as published.

    ``images``: ``(b, n, n)`` float64; ``origin_x``, ``origin_y``: ``(b,)`` float64 pixels.
    The ``rfft2`` is multiplied by ``exp(-2 pi i (ox kx / n + oy ky / n))`` with the Nyquist
    row at ``+n/2``. Returns ``(b, n, n)`` float64.
    """
    box = images.shape[-1]
    ky, kx = published_half_plane(box, images.device)
    phase = -2 * math.pi * (origin_x[:, None, None] * kx / box + origin_y[:, None, None] * ky / box)
    spectra = torch.fft.rfftn(images, dim=(-2, -1)) * torch.polar(torch.ones_like(phase), phase)
    return inverse_half_plane(spectra, box)


def published_highpass(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Remove the samples below each image's cut-off, as published.

    ``images``: ``(b, n, n)`` float64; ``threshold``: ``(b,)`` cut-off in cycles per pixel.
    Samples with ``hypot(kx / n, ky / n) < threshold`` are zeroed. Returns ``(b, n, n)`` float64.
    """
    box = images.shape[-1]
    ky, kx = published_half_plane(box, images.device)
    frequency = torch.hypot(kx / box, ky / box)
    spectra = torch.fft.rfftn(images, dim=(-2, -1))
    spectra = torch.where(frequency[None] < threshold[:, None, None], 0.0, spectra)
    return inverse_half_plane(spectra, box)


def published_cutoff(pixel_size: np.ndarray, highpass_angstrom: float, angpix: float | None) -> np.ndarray:
    """Cut-off of each particle in cycles per pixel, as published: ``angpix / F``.

    ``pixel_size``: ``(n,)`` Å; ``angpix``: ``--angpix`` as given (the published program
    divides it by ``F`` for every particle), or ``None`` to use each particle's pixel size.
    Returns ``(n,)`` float64.
    """
    pixel = np.asarray(pixel_size, dtype=np.float64)
    return np.full(len(pixel), angpix / highpass_angstrom) if angpix is not None else pixel / highpass_angstrom


def published_scores(volume: torch.Tensor, images: torch.Tensor, batch: PublishedParticles) -> torch.Tensor:
    """Scores exactly as the published CryoSieve 1.3.3 computes them (float64, real space).

    Parameters
    ----------
    volume:
        ``(n, n, n)`` masked half map indexed ``[z, y, x]`` (float64 for an exact
        reproduction: the product of the float32 map and mask in float64).
    images:
        ``(b, n, n)`` particle images indexed ``[y, x]``, any real dtype (float32 as read).
    batch:
        Their parameters (:meth:`PublishedParticles.of`).

    Returns
    -------
    ``(b,)`` float64 scores: ``||HP(CTF * P - T(I))||^2 - ||HP(T(I))||^2`` over the pixels.
    """
    box = images.shape[-1]
    shifted = published_translate(images.to(torch.float64), batch.origin_x, batch.origin_y)
    projections = published_realspace_projection(volume, batch.rot.cpu().numpy(), batch.tilt.cpu().numpy(),
                                                 batch.psi.cpu().numpy()).to(images.device)
    model = inverse_half_plane(torch.fft.rfftn(projections, dim=(-2, -1)) * published_ctf(box, batch), box)
    difference = published_highpass(model - shifted, batch.highpass_cycles_per_pixel)
    shifted = published_highpass(shifted, batch.highpass_cycles_per_pixel)
    result: torch.Tensor = (torch.linalg.matrix_norm(difference) ** 2 - torch.linalg.matrix_norm(shifted) ** 2)
    return result


class PublishedScorer:
    """The published scorer (:func:`published_scores`) as a :class:`~cryosieve.scoring.base.Scorer`, at the
    cut-off ``highpass_angstrom`` (Å) on ``device`` (float64 throughout). ``reference_fsc``: the per-shell FSC
    to weight each reference by (:func:`cryosieve.fsc.fsc_weight`; the published program has none). The
    cut-off of each particle is the published one, from the set's ``--angpix`` (:func:`published_cutoff`)."""

    reads_on_demand = False

    def __init__(self, highpass_angstrom: float, device: torch.device, reference_fsc: np.ndarray | None = None
                 ) -> None:
        self.highpass_angstrom = highpass_angstrom
        self.device = torch.device(device)
        self.weight = torch.from_numpy(fsc_weight(reference_fsc)) if reference_fsc is not None else None
        self.volume: torch.Tensor | None = None

    def prepare(self, reference: np.ndarray) -> None:
        volume = torch.from_numpy(reference).to(device=self.device, dtype=torch.float64)
        self.volume = filter_by_shell(volume, self.weight.to(self.device)) if self.weight is not None else volume

    def release(self) -> None:
        self.volume = None

    def score(self, batch: ParticleBatch, images: torch.Tensor | BatchImages) -> torch.Tensor:
        assert self.volume is not None, "prepare() a reference first"
        if isinstance(images, BatchImages):
            images = torch.from_numpy(images.slice(0, len(images)).copy()).to(self.device)
        return published_scores(self.volume, images, PublishedParticles.of(batch, self.highpass_angstrom, self.device))
