"""Known-truth particle data sets: maps from atomic models, simulated particle stacks.

The simulator writes a RELION 3.1 particle STAR file and one MRC stack whose images
follow RELION's own image formation (the convention checked against
``relion_project --ctf``): for a particle with rotation ``A``, origin ``(ox, oy)``
pixels, CTF ``C`` and envelope B-factor ``B``,

``FT(I)(k) = C(k) exp(-B |s|^2 / 4) Vhat(A^T k) (-1)^(kx+ky) exp(+2 pi i (kx ox + ky oy) / N)``

for ``|k| < N/2`` (zero beyond), with ``k`` in cycles per box, ``s = k / (N pixel)`` in
1/Å and ``Vhat`` the 3D DFT of the volume centred at voxel ``N // 2``; i.e. the image
is the CTF-modulated projection shifted by ``-origin``, exactly what RELION's origin
convention undoes.

Particle quality, the quantity a sieve must find, is the per-particle envelope
B-factor; it is written to ``truth.csv`` only, never to the STAR file. A fraction of
the particles ("junk") are projections of a second, different model whose STAR rows
look like any other particle. White Gaussian noise is added at a chosen signal-to-noise
ratio, defined as the variance of the noiseless images of the main model's particles
(all pixels of the whole box, pooled over those particles) divided by the noise
variance.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gemmi
import mrcfile
import numpy as np
import pandas as pd
import torch

from cryosieve.ctf import ctf_2d
from cryosieve.errors import CryoSieveInputError
from cryosieve.io.atomic import OutputGroup, remove_stale_temporaries_of
from cryosieve.io.paths import InputFile, check_outputs
from cryosieve.geometry import euler_to_matrix, uniform_random_euler
from cryosieve.projection import FourierSliceProjector, half_plane_frequencies

DEFAULT_MODEL = "1BD2.pdb.gz"
DEFAULT_JUNK_MODEL = "4E43.pdb.gz"
STACK_NAME = "particles.mrcs"
STAR_NAME = "particles.star"

# Grid spacing (Å) at or below which the model density is first sampled, before it is
# Fourier-cropped to the requested voxel size (so the map is band-limited, not aliased).
_FINE_SPACING = 1.0


def bundled_model(name: str) -> str:
    """Path of an atomic model shipped in ``cryosieve/data`` (e.g. ``"1BD2.pdb.gz"``)."""
    return str(importlib.resources.files("cryosieve") / "data" / name)


# --------------------------------------------------------------------------- maps


def _read_model(model_path: str) -> gemmi.Structure:
    if not os.path.isfile(model_path):
        raise CryoSieveInputError(f"{model_path}: atomic model file not found")
    try:
        structure = gemmi.read_structure(model_path)
    except Exception as error:  # gemmi raises RuntimeError/ValueError for bad files
        raise CryoSieveInputError(f"{model_path}: not a readable PDB or mmCIF model ({error})") from None
    if len(structure) == 0:
        raise CryoSieveInputError(f"{model_path}: the file holds no model")
    for index in range(len(structure) - 1, 0, -1):  # keep the first model only
        del structure[index]
    structure.setup_entities()
    structure.remove_ligands_and_waters()
    structure.remove_hydrogens()
    structure.remove_empty_chains()
    if structure[0].count_atom_sites() == 0:
        raise CryoSieveInputError(f"{model_path}: no polymer atoms left after removing waters, "
                                  "ligands and hydrogens")
    return structure


def _atom_arrays(model: gemmi.Model) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions ``(a, 3)`` Å, masses ``(a,)`` Dalton (times occupancy), B-factors ``(a,)`` Å^2."""
    positions, masses, bfactors = [], [], []
    for chain in model:
        for residue in chain:
            for atom in residue:
                positions.append(atom.pos.tolist())
                masses.append(atom.element.weight * atom.occ)
                bfactors.append(atom.b_iso)
    return np.asarray(positions), np.asarray(masses), np.asarray(bfactors)


def atomic_model_map(model_path: str | None, box: int, voxel_size: float, *,
                     resolution: float | None = None) -> np.ndarray:
    """Electron-scattering density of an atomic model, centred in a cubic box.

    Waters, ligands and hydrogens are removed (first model only); the model's centre of
    mass is moved to voxel ``box // 2`` along each axis. The density (gemmi's
    ``DensityCalculatorE``: electron scattering factors and the atoms' B-factors) is
    first sampled on a grid of spacing <= 1 Å with a blur that makes that sampling
    alias-free, then Fourier-cropped to ``box`` voxels and un-blurred, so the result is
    the model's density band-limited to the box's Nyquist frequency (no aliasing).

    Parameters
    ----------
    model_path:
        PDB or mmCIF file (gzip allowed); ``None``: the bundled ``1BD2.pdb.gz``.
    box:
        Box size in voxels.
    voxel_size:
        Å per voxel.
    resolution:
        Optional low-pass (Å): Fourier components beyond ``1/resolution`` are removed
        with a raised-cosine edge one Fourier shell wide. ``None``: Nyquist only.

    Returns
    -------
    ``(box, box, box)`` float32 map indexed ``[z, y, x]``.

    Raises
    ------
    CryoSieveInputError
        Unreadable or empty model, bad size, or a model that does not fit in the box
        (an atom within one voxel of a face when centred).
    """
    if box < 2:
        raise CryoSieveInputError(f"box {box}: must be at least 2 voxels")
    if not voxel_size > 0:
        raise CryoSieveInputError(f"voxel size {voxel_size}: must be positive")
    if resolution is not None and not resolution >= 2 * voxel_size:
        raise CryoSieveInputError(
            f"resolution {resolution}: must be at least Nyquist, 2 x voxel size = {2 * voxel_size} Å")
    model_path = bundled_model(DEFAULT_MODEL) if model_path is None else str(model_path)
    structure = _read_model(model_path)
    positions, masses, bfactors = _atom_arrays(structure[0])
    centre_of_mass = (positions * masses[:, None]).sum(axis=0) / masses.sum()
    centre = (box // 2) * voxel_size
    relative = positions - centre_of_mass
    limit = (box / 2 - 1) * voxel_size  # one voxel inside the periodic boundary
    if np.abs(relative).max() > limit:
        extent = np.abs(relative).max()
        raise CryoSieveInputError(
            f"{model_path}: the model reaches {extent:.1f} Å from its centre of mass and does not fit "
            f"in a box of {box} x {voxel_size} Å = {box * voxel_size:.1f} Å")
    shift = gemmi.Position(*(centre - centre_of_mass))
    for chain in structure[0]:
        for residue in chain:
            for atom in residue:
                atom.pos = atom.pos + shift

    factor = max(2, math.ceil(voxel_size / _FINE_SPACING - 1e-9))
    fine_size = box * factor
    fine_spacing = voxel_size / factor
    length = box * voxel_size
    structure.cell = gemmi.UnitCell(length, length, length, 90, 90, 90)
    structure.spacegroup_hm = "P 1"
    calculator = gemmi.DensityCalculatorE()
    calculator.d_min = 2 * fine_spacing
    # gemmi's "refmac-compatible" blur: total B >= 8 pi^2 / 1.1 * spacing^2 samples the
    # Gaussians accurately; it is undone in Fourier space below.
    calculator.blur = max(8 * math.pi**2 / 1.1 * fine_spacing**2 - float(bfactors.min()), 0.0)
    calculator.set_grid_cell_and_spacegroup(structure)
    calculator.grid.set_size(fine_size, fine_size, fine_size)
    calculator.grid.fill(0.0)
    calculator.add_model_density_to_grid(structure[0])
    fine = torch.from_numpy(np.array(calculator.grid, copy=True, dtype=np.float32))  # [x, y, z]
    spectrum = torch.fft.rfftn(fine, dim=(0, 1, 2))
    del fine
    half = box // 2
    rows = torch.cat([torch.arange(0, box - half), torch.arange(fine_size - half, fine_size)])
    cropped = spectrum[rows][:, rows][:, :, : half + 1]
    del spectrum
    k = torch.fft.fftfreq(box, d=1.0 / box, dtype=torch.float64)
    kz = torch.arange(half + 1, dtype=torch.float64)
    radius = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kz[None, None, :] ** 2)
    s2 = (radius / length) ** 2  # (1/Å)^2
    weight = torch.exp(calculator.blur * s2 / 4) / factor**3
    if box % 2 == 0:  # drop the unpaired Nyquist planes so the map is exactly band-limited
        weight[half] = 0.0
        weight[:, half] = 0.0
        weight[:, :, half] = 0.0
    if resolution is not None:
        cutoff = length / resolution  # cycles per box
        edge = torch.clamp(radius - (cutoff - 1.0), 0.0, 1.0)
        weight = weight * (0.5 + 0.5 * torch.cos(math.pi * edge))
    volume = torch.fft.irfftn(cropped * weight.to(torch.complex64), s=(box, box, box), dim=(0, 1, 2))
    return np.ascontiguousarray(volume.numpy().transpose(2, 1, 0), dtype=np.float32)


def _distance_outside(inside: torch.Tensor, reach: int) -> torch.Tensor:
    """Euclidean distance (voxels) from each voxel to the nearest ``inside`` voxel.

    Exact for distances up to ``reach`` voxels (separable minimum-convolution with
    ``(i - j)^2`` over a window of ``reach`` voxels per axis); larger distances come out
    as ``> reach``. ``inside``: ``(n, n, n)`` bool. Returns float32 of the same shape.
    """
    big = float(3 * (reach + 1) ** 2 + 1)
    squared = torch.where(inside, 0.0, big).to(torch.float32)
    for axis in range(3):
        moved = squared.movedim(axis, 0)
        size = moved.shape[0]
        padded = torch.nn.functional.pad(moved.movedim(0, -1), (reach, reach), value=big).movedim(-1, 0)
        best = moved.clone()
        for offset in range(1, reach + 1):
            penalty = float(offset * offset)
            best = torch.minimum(best, padded[reach + offset: reach + offset + size] + penalty)
            best = torch.minimum(best, padded[reach - offset: reach - offset + size] + penalty)
        squared = best.movedim(0, axis)
    return squared.sqrt()


def soft_mask(volume: np.ndarray, voxel_size: float, threshold: float | None = None,
              extend_angstrom: float = 4.0, soft_edge_angstrom: float = 8.0,
              lowpass_angstrom: float = 10.0) -> np.ndarray:
    """A soft-edged mask around the density of a map (as ``relion_mask_create``).

    The map is low-pass filtered (Gaussian falling to ``exp(-1/2)`` at
    ``1/lowpass_angstrom``) so the binary region has no holes between atoms, binarised
    at ``threshold``, dilated by ``extend_angstrom`` and given a raised-cosine edge of
    width ``soft_edge_angstrom``: 1 within ``extend`` of the region, ``0.5 + 0.5
    cos(pi (d - extend) / edge)`` at distance ``d`` up to ``extend + edge``, 0 beyond.

    Parameters
    ----------
    volume:
        ``(n, n, n)`` map ``[z, y, x]``.
    voxel_size:
        Å per voxel.
    threshold:
        Binarisation level of the low-passed map; ``None``: 10 % of its maximum.

    Returns
    -------
    ``(n, n, n)`` float32 values in [0, 1].
    """
    data = torch.as_tensor(np.asarray(volume, dtype=np.float32))
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise CryoSieveInputError(f"mask: expected a cubic 3D map, got shape {tuple(data.shape)}")
    if not voxel_size > 0 or extend_angstrom < 0 or soft_edge_angstrom < 0 or not lowpass_angstrom > 0:
        raise CryoSieveInputError("mask: voxel size and low-pass must be positive, extend and edge non-negative")
    size = data.shape[0]
    k = torch.fft.fftfreq(size, d=voxel_size, dtype=torch.float64)
    kx = torch.fft.rfftfreq(size, d=voxel_size, dtype=torch.float64)
    s2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2
    gaussian = torch.exp(-0.5 * s2 * lowpass_angstrom**2).to(torch.complex64)
    smooth = torch.fft.irfftn(torch.fft.rfftn(data) * gaussian, s=data.shape)
    level = 0.1 * float(smooth.max()) if threshold is None else float(threshold)
    inside = smooth >= level
    if not bool(inside.any()):
        raise CryoSieveInputError(f"mask: no voxel of the low-passed map reaches the threshold {level:g}")
    extend = extend_angstrom / voxel_size
    edge = soft_edge_angstrom / voxel_size
    reach = int(math.ceil(extend + edge)) + 1
    distance = _distance_outside(inside, reach)
    if edge > 0:
        ramp = torch.clamp((distance - extend) / edge, 0.0, 1.0)
        mask = 0.5 + 0.5 * torch.cos(math.pi * ramp)
    else:
        mask = (distance <= extend).to(torch.float32)
    return np.ascontiguousarray(mask.numpy(), dtype=np.float32)


# --------------------------------------------------------------------------- particles


@dataclass(frozen=True)
class SimulationSettings:
    """What to simulate. Lengths in Å, B-factors in Å^2, angles in degrees.

    Attributes
    ----------
    num_particles, box, pixel_size:
        Particle count, image size (pixels, even, >= 16) and pixel size (Å).
    junk_fraction:
        Fraction in [0, 1) of particles that are projections of the junk model
        (exactly ``round(junk_fraction * num_particles)`` of them).
    snr:
        Signal variance / noise variance over the whole box, the signal variance pooled
        over the noiseless images of the main model's particles; ``math.inf``: no noise.
    bfactor_min, bfactor_max:
        Range of the per-particle envelope B-factor (uniform), the hidden quality.
    defocus_min, defocus_max:
        Range of defocus U (uniform, Å, positive = underfocus).
    astigmatism:
        Defocus V = U - uniform(0, astigmatism) Å; the astigmatism angle is uniform in
        [0, 180) degrees.
    max_origin:
        Origins (rlnOriginX/YAngst) are uniform in ``[-max_origin, max_origin]`` Å.
    voltage, spherical_aberration, amplitude_contrast, phase_shift:
        Optics (kV, mm, fraction, degrees); ``rlnPhaseShift`` is written when not 0.
    seed:
        Seed of every random draw; the same seed gives identical files.
    batch_size:
        Images rendered at once (memory ~ ``batch_size * box^2`` complex numbers).
    half_maps:
        Reconstruct ``half1.mrc``/``half2.mrc`` from the particles.
    """

    num_particles: int = 2000
    box: int = 64
    pixel_size: float = 2.5
    junk_fraction: float = 0.1
    snr: float = 0.05
    bfactor_min: float = 0.0
    bfactor_max: float = 300.0
    defocus_min: float = 5000.0
    defocus_max: float = 15000.0
    astigmatism: float = 500.0
    max_origin: float = 4.0
    voltage: float = 300.0
    spherical_aberration: float = 2.7
    amplitude_contrast: float = 0.1
    phase_shift: float = 0.0
    seed: int = 0
    batch_size: int = 256
    half_maps: bool = True

    def check(self) -> None:
        """Raise :class:`CryoSieveInputError` naming the first bad setting."""
        def bad(name: str, value: object, why: str) -> CryoSieveInputError:
            return CryoSieveInputError(f"--{name} {value}: {why}")

        if self.num_particles < 1:
            raise bad("num_particles", self.num_particles, "must be at least 1")
        if self.half_maps and self.num_particles < 2:
            raise bad("num_particles", self.num_particles, "half maps need at least 2 particles (or --no_half_maps)")
        if self.box < 16 or self.box % 2:
            raise bad("box", self.box, "must be even and at least 16")
        if not (self.pixel_size > 0 and math.isfinite(self.pixel_size)):
            raise bad("angpix", self.pixel_size, "must be positive")
        if not 0 <= self.junk_fraction < 1:
            raise bad("junk_fraction", self.junk_fraction, "must be in [0, 1)")
        if not self.snr > 0:
            raise bad("snr", self.snr, "must be positive (inf: no noise)")
        if not 0 <= self.bfactor_min <= self.bfactor_max < math.inf:
            raise bad("bfactor_min", self.bfactor_min, f"need 0 <= bfactor_min <= bfactor_max ({self.bfactor_max})")
        if not 0 < self.defocus_min <= self.defocus_max < math.inf:
            raise bad("defocus_min", self.defocus_min, f"need 0 < defocus_min <= defocus_max ({self.defocus_max})")
        if not 0 <= self.astigmatism < self.defocus_min:
            raise bad("astigmatism", self.astigmatism, "must be in [0, defocus_min)")
        if not 0 <= self.max_origin < self.box * self.pixel_size / 4:
            raise bad("max_origin", self.max_origin, "must be in [0, box x angpix / 4)")
        if not self.voltage > 0:
            raise bad("voltage", self.voltage, "must be positive")
        if not self.spherical_aberration >= 0:
            raise bad("cs", self.spherical_aberration, "must be non-negative")
        if not 0 <= self.amplitude_contrast < 1:
            raise bad("amplitude_contrast", self.amplitude_contrast, "must be in [0, 1)")
        if not math.isfinite(self.phase_shift):
            raise bad("phase_shift", self.phase_shift, "must be finite")
        if self.batch_size < 1:
            raise bad("batch_size", self.batch_size, "must be at least 1")

    @property
    def junk_count(self) -> int:
        return int(round(self.junk_fraction * self.num_particles))


@dataclass
class ParticleParameters:
    """Drawn per-particle values, ``(n,)`` arrays (rounded to what the STAR file holds)."""

    rot: np.ndarray  # degrees
    tilt: np.ndarray
    psi: np.ndarray
    origin_x: np.ndarray  # Å (rlnOriginXAngst)
    origin_y: np.ndarray  # Å
    defocus_u: np.ndarray  # Å
    defocus_v: np.ndarray  # Å
    defocus_angle: np.ndarray  # degrees
    bfactor: np.ndarray  # Å^2, truth only
    is_junk: np.ndarray  # bool
    random_subset: np.ndarray  # int64, 1 or 2

    def __len__(self) -> int:
        return len(self.rot)


def draw_parameters(settings: SimulationSettings, generator: np.random.Generator) -> ParticleParameters:
    """Random poses, origins, CTFs, B-factors, junk flags and half-sets for every particle.

    Poses are uniform on SO(3); values are rounded to 6 decimals, as written to the STAR
    file, so the file reproduces the images exactly.
    """
    count = settings.num_particles
    is_junk = np.zeros(count, dtype=bool)
    is_junk[generator.choice(count, settings.junk_count, replace=False)] = True
    rot, tilt, psi = uniform_random_euler(count, generator)
    origin_x = generator.uniform(-settings.max_origin, settings.max_origin, count)
    origin_y = generator.uniform(-settings.max_origin, settings.max_origin, count)
    defocus_u = generator.uniform(settings.defocus_min, settings.defocus_max, count)
    defocus_v = defocus_u - generator.uniform(0.0, settings.astigmatism, count)
    defocus_angle = generator.uniform(0.0, 180.0, count)
    bfactor = generator.uniform(settings.bfactor_min, settings.bfactor_max, count)
    random_subset = generator.permutation(np.arange(count) % 2 + 1).astype(np.int64)

    def rounded(values: np.ndarray) -> np.ndarray:
        return np.round(values, 6)

    return ParticleParameters(
        rot=rounded(rot), tilt=rounded(tilt), psi=rounded(psi), origin_x=rounded(origin_x),
        origin_y=rounded(origin_y), defocus_u=rounded(defocus_u), defocus_v=rounded(defocus_v),
        defocus_angle=rounded(defocus_angle), bfactor=rounded(bfactor), is_junk=is_junk,
        random_subset=random_subset,
    )


class ImageFormation:
    """Renders particle images of one box and pixel size from a projector.

    The images' transforms are formed on the ``(box, box // 2 + 1)`` rfft grid at the
    frequencies with ``|k| < box / 2`` (zero elsewhere) and inverted with
    ``torch.fft.irfft2``.
    """

    def __init__(self, box: int, pixel_size: float, device: torch.device | str = "cpu") -> None:
        self.box, self.pixel_size, self.device = box, pixel_size, torch.device(device)
        ky, kx = half_plane_frequencies(box, device=self.device)
        inside = (kx**2 + ky**2) < (box / 2) ** 2
        self.flat_index = torch.nonzero(inside.reshape(-1)).squeeze(1)  # (p,)
        self.ky, self.kx = ky[inside], kx[inside]  # (p,) float64 cycles per box
        self.parity = torch.where(((self.kx + self.ky).long() % 2) == 0, 1.0, -1.0).to(torch.float64)

    def render(self, projector: FourierSliceProjector, parameters: ParticleParameters, rows: np.ndarray,
               settings: SimulationSettings) -> torch.Tensor:
        """Noiseless images of the given particles.

        Parameters
        ----------
        projector:
            Projector of the model's map (same box and voxel size as the images).
        parameters, rows:
            The particles and which of them to render (``(b,)`` indices).
        settings:
            Optics.

        Returns
        -------
        ``(b, box, box)`` float32 images ``[y, x]`` on the formation's device.
        """
        device = self.device

        def take(values: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.asarray(values)[rows], dtype=torch.float64, device=device)

        def constant(value: float) -> torch.Tensor:
            return torch.full((len(rows),), float(value), dtype=torch.float64, device=device)

        rotations = euler_to_matrix(take(parameters.rot), take(parameters.tilt), take(parameters.psi))
        slices = projector.sample(rotations, self.ky, self.kx).to(torch.complex128)  # (b, p)
        length = self.box * self.pixel_size
        frequency_x, frequency_y = self.kx / length, self.ky / length  # 1/Å
        bfactor = take(parameters.bfactor)
        ctf = ctf_2d(frequency_x, frequency_y, take(parameters.defocus_u), take(parameters.defocus_v),
                     take(parameters.defocus_angle), constant(settings.voltage),
                     constant(settings.spherical_aberration), constant(settings.amplitude_contrast),
                     constant(settings.phase_shift), bfactor=bfactor)  # (b, p), includes exp(-B s^2/4)
        origin_x = take(parameters.origin_x)[:, None] / self.pixel_size  # pixels
        origin_y = take(parameters.origin_y)[:, None] / self.pixel_size
        phase = 2 * math.pi * (self.kx * origin_x + self.ky * origin_y) / self.box
        values = slices * (ctf * self.parity) * torch.polar(torch.ones_like(phase), phase)
        spectrum = torch.zeros((len(rows), self.box * (self.box // 2 + 1)), dtype=torch.complex64, device=device)
        spectrum[:, self.flat_index] = values.to(torch.complex64)
        spectrum = spectrum.reshape(len(rows), self.box, self.box // 2 + 1)
        return torch.fft.irfft2(spectrum, s=(self.box, self.box))


@dataclass
class SimulationResult:
    """Where the simulated data set was written and what it holds."""

    folder: Path
    star: Path
    stack: Path
    truth_map: Path
    mask: Path
    truth_csv: Path
    half_maps: tuple[Path, Path] | None
    junk_count: int
    signal_variance: float  # pooled variance of the main model's noiseless images
    noise_variance: float  # 0 without noise


def _optics_table(settings: SimulationSettings) -> pd.DataFrame:
    return pd.DataFrame({
        "rlnOpticsGroup": [1],
        "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnVoltage": [float(settings.voltage)],
        "rlnSphericalAberration": [float(settings.spherical_aberration)],
        "rlnAmplitudeContrast": [float(settings.amplitude_contrast)],
        "rlnImagePixelSize": [float(settings.pixel_size)],
        "rlnImageSize": [int(settings.box)],
        "rlnImageDimensionality": [2],
    })


def image_names(count: int) -> list[str]:
    """``000001@particles.mrcs`` ... (1-based image numbers in the stack)."""
    width = max(6, len(str(count)))
    return [f"{index + 1:0{width}d}@{STACK_NAME}" for index in range(count)]


def _particles_table(parameters: ParticleParameters, settings: SimulationSettings) -> pd.DataFrame:
    columns: dict[str, object] = {
        "rlnImageName": image_names(len(parameters)),
        "rlnAngleRot": parameters.rot,
        "rlnAngleTilt": parameters.tilt,
        "rlnAnglePsi": parameters.psi,
        "rlnOriginXAngst": parameters.origin_x,
        "rlnOriginYAngst": parameters.origin_y,
        "rlnDefocusU": parameters.defocus_u,
        "rlnDefocusV": parameters.defocus_v,
        "rlnDefocusAngle": parameters.defocus_angle,
    }
    if settings.phase_shift != 0:
        columns["rlnPhaseShift"] = np.full(len(parameters), float(settings.phase_shift))
    columns["rlnOpticsGroup"] = np.ones(len(parameters), dtype=np.int64)
    columns["rlnRandomSubset"] = parameters.random_subset
    return pd.DataFrame(columns)


def star_text(blocks: dict[str, pd.DataFrame]) -> str:
    """RELION 3.1 STAR text of loop blocks: floats as ``%.6f``, integers and strings as they are.

    Deterministic (no time stamp), so the same data always gives the same bytes.
    """
    lines: list[str] = []
    for name, frame in blocks.items():
        lines += ["", "# version 30001", "", f"data_{name}", "", "loop_"]
        lines += [f"_{column} #{index + 1}" for index, column in enumerate(frame.columns)]
        formatted = []
        for column in frame.columns:
            values = frame[column]
            if pd.api.types.is_float_dtype(values):
                formatted.append([f"{value:.6f}" for value in values])
            else:
                formatted.append([str(value) for value in values])
        lines += ["\t".join(row) for row in zip(*formatted)]
        lines.append("")
    return "\n".join(lines) + "\n"


def _truth_table(parameters: ParticleParameters) -> pd.DataFrame:
    return pd.DataFrame({
        "rlnImageName": image_names(len(parameters)),
        "is_junk": parameters.is_junk,
        "bfactor": parameters.bfactor,
        "rot": parameters.rot,
        "tilt": parameters.tilt,
        "psi": parameters.psi,
        "origin_x_angst": parameters.origin_x,
        "origin_y_angst": parameters.origin_y,
        "defocus_u": parameters.defocus_u,
        "defocus_v": parameters.defocus_v,
        "defocus_angle": parameters.defocus_angle,
        "random_subset": parameters.random_subset,
    })


def _write_stack(path: Path, parameters: ParticleParameters, settings: SimulationSettings,
                 projectors: dict[bool, FourierSliceProjector], formation: ImageFormation,
                 noise_generator: np.random.Generator,
                 progress: Callable[[int], object] | None) -> tuple[float, float]:
    """Render every image into a memory-mapped stack, then add the noise in place.

    Returns (signal variance, noise variance). Memory: one batch of images.
    """
    count, box = len(parameters), settings.box
    batches = [np.arange(start, min(start + settings.batch_size, count))
               for start in range(0, count, settings.batch_size)]
    good_total = good_squares = 0.0
    all_total = all_squares = 0.0
    with mrcfile.new_mmap(str(path), shape=(count, box, box), mrc_mode=2, overwrite=True) as handle:
        handle.set_image_stack()
        _label_header(handle)
        handle.voxel_size = float(settings.pixel_size)
        for rows in batches:
            images = torch.empty((len(rows), box, box), dtype=torch.float32, device=formation.device)
            for junk, projector in projectors.items():
                members = np.flatnonzero(parameters.is_junk[rows] == junk)
                if members.size:
                    images[torch.as_tensor(members, device=formation.device)] = formation.render(
                        projector, parameters, rows[members], settings)
            block = images.cpu().numpy()
            handle.data[rows[0]: rows[-1] + 1] = block
            as_double = block.astype(np.float64)
            good = ~parameters.is_junk[rows]
            good_total += float(as_double[good].sum())
            good_squares += float((as_double[good] ** 2).sum())
            all_total += float(as_double.sum())
            all_squares += float((as_double**2).sum())
            if progress is not None:
                progress(len(rows))
        good_pixels = float((~parameters.is_junk).sum()) * box * box
        if good_pixels > 0:
            mean = good_total / good_pixels
            signal_variance = good_squares / good_pixels - mean * mean
        else:  # every particle is junk: use all of them
            pixels = float(count) * box * box
            mean = all_total / pixels
            signal_variance = all_squares / pixels - mean * mean
        noise_variance = 0.0 if math.isinf(settings.snr) else signal_variance / settings.snr
        noise_sigma = math.sqrt(noise_variance)
        minimum, maximum, total, squares = math.inf, -math.inf, 0.0, 0.0
        for rows in batches:
            block = np.array(handle.data[rows[0]: rows[-1] + 1], dtype=np.float32)
            if noise_sigma > 0:
                block += noise_sigma * noise_generator.standard_normal(block.shape, dtype=np.float32)
                handle.data[rows[0]: rows[-1] + 1] = block
            minimum, maximum = min(minimum, float(block.min())), max(maximum, float(block.max()))
            total += float(block.sum(dtype=np.float64))
            squares += float((block.astype(np.float64) ** 2).sum())
        pixels = float(count) * box * box
        mean = total / pixels
        handle.header.dmin, handle.header.dmax, handle.header.dmean = minimum, maximum, mean
        handle.header.rms = math.sqrt(max(squares / pixels - mean * mean, 0.0))
    return signal_variance, noise_variance


def _label_header(handle: mrcfile.mrcfile.MrcFile) -> None:
    """A fixed header label instead of mrcfile's time stamp, so the same data gives the same bytes."""
    handle.header.label[0] = b"cryosieve-simulate"
    for index in range(1, len(handle.header.label)):
        handle.header.label[index] = b""
    handle.header.nlabl = 1


def _write_map(path: Path, data: np.ndarray, voxel_size: float) -> None:
    """Write a float32 MRC map (``[z, y, x]``) with the voxel size (Å) and header statistics."""
    with mrcfile.new(str(path), overwrite=True) as handle:
        handle.set_data(np.ascontiguousarray(data, dtype=np.float32))
        handle.voxel_size = float(voxel_size)
        handle.update_header_stats()
        _label_header(handle)


@contextlib.contextmanager
def _staging_folder(target: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside ``target``, renamed onto it on success (replacing an old one).

    On failure the temporary folder, and any parent folders created for it, are removed.
    """
    if target.exists() and not target.is_dir():
        raise CryoSieveInputError(f"{target}: exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise CryoSieveInputError(f"{target}: output folder exists and is not empty (use --force)")
    remove_stale_temporaries_of([target])
    with OutputGroup() as group:
        yield group.folder_for(target)


def check_inputs(output_folder: str | os.PathLike[str], settings: SimulationSettings, *,
                 model: str | None = None, junk_model: str | None = None,
                 overwrite: bool = False) -> tuple[str, str]:
    """Check settings, model files and the output folder before any work.

    Returns the (model, junk model) paths with the bundled defaults filled in.
    Raises :class:`CryoSieveInputError` naming the option or file at fault.
    """
    settings.check()
    model = bundled_model(DEFAULT_MODEL) if model is None else str(model)
    junk_model = bundled_model(DEFAULT_JUNK_MODEL) if junk_model is None else str(junk_model)
    for path in (model, junk_model):
        if not os.path.isfile(path):
            raise CryoSieveInputError(f"{path}: atomic model file not found")
    target = Path(output_folder)
    if not str(output_folder).strip():
        raise CryoSieveInputError("--o: empty output path")
    if target.exists() and not target.is_dir():
        raise CryoSieveInputError(f"{target}: exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise CryoSieveInputError(f"{target}: output folder exists and is not empty (use --force)")
    check_outputs([], [InputFile(Path(model), "--model"), InputFile(Path(junk_model), "--junk_model")], [target])
    return model, junk_model


def simulate_particles(output_folder: str | os.PathLike[str], settings: SimulationSettings, *,
                       model: str | None = None, junk_model: str | None = None,
                       device: torch.device | str = "cpu", overwrite: bool = False,
                       progress: Callable[[int], object] | None = None) -> SimulationResult:
    """Simulate a known-truth particle data set into ``output_folder``.

    Writes, all together or not at all (a temporary folder beside the target is renamed
    at the end):

    * ``particles.star``: RELION 3.1 (data_optics, data_particles with poses, origins in
      Å, CTF, rlnOpticsGroup and random halves rlnRandomSubset 1/2; no B-factor);
    * ``particles.mrcs``: the images, float32, written batch by batch (memory-mapped);
    * ``truth.mrc`` (the main model's map), ``junk.mrc`` (the junk model's map, when
      there is junk), ``mask.mrc`` (:func:`soft_mask` of the truth map);
    * ``half1.mrc``/``half2.mrc``: reconstructed from the particles of each half-set
      (with ``settings.half_maps``);
    * ``truth.csv``: per particle rlnImageName, is_junk, bfactor (Å^2), rot, tilt, psi,
      origin_x_angst, origin_y_angst, defocus_u, defocus_v, defocus_angle, random_subset.

    Parameters
    ----------
    output_folder:
        Folder to create (an existing non-empty one needs ``overwrite``).
    settings:
        What to simulate (:class:`SimulationSettings`).
    model, junk_model:
        PDB/mmCIF files; ``None``: the bundled 1BD2 and 4E43 (HIV protease).
    device:
        Where to render images and reconstruct.
    progress:
        Called with a number of particles after each batch: rendered, then (with half
        maps) reconstructed, ``num_particles`` (or twice that with half maps) in all.
    """
    model, junk_model = check_inputs(output_folder, settings, model=model, junk_model=junk_model,
                                     overwrite=overwrite)
    device = torch.device(device)
    target = Path(output_folder)

    box, pixel = settings.box, settings.pixel_size
    truth = atomic_model_map(model, box, pixel)
    junk = atomic_model_map(junk_model, box, pixel) if settings.junk_count else None
    mask = soft_mask(truth, pixel)
    parameter_seed, noise_seed = np.random.SeedSequence(settings.seed).spawn(2)
    parameters = draw_parameters(settings, np.random.default_rng(parameter_seed))
    formation = ImageFormation(box, pixel, device)
    projectors = {False: FourierSliceProjector(torch.as_tensor(truth, device=device))}
    if junk is not None:
        projectors[True] = FourierSliceProjector(torch.as_tensor(junk, device=device))

    with _staging_folder(target, overwrite) as staging:
        signal_variance, noise_variance = _write_stack(
            staging / STACK_NAME, parameters, settings, projectors, formation,
            np.random.default_rng(noise_seed), progress)
        del projectors
        (staging / STAR_NAME).write_text(star_text({"optics": _optics_table(settings),
                                                    "particles": _particles_table(parameters, settings)}))
        _write_map(staging / "truth.mrc", truth, pixel)
        if junk is not None:
            _write_map(staging / "junk.mrc", junk, pixel)
        _write_map(staging / "mask.mrc", mask, pixel)
        _truth_table(parameters).to_csv(staging / "truth.csv", index=False)
        if settings.half_maps:
            halves = reconstruct_half_maps(staging, device=device, progress=progress)
            for subset, volume in halves.items():
                _write_map(staging / f"half{subset}.mrc", volume, pixel)

    half_paths = (target / "half1.mrc", target / "half2.mrc") if settings.half_maps else None
    return SimulationResult(
        folder=target, star=target / STAR_NAME, stack=target / STACK_NAME, truth_map=target / "truth.mrc",
        mask=target / "mask.mrc", truth_csv=target / "truth.csv", half_maps=half_paths,
        junk_count=settings.junk_count, signal_variance=signal_variance, noise_variance=noise_variance,
    )


def reconstruct_half_maps(folder: Path, device: torch.device | str = "cpu",
                          progress: Callable[[int], object] | None = None) -> dict[int, np.ndarray]:
    """Reconstruct the two half maps of a simulated data set from its own particles.

    ``cryosieve.reconstruct.reconstruct_subsets`` (CTF-corrected direct Fourier
    inversion, C1) of the particles with rlnRandomSubset 1 and 2 in ``folder``.
    Returns ``{1: map, 2: map}``, ``(n, n, n)`` float32 ``[z, y, x]``.
    """
    from cryosieve.io.stack import StackReader
    from cryosieve.io.star import read_particles
    from cryosieve.reconstruct import reconstruct_subsets

    table = read_particles(folder / STAR_NAME)
    reader = StackReader(table, folder)
    try:
        reader.validate()
        return reconstruct_subsets(table, reader, subsets=(1, 2), symmetry="C1", apply_ctf=True,
                                   device=str(torch.device(device)), progress=progress)
    finally:
        reader.close()
