"""The Fourier scorer: the score in Fourier space, from central slices of the reference's transform.

``score = ||HP(CTF * P(V) - T(I))||^2 - ||HP(T(I))||^2`` (real-space squared norms). Because ``|T(I)|``
is unchanged by a shift, Parseval's theorem turns the score into a sum over the image's own Fourier
samples inside the high-pass band::

    score = 1/N^2 * sum_k w_k [ C_k^2 |P_k|^2 - 2 C_k Re(P_k conj(J_k)) ]

with ``J = FT(T(I))`` (the origin phase of :func:`cryosieve.fourier.origin_phases`) and ``w_k`` the
Friedel weight of the half-plane sample. Only one forward FFT per image is needed and no inverse FFT;
the projection ``P_k`` is sampled directly at those frequencies
(:class:`~cryosieve.projection.FourierSliceProjector`). Frequencies at or beyond Nyquist
(``|k| >= N/2``) carry no projection and contribute exactly zero, so they are skipped.

Two implementations of the same sum, chosen once when the scorer is made (``engine``):

* the fused numba kernel (:mod:`cryosieve.scoring.kernels`, the CPU: 10-30x faster there), reading the
  images slice by slice as it transforms them;
* batched tensors (any device: the CUDA path; ``engine="torch"`` runs it on the CPU too).
"""

from __future__ import annotations

import numpy as np
import torch

from cryosieve.band import HighPass
from cryosieve.batch import ParticleBatch
from cryosieve.fourier import origin_phases
from cryosieve.fsc import fsc_weight
from cryosieve.io.stack import BatchImages
from cryosieve.precision import map_device, real_dtype, to_device
from cryosieve.projection import FourierSliceProjector
from cryosieve.scoring import kernels
from cryosieve.scoring.base import uses_kernel
from cryosieve.scoring.samples import BandSamples

#: Images transformed and scored together on the CPU: their spectra (66 kB each at box 128)
#: are still in the caches when the kernel reads them; 256 spectra at a time (17 MB) were
#: read back from memory (measured 2 ms of a 9.6 ms kernel call at box 128, 2 cores).
#: Scoring at box 128 on 2 cores, median of 4 to 5 runs: 8 images 25,300 particles/s,
#: 16 26,200, 32 25,200, 64 24,600.
CPU_CHUNK = 16


class FourierScorer:
    """The Fourier scorer of ``box``-pixel images at the cut-off ``highpass_angstrom`` (Å) on ``device``.

    ``lowest_pixel_size``: the particles' smallest pixel size (Å), which sets the widest band;
    ``engine``: see the module docstring; ``volume_pixel_size``: the references' voxel size (Å;
    particles of another pixel size are sampled at their own physical frequencies; ``None``: the
    particles'); ``reference_fsc``: ``(n // 2 + 1,)`` per-shell FSC to weight each reference by
    (:func:`cryosieve.fsc.fsc_weight`), or ``None``.
    """

    def __init__(self, box: int, highpass_angstrom: float, lowest_pixel_size: float, device: torch.device,
                 engine: str = "auto", volume_pixel_size: float | None = None,
                 reference_fsc: np.ndarray | None = None) -> None:
        self.device = torch.device(device)
        self.highpass = HighPass(highpass_angstrom)
        self.samples = BandSamples(box, float(self.highpass.cycles_per_pixel(lowest_pixel_size)), self.device)
        self.weight = torch.from_numpy(fsc_weight(reference_fsc)) if reference_fsc is not None else None
        self.volume_pixel_size = volume_pixel_size
        self.kernel = uses_kernel(engine, self.device)
        self.reads_on_demand = self.kernel
        self.projector: FourierSliceProjector | None = None
        self.corners: np.ndarray | None = None

    def prepare(self, reference: np.ndarray) -> None:
        """Build the central-slice sampler of ``reference`` ``(n, n, n)`` (on the CPU for a device without
        float64, :func:`cryosieve.precision.map_device`; the grid is complex64 everywhere)."""
        self.projector = None  # the previous reference's grid goes before the next is built
        self.projector = FourierSliceProjector(torch.from_numpy(reference).to(map_device(self.device)),
                                               spectrum_weight=self.weight).to(self.device)
        if self.kernel:  # the previous reference's layout, if any, is overwritten in place
            self.corners = corner_layout(self.projector, self.corners)
        else:
            self.corners = None

    def release(self) -> None:
        self.projector = None
        self.corners = None

    def score(self, batch: ParticleBatch, images: torch.Tensor | BatchImages) -> torch.Tensor:
        """``(b,)`` scores (real-space squared-norm units): float64, summed in float64 from float32 terms;
        on a device without float64 (:mod:`cryosieve.precision`), float32 sums. ``images``: ``(b, N, N)``
        float32 on the scorer's device, or (the kernel) a :class:`~cryosieve.io.stack.BatchImages` to read
        slice by slice."""
        assert self.projector is not None, "prepare() a reference first"
        scale = None if self.volume_pixel_size is None else self.volume_pixel_size / batch.pixel_size
        cut = np.asarray(self.highpass.cycles_per_pixel(batch.pixel_size), dtype=np.float64)
        if self.kernel:
            return _kernel_scores(self.projector, self.corners, images, batch, self.samples, scale, cut)
        if isinstance(images, BatchImages):
            images = torch.from_numpy(images.slice(0, len(images)).copy()).to(self.device)
        return _tensor_scores(self.projector, images, batch, self.samples, scale, cut)


def _tensor_scores(projector: FourierSliceProjector, images: torch.Tensor, batch: ParticleBatch,
                   samples: BandSamples, scale: np.ndarray | None, cut: np.ndarray) -> torch.Tensor:
    """The score as batched tensors on the images' device (float32 data, sums in :func:`real_dtype`)."""
    device = images.device
    box = images.shape[-1]
    data_dtype = torch.float32
    real = real_dtype(device)
    spectra = torch.fft.rfft2(images.to(data_dtype)).reshape(images.shape[0], -1)
    phase_y, phase_x = origin_phases(box, batch.on("origin_y", device), batch.on("origin_x", device))
    phase = (phase_x[:, samples.column] * phase_y[:, samples.row]).to(torch.complex64)
    observed = spectra[:, samples.flat_index] * phase  # (b, p)
    factor = None if scale is None else to_device(np.asarray(scale, dtype=np.float64), device)
    projected = projector.sample(batch.on("rotations", device), samples.ky.to(data_dtype), samples.kx.to(data_dtype),
                                 factor)
    pixel = batch.on("pixel_size", device).to(data_dtype)[:, None]
    ctf = batch.ctf.evaluate(samples.kx.to(data_dtype) / (box * pixel), samples.ky.to(data_dtype) / (box * pixel))
    model = ctf * projected
    terms = model.real * (model.real - 2 * observed.real) + model.imag * (model.imag - 2 * observed.imag)
    cut_tensor = to_device(cut, device)
    inside = HighPass.inside(samples.radius_cycles_per_pixel[None, :], cut_tensor[:, None])
    weight = torch.where(inside, samples.weight[None, :], 0.0)
    result: torch.Tensor = (terms.to(real) * weight).sum(dim=1) / (box * box)
    return result


def corner_layout(projector: FourierSliceProjector, reuse: np.ndarray | None = None) -> np.ndarray | None:
    """The projector's grid in the CPU kernel's 8-corner layout (:func:`cryosieve.scoring.kernels.corner_layout`).

    ``None`` where the kernel cannot use it: a grid not complex64 on the CPU, or a layout too large
    for the memory (:func:`cryosieve.scoring.kernels.corner_layout_allowed`: 4.3 GB at box 256 needs
    17 GB available), for which the kernel reads the grid itself. ``reuse``: an earlier layout of the
    same size to overwrite, or ``None``.
    """
    if not kernels.AVAILABLE or projector.device.type != "cpu" or projector.grid.dtype != torch.complex64:
        return None
    voxels = (projector.shape[0] - 1) * (projector.shape[1] - 1) * (projector.shape[2] - 1)
    if not kernels.corner_layout_allowed(voxels * 8 * 8):
        return None
    return kernels.corner_layout(projector.grid.reshape(projector.shape).numpy(), reuse)


def _kernel_scores(projector: FourierSliceProjector, corners: np.ndarray | None, images: torch.Tensor | BatchImages,
                   batch: ParticleBatch, samples: BandSamples, scale: np.ndarray | None, cut: np.ndarray
                   ) -> torch.Tensor:
    """The same score through the fused CPU kernel (:mod:`cryosieve.scoring.kernels`), in chunks of
    :data:`CPU_CHUNK` images: a forward FFT, then the kernel while the spectra are in the caches. The
    kernel reads the 8-corner layout ``corners`` (:func:`corner_layout`) where there is one, else the
    grid itself."""
    count, box = (len(images), images.box) if isinstance(images, BatchImages) else (images.shape[0], images.shape[-1])
    blocks = samples.blocks
    width = box // 2 + 1
    phase_y, phase_x = origin_phases(box, batch.origin_y, batch.origin_x)  # (b, box), (b, width) complex128
    columns = np.zeros((count, blocks.width), dtype=np.complex128)  # zero columns beyond width to read
    columns[:, :width] = phase_x

    y_real, y_imag, x_real, x_imag = (np.ascontiguousarray(part, dtype=np.float32) for part in
                                      (phase_y.real, phase_y.imag, columns.real, columns.imag))
    parameters: dict[str, np.ndarray] = {
        "rotations": batch.rotations, "scale": np.ones(count) if scale is None else np.ascontiguousarray(scale),
        "ctf": batch.ctf.kernel_terms(box, batch.pixel_size),
        "highpass2": HighPass.squared_cut_cycles_per_box(cut, box),
    }
    grid = torch.view_as_real(projector.grid).reshape(-1).numpy()
    corner_values = np.zeros(0, dtype=np.float32) if corners is None else corners.view(np.float32)
    if not isinstance(images, BatchImages):
        images = images.to(torch.float32)
    out = np.zeros(count, dtype=np.float64)
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
        kernels.fourier_scores_kernel(
            grid, corner_values, projector.shape[1], projector.shape[2], projector.padded_size // 2,
            float(projector.pad_factor), np.ascontiguousarray(spectra).reshape(stop - start, -1), blocks.width,
            blocks.row, blocks.column, blocks.ky, blocks.u2_cycles, blocks.cos2, blocks.sin2, blocks.weight,
            chunk["rotations"], chunk["scale"], y_real[start:stop], y_imag[start:stop], x_real[start:stop],
            x_imag[start:stop], chunk["ctf"], chunk["highpass2"], box, out[start:stop],
        )
    return torch.from_numpy(out)
