"""The published CryoSieve 1.3.3 scoring (``--projector realspace --reference_weighting none``).

The reference below is written here, step by step, from the published program's formulas
(numpy, float64) and shares no code with :mod:`cryosieve.scoring.published`: quaternions from the
STAR angles, bilinear splatting of every voxel, the CTF and the origin shift on the
``rfft2`` half-plane with the Nyquist row at ``+n/2``, a high-pass that zeroes samples
below ``angpix / F`` cycles per pixel, and ``numpy.fft.irfft2`` back to real space. The
data are RELION's own projections (``relion_project --ctf``) with noise: astigmatic CTFs
at varied angles, phase shifts, and non-zero origins including odd sub-pixel values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from conftest import model_map, optics_table, random_particles, relion_project, soft_sphere_mask, write_map
from cryosieve.batch import ParticleBatch
from cryosieve.cli.core import main
from cryosieve.io.mrc import read_volume
from cryosieve.io.star import read_particles
from cryosieve.scoring.published import (
    PublishedParticles,
    inverse_half_plane,
    published_cutoff,
    published_row_frequencies,
    published_scores,
)
from cryosieve.selection import select_lowest
from cryosieve.sieve import prepare_references

BOX, PIXEL, COUNT, CUTOFF, RATIO = 64, 2.0, 240, 10.0, 0.8

#: Origins (pixels) of the first particles: half pixels, near-integers, odd fractions.
ODD_ORIGINS = [(0.5, -0.5), (-1.25, 2.75), (0.999, -0.001), (0.013, 3.333), (-2.5, 0.5), (1.0, -2.0)]


# --------------------------------------------------------------------------- the reference


def reference_rows(box: int, nyquist: int = +1) -> np.ndarray:
    """Row frequencies of the half-plane: ``r`` up to ``box/2`` (the Nyquist row taken as
    ``nyquist * box/2``), then ``r - box``."""
    rows = np.array([r if r < box // 2 else r - box for r in range(box)], dtype=np.float64)
    rows[box // 2] = nyquist * (box // 2)
    return rows


def reference_projection(volume: np.ndarray, rot: float, tilt: float, psi: float) -> np.ndarray:
    """Every voxel rotated by the pose's quaternion and splatted bilinearly; outside dropped."""
    a, b, g = math.radians(rot), math.radians(tilt), math.radians(psi)
    w = math.cos((g + a) / 2) * math.cos(b / 2)
    x = -math.sin((g - a) / 2) * math.sin(b / 2)
    y = -math.cos((g - a) / 2) * math.sin(b / 2)
    z = -math.sin((g + a) / 2) * math.cos(b / 2)
    first = (1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y))
    second = (2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x))
    n = volume.shape[0]
    vz, vy, vx = (c.reshape(-1) - n // 2 for c in np.meshgrid(*(np.arange(n),) * 3, indexing="ij"))
    px = first[0] * vx + first[1] * vy + first[2] * vz + n // 2
    py = second[0] * vx + second[1] * vy + second[2] * vz + n // 2
    ix, iy = np.floor(px).astype(np.int64), np.floor(py).astype(np.int64)
    dx, dy = px - ix, py - iy
    voxel = volume.reshape(-1)
    image = np.zeros(n * n)
    for ox, oy, weight in ((0, 0, (1 - dx) * (1 - dy)), (1, 0, dx * (1 - dy)), (0, 1, (1 - dx) * dy),
                           (1, 1, dx * dy)):
        inside = (ix + ox >= 0) & (ix + ox < n) & (iy + oy >= 0) & (iy + oy < n)
        image += np.bincount(((iy + oy) * n + ix + ox)[inside], weights=(voxel * weight)[inside], minlength=n * n)
    return image.reshape(n, n)


def reference_ctf(box: int, p: pd.Series, nyquist: int = +1) -> np.ndarray:
    ky = reference_rows(box, nyquist)[:, None]
    kx = np.arange(box // 2 + 1, dtype=np.float64)[None, :]
    volts = p.rlnVoltage * 1e3
    wavelength = 12.2643247 / np.sqrt(volts * (1 + volts * 0.978466e-6))
    f = np.hypot(kx / (p.rlnImagePixelSize * box), ky / (p.rlnImagePixelSize * box))
    alpha = np.arctan2(ky, kx) - np.radians(p.rlnDefocusAngle)
    dz = -(p.rlnDefocusU + p.rlnDefocusV + (p.rlnDefocusU - p.rlnDefocusV) * np.cos(2 * alpha)) / 2
    chi = (np.pi * wavelength * dz * f**2 + np.pi / 2 * (p.rlnSphericalAberration * 1e7) * wavelength**3 * f**4
           - np.radians(p.rlnPhaseShift))
    q = p.rlnAmplitudeContrast
    return -np.sqrt(1 - q**2) * np.sin(chi) + q * np.cos(chi)


def reference_translate(image: np.ndarray, ox: float, oy: float, nyquist: int = +1) -> np.ndarray:
    box = image.shape[0]
    ky = reference_rows(box, nyquist)[:, None]
    kx = np.arange(box // 2 + 1, dtype=np.float64)[None, :]
    phase = -2 * np.pi * (ox * kx / box + oy * ky / box)
    return np.fft.irfft2(np.fft.rfft2(image) * np.exp(1j * phase), s=(box, box))


def reference_highpass(image: np.ndarray, threshold: float) -> np.ndarray:
    box = image.shape[0]
    frequency = np.hypot(np.arange(box // 2 + 1)[None, :] / box, reference_rows(box)[:, None] / box)
    spectrum = np.fft.rfft2(image)
    spectrum[frequency < threshold] = 0
    return np.fft.irfft2(spectrum, s=(box, box))


def reference_score(volume: np.ndarray, image: np.ndarray, p: pd.Series, threshold: float,
                    shift_nyquist: int = +1, ctf_nyquist: int = +1) -> float:
    box = image.shape[0]
    shifted = reference_translate(image.astype(np.float64), p.rlnOriginXAngst / p.rlnImagePixelSize,
                                  p.rlnOriginYAngst / p.rlnImagePixelSize, shift_nyquist)
    projection = reference_projection(volume, p.rlnAngleRot, p.rlnAngleTilt, p.rlnAnglePsi)
    model = np.fft.irfft2(np.fft.rfft2(projection) * reference_ctf(box, p, ctf_nyquist), s=(box, box))
    return float(np.linalg.norm(reference_highpass(model - shifted, threshold)) ** 2
                 - np.linalg.norm(reference_highpass(shifted, threshold)) ** 2)


def reference_kept(scores: np.ndarray, half_set: np.ndarray, ratio: float) -> np.ndarray:
    kept = np.zeros(len(scores), dtype=bool)
    for subset in (1, 2):
        members = np.flatnonzero(half_set == subset)
        kept[members[np.argsort(scores[members])[:round(ratio * len(members))]]] = True
    return kept


# --------------------------------------------------------------------------- data


@dataclass
class PublishedData:
    folder: Path
    star: Path
    half_maps: list[Path]
    mask: Path
    particles: pd.DataFrame  # optics merged in, STAR order
    images: np.ndarray  # (n, box, box) float32, STAR order
    volumes: list[np.ndarray]  # masked half maps, float32 map x float32 mask in float64
    scores: np.ndarray  # reference scores


@pytest.fixture(scope="module")
def published_data(tmp_path_factory: pytest.TempPathFactory) -> PublishedData:
    folder = tmp_path_factory.mktemp("published")
    rng = np.random.default_rng(2023)
    truth = model_map("1BD2.pdb.gz", BOX, PIXEL)
    write_map(folder / "truth.mrc", truth, PIXEL)
    particles = random_particles(COUNT, rng, PIXEL, "particles.mrcs", max_origin_angstrom=7.0)
    for row, (ox, oy) in enumerate(ODD_ORIGINS):
        particles.loc[row, ["rlnOriginXAngst", "rlnOriginYAngst"]] = ox * PIXEL, oy * PIXEL
    particles.loc[0, ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]] = 21000.0, 17500.0, 45.0
    particles["rlnPhaseShift"] = rng.uniform(0, 30, COUNT)
    starfile.write({"optics": optics_table(BOX, PIXEL), "particles": particles}, folder / "in.star", overwrite=True)
    clean = mrcfile.read(relion_project(folder / "truth.mrc", folder / "in.star", folder / "projected", PIXEL))
    noisy = (clean + rng.normal(0, 2 * clean.std(), clean.shape)).astype(np.float32)
    with mrcfile.new(str(folder / "particles.mrcs"), overwrite=True) as handle:
        handle.set_data(noisy)
        handle.voxel_size = PIXEL
    particles["rlnRandomSubset"] = rng.permutation(np.arange(COUNT) % 2 + 1)
    star = folder / "particles.star"
    starfile.write({"optics": optics_table(BOX, PIXEL), "particles": particles}, star, overwrite=True)
    half_maps = []
    for subset in (1, 2):
        half_maps.append(folder / f"half{subset}.mrc")
        write_map(half_maps[-1], truth + rng.normal(0, 0.3 * truth.std(), truth.shape).astype(np.float32), PIXEL)
    write_map(folder / "mask.mrc", soft_sphere_mask(BOX, BOX * 0.4, 4), PIXEL)

    blocks = starfile.read(star, always_dict=True)
    merged = blocks["particles"].merge(blocks["optics"], on="rlnOpticsGroup", how="left")
    stack = mrcfile.read(folder / "particles.mrcs")
    images = stack[[int(name.split("@")[0]) - 1 for name in merged.rlnImageName]]
    mask = mrcfile.read(folder / "mask.mrc").astype(np.float64)
    volumes = [mrcfile.read(path).astype(np.float64) * mask for path in half_maps]
    threshold = PIXEL / CUTOFF
    scores = np.array([reference_score(volumes[p.rlnRandomSubset - 1], images[i], p, threshold)
                       for i, p in enumerate(merged.itertuples())])
    return PublishedData(folder, star, half_maps, folder / "mask.mrc", merged, images, volumes, scores)


def relative(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(np.asarray(a) - np.asarray(b)) / np.abs(np.asarray(b))


def our_scores(data: PublishedData, rows: np.ndarray) -> np.ndarray:
    """:func:`published_scores` on the given rows, half-set by half-set."""
    table = read_particles(data.star, PIXEL)
    out = np.empty(len(rows))
    for subset in (1, 2):
        members = np.flatnonzero(table.random_subset[rows] == subset)
        if members.size == 0:
            continue
        batch = PublishedParticles.of(ParticleBatch.from_table(table, rows[members]), CUTOFF, "cpu")
        out[members] = published_scores(torch.from_numpy(data.volumes[subset - 1]),
                                        torch.from_numpy(data.images[rows[members]]), batch).numpy()
    return out


# --------------------------------------------------------------------------- tests


def test_published_scores_equal_the_reference(published_data):
    scores = our_scores(published_data, np.arange(COUNT))
    worst = relative(scores, published_data.scores).max()
    print(f"\n[published] published_scores vs reference: max relative difference {worst:.2e}")
    assert worst < 1e-6
    half_set = published_data.particles.rlnRandomSubset.to_numpy()
    expected = reference_kept(published_data.scores, half_set, RATIO)
    assert np.array_equal(select_lowest(scores, half_set, RATIO), expected)


def test_cryosieve_core_realspace_none_reproduces_the_reference(published_data, tmp_path):
    data = published_data
    out = tmp_path / "kept.star"
    argv = ["--i", str(data.star), "--o", str(out), "--directory", str(data.folder), "--angpix", str(PIXEL),
            "--volume", str(data.half_maps[0]), "--volume", str(data.half_maps[1]), "--mask", str(data.mask),
            "--retention_ratio", str(RATIO), "--frequency", str(CUTOFF), "--projector", "realspace",
            "--reference_weighting", "none", "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    table = pd.read_csv(tmp_path / "kept_scores.csv", keep_default_na=False)
    assert table.rlnImageName.tolist() == data.particles.rlnImageName.tolist()
    worst = relative(table.score.to_numpy(), data.scores).max()  # the CSV holds 10 significant digits
    print(f"\n[published] cryosieve-core vs reference: max relative difference {worst:.2e}")
    assert worst < 1e-6
    expected = reference_kept(data.scores, data.particles.rlnRandomSubset.to_numpy(), RATIO)
    assert np.array_equal(table.kept.to_numpy().astype(bool), expected)
    kept_names = starfile.read(out, always_dict=True)["particles"].rlnImageName.tolist()
    assert kept_names == data.particles.rlnImageName[expected].tolist()


def test_nyquist_row_is_plus_half_box_in_the_shift_and_the_ctf(published_data):
    """The published kernels index row ``n/2`` of the half-plane as ``+n/2``.

    On the particle with a half-pixel origin and a 45 degree astigmatism, reading that
    row as ``-n/2`` in the origin shift, or in the CTF's angle, moves the score far beyond
    the tolerance; :func:`published_scores` must agree with ``+n/2`` only.
    """
    assert published_row_frequencies(BOX)[BOX // 2].item() == BOX // 2
    assert published_row_frequencies(BOX)[BOX // 2 + 1].item() == -(BOX // 2 - 1)
    data = published_data
    p = data.particles.iloc[0]
    volume, image, threshold = data.volumes[p.rlnRandomSubset - 1], data.images[0], PIXEL / CUTOFF
    expected = data.scores[0]
    for shift_nyquist, ctf_nyquist in ((-1, +1), (+1, -1), (-1, -1)):
        wrong = reference_score(volume, image, p, threshold, shift_nyquist, ctf_nyquist)
        assert relative(wrong, expected) > 1e-4, (shift_nyquist, ctf_nyquist)
    assert relative(our_scores(data, np.array([0]))[0], expected) < 1e-9


def test_realspace_references_are_the_float64_product_of_map_and_mask(published_data):
    volumes = [read_volume(path) for path in published_data.half_maps]
    mask = read_volume(published_data.mask, what="mask")
    masked, fsc, weighting = prepare_references(volumes, mask, "none", "realspace")
    assert fsc is None and weighting == "none"
    for ours, expected in zip(masked, published_data.volumes, strict=True):
        assert ours.dtype == np.float64 and np.array_equal(ours, expected)


def test_published_cutoff_is_angpix_over_f():
    pixel = np.array([2.0, 2.001])
    assert np.array_equal(published_cutoff(pixel, 10.0, 2.0005), np.full(2, 2.0005 / 10.0))
    assert np.array_equal(published_cutoff(pixel, 10.0, None), pixel / 10.0)


def test_published_scorer_by_hand():
    """One voxel, a 90 degree in-plane turn, unit CTF, an integer origin: derived on paper.

    The published projector rotates voxel (x, y, z) relative to the centre n/2 by the
    pose; rot = 90 degrees maps (1, 0, 0) to (0, -1, 0), i.e. pixel (x, y) = (4, 3) in a
    box of 8. Amplitude contrast 1 with zero defocus and Cs gives CTF = cos(0) = 1; a
    zero cut-off keeps every frequency; T shifts the image by +origin (numpy roll).
    """
    box = 8
    image = torch.from_numpy(np.random.default_rng(1).normal(size=(1, box, box)))

    def batch(rot: float, origin_x: float, origin_y: float) -> PublishedParticles:
        values = {"rot": rot, "tilt": 0.0, "psi": 0.0, "origin_x": origin_x, "origin_y": origin_y,
                  "defocus_u": 0.0, "defocus_v": 0.0, "defocus_angle": 0.0, "phase_shift": 0.0, "voltage": 300.0,
                  "spherical_aberration": 0.0, "amplitude_contrast": 1.0, "pixel_size": 1.0,
                  "highpass_cycles_per_pixel": 0.0}
        return PublishedParticles(**{name: torch.tensor([value], dtype=torch.float64)
                                     for name, value in values.items()})

    volume = torch.zeros((box, box, box), dtype=torch.float64)
    volume[4, 4, 5] = 2.0  # [z, y, x]: x = +1 from the centre
    projection = np.zeros((box, box))
    projection[3, 4] = 2.0  # [y, x]
    shifted = np.roll(image[0].numpy(), shift=(-2, 1), axis=(0, 1))
    expected = ((projection - shifted) ** 2).sum() - (shifted**2).sum()
    assert published_scores(volume, image, batch(90.0, 1.0, -2.0)).item() == pytest.approx(expected, rel=1e-12)

    # A fractional turn splats bilinearly: rot = 30 degrees sends (2, 0, 0) to (2 cos 30, -2 sin 30).
    volume = torch.zeros((box, box, box), dtype=torch.float64)
    volume[4, 4, 6] = 1.0
    x = 4 + 2 * math.cos(math.radians(30))
    projection = np.zeros((box, box))
    projection[3, math.floor(x)] = 1 - (x - math.floor(x))
    projection[3, math.floor(x) + 1] = x - math.floor(x)
    expected = ((projection - image[0].numpy()) ** 2).sum() - (image[0].numpy() ** 2).sum()
    assert published_scores(volume, image, batch(30.0, 0.0, 0.0)).item() == pytest.approx(expected, rel=1e-12)


def test_inverse_half_plane_reads_non_hermitian_columns_as_numpy_does():
    """Sub-pixel shifts and astigmatic CTFs leave the kx = 0 and kx = n/2 columns without
    Hermitian symmetry; they are read as ``numpy.fft.irfft2`` reads them, for even and odd boxes."""
    rng = np.random.default_rng(5)
    for box in (8, 9):
        spectra = rng.normal(size=(3, box, box // 2 + 1)) + 1j * rng.normal(size=(3, box, box // 2 + 1))
        ours = inverse_half_plane(torch.from_numpy(spectra), box).numpy()
        assert np.allclose(ours, np.fft.irfft2(spectra, s=(box, box)), rtol=0, atol=1e-14)
