"""The sieving score of each particle.

``score = ||HP(CTF * P(V) - T(I))||^2 - ||HP(T(I))||^2`` (real-space squared norms),
where ``P`` projects the masked half map along the particle's pose, ``T`` shifts the
image by its origin, and ``HP`` removes frequencies below the cut-off.

Because ``|T(I)|`` is unchanged by a shift, Parseval's theorem turns the score into a
sum over the image's own Fourier samples inside the high-pass band::

    score = 1/N^2 * sum_k w_k [ C_k^2 |P_k|^2 - 2 C_k Re(P_k conj(J_k)) ]

with ``J = FT(T(I))`` and ``w_k`` the Friedel weight of the half-plane sample. Only one
forward FFT per image is needed and no inverse FFT; the projection ``P_k`` is sampled
directly at those frequencies (:class:`~cryosieve.projection.FourierSliceProjector`).
Frequencies at or beyond Nyquist (``|k| >= N/2``) carry no projection and contribute
exactly zero to the score, so they are skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from cryosieve import _kernels
from cryosieve.band import HighPass
from cryosieve.ctf import CtfParameters
from cryosieve.geometry import euler_to_matrix
from cryosieve.io.stack import BatchImages
from cryosieve.particles import ParticleSet
from cryosieve.precision import real_dtype, to_device
from cryosieve.projection import FourierSliceProjector


@dataclass
class ParticleBatch:
    """Per-particle parameters of a batch, as ``(b,)`` tensors on one device (float64, or float32 on a
    device without it: :func:`cryosieve.precision.real_dtype`)."""

    rot: torch.Tensor  # degrees
    tilt: torch.Tensor
    psi: torch.Tensor
    origin_x: torch.Tensor  # pixels
    origin_y: torch.Tensor
    defocus_u: torch.Tensor  # Å
    defocus_v: torch.Tensor
    defocus_angle: torch.Tensor  # degrees
    phase_shift: torch.Tensor  # degrees
    voltage: torch.Tensor  # kV
    spherical_aberration: torch.Tensor  # mm
    amplitude_contrast: torch.Tensor
    pixel_size: torch.Tensor  # Å
    highpass_cycles_per_pixel: torch.Tensor  # cut-off in cycles per pixel
    ctf_bfactor: torch.Tensor  # Å^2
    ctf_scalefactor: torch.Tensor
    #: The CTF terms worked out on the host from the table's float64 values (:meth:`from_table`), so that
    #: the per-batch loop on a GPU never copies its parameters back from the device; ``None``: from the tensors.
    ctf_terms: CtfParameters | None = None

    def ctf(self) -> CtfParameters:
        """The batch's CTF terms (:class:`cryosieve.ctf.CtfParameters`)."""
        if self.ctf_terms is not None:
            return self.ctf_terms
        return CtfParameters.from_values(self.defocus_u, self.defocus_v, self.defocus_angle, self.voltage,
                                         self.spherical_aberration, self.amplitude_contrast, self.phase_shift,
                                         self.ctf_bfactor, self.ctf_scalefactor)

    @classmethod
    def from_table(cls, table: ParticleSet, rows: np.ndarray, highpass_angstrom: float,
                   device: torch.device | str) -> ParticleBatch:
        """Gather rows of a :class:`~cryosieve.particles.ParticleSet`.

        ``highpass_angstrom`` is the cut-off ``F`` (Å); each particle's cut-off in cycles
        per pixel is its pixel size divided by ``F``.
        """
        def take(values: np.ndarray) -> torch.Tensor:
            return to_device(np.asarray(values, dtype=np.float64)[rows], device)

        pixel = take(table.pixel_size)
        return cls(
            rot=take(table.rot), tilt=take(table.tilt), psi=take(table.psi),
            origin_x=take(table.origin_x), origin_y=take(table.origin_y),
            defocus_u=take(table.defocus_u), defocus_v=take(table.defocus_v),
            defocus_angle=take(table.defocus_angle), phase_shift=take(table.phase_shift),
            voltage=take(table.voltage), spherical_aberration=take(table.spherical_aberration),
            amplitude_contrast=take(table.amplitude_contrast), pixel_size=pixel,
            highpass_cycles_per_pixel=HighPass(highpass_angstrom).cycles_per_pixel(pixel),
            ctf_bfactor=take(table.ctf_bfactor), ctf_scalefactor=take(table.ctf_scalefactor),
            ctf_terms=CtfParameters.from_table(table, rows),
        )


class BandSamples:
    """The half-plane Fourier samples of a ``box``-pixel image used by the scorer.

    Samples with ``lowest_cycles_per_pixel <= |k|/N < 1/2`` of the ``rfft2`` grid, as
    flat indices into a ``(box, box // 2 + 1)`` array, with their frequencies (cycles
    per box) and Friedel weights (1 on the ``kx = 0`` column, else 2), in the device's
    :func:`~cryosieve.precision.real_dtype`.
    """

    def __init__(self, box: int, lowest_cycles_per_pixel: float, device: torch.device | str) -> None:
        ky = torch.fft.fftfreq(box, d=1.0 / box, dtype=torch.float64)
        kx = torch.fft.rfftfreq(box, d=1.0 / box, dtype=torch.float64)
        grid_y, grid_x = torch.meshgrid(ky, kx, indexing="ij")
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
    """Band samples as blocks of :data:`cryosieve._kernels.BLOCK` consecutive ``rfft2`` columns.

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
        block = _kernels.BLOCK
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
        ky = np.fft.fftfreq(box, d=1.0 / box)[row]
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


#: The implementations of the Fourier scorer: ``numba`` (the fused CPU kernel), ``torch`` (batched
#: tensors on any device: the CUDA path, which runs on the CPU too), ``auto`` (numba on the CPU).
ENGINES = ("auto", "numba", "torch")


def fourier_scores(projector: FourierSliceProjector, images: torch.Tensor | BatchImages, batch: ParticleBatch,
                   samples: BandSamples, volume_pixel_size: float | None = None, engine: str = "auto"
                   ) -> torch.Tensor:
    """Scores of a batch with the Fourier-slice projector.

    Parameters
    ----------
    projector:
        Central-slice sampler of the (masked, optionally FSC-weighted) half map.
    images:
        ``(b, N, N)`` float32 particle images on the projector's device, or, for a projector
        on the CPU, a :class:`~cryosieve.io.stack.BatchImages` to read slice by slice.
    batch:
        Their parameters.
    samples:
        Band of Fourier samples for box ``N``, from the lowest cut-off in use.
    volume_pixel_size:
        Voxel size (Å) of the half map; particles of another pixel size are sampled
        at their own physical frequencies. ``None``: same as the particles.
    engine:
        One of :data:`ENGINES`.

    Returns
    -------
    ``(b,)`` scores (real-space squared-norm units): float64, summed in float64 from float32
    terms; on a device without float64 (:mod:`cryosieve.precision`), float32 sums.
    """
    scale = None
    if volume_pixel_size is not None:
        scale = volume_pixel_size / batch.pixel_size
    on_cpu = isinstance(images, BatchImages) or images.device.type == "cpu"
    if engine == "numba" or (engine == "auto" and on_cpu and _kernels.AVAILABLE):
        return _fourier_scores_cpu(projector, images, batch, samples, scale)
    if isinstance(images, BatchImages):
        images = torch.from_numpy(images.slice(0, len(images)).copy()).to(projector.device)
    box = images.shape[-1]
    data_dtype = torch.float32
    spectra = torch.fft.rfft2(images.to(data_dtype)).reshape(images.shape[0], -1)

    # T(I) and the move of the image centre (pixel N/2) to the origin, as one phase:
    # exp(-2 pi i (kx (ox - N/2) + ky (oy - N/2)) / N), separable in x and y.
    two_pi = 2 * math.pi / box
    real = real_dtype(images.device)
    freq_y = torch.fft.fftfreq(box, d=1.0 / box, dtype=real, device=images.device)
    freq_x = torch.fft.rfftfreq(box, d=1.0 / box, dtype=real, device=images.device)
    phase_x = torch.polar(torch.ones((), dtype=real, device=images.device),
                          -two_pi * freq_x[None, :] * (batch.origin_x[:, None] - box // 2))
    phase_y = torch.polar(torch.ones((), dtype=real, device=images.device),
                          -two_pi * freq_y[None, :] * (batch.origin_y[:, None] - box // 2))
    rotations = euler_to_matrix(batch.rot, batch.tilt, batch.psi)
    phase = (phase_x[:, samples.column] * phase_y[:, samples.row]).to(torch.complex64)
    observed = spectra[:, samples.flat_index] * phase  # (b, p)
    projected = projector.sample(rotations, samples.ky.to(data_dtype), samples.kx.to(data_dtype), scale)

    pixel = batch.pixel_size.to(data_dtype)[:, None]
    ctf = batch.ctf().evaluate(samples.kx.to(data_dtype) / (box * pixel), samples.ky.to(data_dtype) / (box * pixel))
    model = ctf * projected
    terms = model.real * (model.real - 2 * observed.real) + model.imag * (model.imag - 2 * observed.imag)
    inside = HighPass.inside(samples.radius_cycles_per_pixel[None, :], batch.highpass_cycles_per_pixel[:, None])
    weight = torch.where(inside, samples.weight[None, :], 0.0)
    return (terms.to(real) * weight).sum(dim=1) / (box * box)


#: Images transformed and scored together on the CPU: their spectra (66 kB each at box 128)
#: are still in the caches when the kernel reads them; 256 spectra at a time (17 MB) were
#: read back from memory (measured 2 ms of a 9.6 ms kernel call at box 128, 2 cores).
#: Scoring at box 128 on 2 cores, median of 4 to 5 runs: 8 images 25,300 particles/s,
#: 16 26,200, 32 25,200, 64 24,600.
CPU_CHUNK = 16


def _fourier_scores_cpu(projector: FourierSliceProjector, images: torch.Tensor | BatchImages, batch: ParticleBatch,
                        samples: BandSamples, scale: torch.Tensor | None) -> torch.Tensor:
    """The same score through the fused CPU kernel (see :mod:`cryosieve._kernels`), in chunks
    of :data:`CPU_CHUNK` images: a forward FFT, then the kernel while the spectra are in the
    caches. The kernel reads the projector's 8-corner layout where that fits in memory, else
    the grid itself."""
    def array(values: torch.Tensor | np.ndarray, dtype: npt.DTypeLike = np.float64) -> np.ndarray:
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().numpy()
        return np.ascontiguousarray(values, dtype=dtype)

    count, box = (len(images), images.box) if isinstance(images, BatchImages) else (images.shape[0], images.shape[-1])
    blocks = samples.blocks
    rot, tilt, psi = (array(angle) for angle in (batch.rot, batch.tilt, batch.psi))
    rotations = np.ascontiguousarray(euler_to_matrix(rot, tilt, psi))
    ctf = batch.ctf().in_cycles_per_box(box, array(batch.pixel_size))
    parameters = dict(
        rotations=rotations, scale=array(scale) if scale is not None else np.ones(count),
        origin_x=array(batch.origin_x), origin_y=array(batch.origin_y),
        **{("scale_ctf" if name == "scale" else name): values for name, values in ctf.items()},
        highpass2=HighPass.squared_cut_cycles_per_box(array(batch.highpass_cycles_per_pixel), box),
    )
    grid = torch.view_as_real(projector.grid).reshape(-1).numpy()
    corners = projector.corner_layout()
    corners = np.zeros(0, dtype=np.float32) if corners is None else corners.view(np.float32)
    if not isinstance(images, BatchImages):
        images = images.to(torch.float32)
    out = np.zeros(count, dtype=np.float64)
    width = box // 2 + 1
    for start in range(0, count, CPU_CHUNK):
        stop = min(start + CPU_CHUNK, count)
        chunk_images = (torch.from_numpy(images.slice(start, stop)) if isinstance(images, BatchImages)
                        else images[start:stop])
        spectra = torch.view_as_real(torch.fft.rfft2(chunk_images)).numpy().reshape(stop - start, box, 2 * width)
        if blocks.width > width:  # boxes narrower than a block: zero columns to read
            padded = np.zeros((stop - start, box, 2 * blocks.width), dtype=np.float32)
            padded[:, :, :2 * width] = spectra
            spectra = padded
        chunk = {name: values[start:stop] for name, values in parameters.items()}
        _kernels.fourier_scores_kernel(
            grid, corners, projector.shape[1], projector.shape[2], projector.padded_size // 2,
            float(projector.pad_factor), np.ascontiguousarray(spectra).reshape(stop - start, -1), blocks.width,
            blocks.row, blocks.column, blocks.ky, blocks.u2_cycles, blocks.cos2, blocks.sin2, blocks.weight,
            chunk["rotations"], chunk["scale"], chunk["origin_x"], chunk["origin_y"],
            chunk["defocus_average"], chunk["deviation_cos"], chunk["deviation_sin"], chunk["k1"], chunk["k2"],
            chunk["phase_constant"], chunk["envelope"], chunk["scale_ctf"], chunk["highpass2"], box, out[start:stop],
        )
    return torch.from_numpy(out)


def retained_count(count: int, retention_ratio: float) -> int:
    """How many of ``count`` particles to keep: ``round(retention_ratio * count)`` (Python's round, as published)."""
    return round(retention_ratio * count)


def select_lowest(scores: np.ndarray, groups: np.ndarray, retention_ratio: float, balance: bool = False
                  ) -> np.ndarray:
    """Keep, within each group, the ``round(R * n)`` lowest scores (ties: input order).

    With ``balance``, every group keeps the same number: the smallest ``round(R * n)``.
    ``scores``: ``(n,)``; ``groups``: ``(n,)`` half-set labels. Returns a ``(n,)`` bool mask.
    """
    kept = np.zeros(len(scores), dtype=bool)
    labels = np.unique(groups)
    counts = {group: retained_count(int(np.sum(groups == group)), retention_ratio) for group in labels}
    smallest = min(counts.values()) if counts else 0
    for group in labels:
        members = np.flatnonzero(groups == group)
        order = np.argsort(scores[members], kind="stable")
        kept[members[order[:smallest if balance else counts[group]]]] = True
    return kept
