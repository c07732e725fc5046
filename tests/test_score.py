"""The sieving score: exact identities and known truth (the published scoring: test_published.py)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from conftest import particles_in_memory
from cryosieve.batch import ParticleBatch
from cryosieve.fourier import image_frequencies
from cryosieve.geometry import euler_to_matrix, uniform_random_euler
from cryosieve.io.star import read_particles
from cryosieve.particles import ParticleSet
from cryosieve.projection import FourierSliceProjector
from cryosieve.scoring import kernels as _kernels
from cryosieve.scoring.fourier import FourierScorer, corner_layout
from cryosieve.scoring.samples import BandSamples
from cryosieve.settings import SieveSettings
from cryosieve.sieve import load_inputs, sieve


def make_particles(count: int, rng: np.random.Generator, pixel: float, **overrides: np.ndarray) -> ParticleSet:
    """``count`` particles in memory with random poses, origins and CTFs."""
    rot, tilt, psi = uniform_random_euler(count, rng)
    values = {"rot": rot, "tilt": tilt, "psi": psi, "origin_x": rng.uniform(-4, 4, count),
              "origin_y": rng.uniform(-4, 4, count), "defocus_u": rng.uniform(9000, 20000, count),
              "defocus_v": rng.uniform(8000, 9000, count), "defocus_angle": rng.uniform(-180, 180, count),
              "phase_shift": rng.uniform(0, 40, count), "pixel_size": np.full(count, pixel)}
    values.update(overrides)
    return particles_in_memory(count, **values)


def make_batch(count: int, rng: np.random.Generator, pixel: float, **overrides: np.ndarray) -> ParticleBatch:
    return ParticleBatch.from_table(make_particles(count, rng, pixel, **overrides), np.arange(count))


def fourier_scores(volume: torch.Tensor, images: torch.Tensor, batch: ParticleBatch, highpass_angstrom: float,
                   engine: str = "auto") -> torch.Tensor:
    """The Fourier scorer's scores of one batch against ``volume``."""
    scorer = FourierScorer(images.shape[-1], highpass_angstrom, float(batch.pixel_size.min()), torch.device("cpu"),
                           engine)
    scorer.prepare(volume.numpy())
    return scorer.score(batch, images)


def relion_ctf(fx: np.ndarray, fy: np.ndarray, batch: ParticleBatch) -> np.ndarray:
    """RELION's ``CTF::getCTF`` typed from ``ctf.h``, written here independently of ``cryosieve.ctf``:
    ``(b, p)`` at frequencies ``fx``, ``fy`` (1/Å, ``(b, p)``), from the particles' values as read."""
    def column(name: str) -> np.ndarray:
        return np.asarray(getattr(batch.table, name), dtype=np.float64)[batch.rows][:, None]

    volts = column("voltage") * 1000
    wavelength = 12.2643247 / np.sqrt(volts * (1.0 + volts * 0.978466e-6))
    k1 = np.pi * wavelength
    k2 = np.pi / 2 * column("spherical_aberration") * 1e7 * wavelength**3
    q0 = column("amplitude_contrast")
    k3 = np.arctan(q0 / np.sqrt(1 - q0 * q0))
    k4 = -column("ctf_bfactor") / 4
    k5 = np.deg2rad(column("phase_shift"))
    average = -(column("defocus_u") + column("defocus_v")) * 0.5
    deviation = -(column("defocus_u") - column("defocus_v")) * 0.5
    u2 = fx * fx + fy * fy
    ellipsoid = np.arctan2(fy, fx) - np.deg2rad(column("defocus_angle"))
    deltaf = np.where(u2 > 0, average + deviation * np.cos(2 * ellipsoid), 0.0)
    argument = k1 * deltaf * u2 + k2 * u2 * u2 - k5 - k3
    return column("ctf_scalefactor") * -np.sin(argument) * np.exp(k4 * u2)


def direct_scores(volume: torch.Tensor, images: torch.Tensor, batch: ParticleBatch, highpass_angstrom: float
                  ) -> torch.Tensor:
    """The score formula evaluated literally in real space, float64, with full 2D FFTs."""
    box = images.shape[-1]
    ky, kx = (torch.from_numpy(values) for values in image_frequencies(box))
    inside = (kx**2 + ky**2) < (box / 2) ** 2
    fy, fx = ky[inside], kx[inside]
    rotations = euler_to_matrix(*(torch.from_numpy(angle) for angle in (batch.rot, batch.tilt, batch.psi)))
    slices = FourierSliceProjector(volume.double(), dtype=torch.complex128).sample(rotations, fy, fx)
    pixel = batch.pixel_size[:, None]
    fx_physical, fy_physical = np.broadcast_arrays(fx.numpy()[None] / (box * pixel), fy.numpy()[None] / (box * pixel))
    ctf = torch.from_numpy(relion_ctf(fx_physical, fy_physical, batch))
    full = torch.zeros((len(batch), box, box // 2 + 1), dtype=torch.complex128)
    full[:, inside] = ctf * slices * torch.exp(2j * math.pi * (fx + fy) * (box // 2) / box)
    model = torch.fft.irfft2(full, s=(box, box))  # CTF * P(V), centred at pixel box//2
    origin_x, origin_y = torch.from_numpy(batch.origin_x), torch.from_numpy(batch.origin_y)
    shift = torch.exp(-2j * math.pi * (kx * origin_x[:, None, None] + ky * origin_y[:, None, None]) / box)
    shifted = torch.fft.irfft2(torch.fft.rfft2(images.double()) * shift, s=(box, box))  # T(I)
    frequency = torch.sqrt(torch.fft.fftfreq(box)[:, None] ** 2 + torch.fft.fftfreq(box)[None] ** 2)
    cut = torch.from_numpy(batch.pixel_size / highpass_angstrom)

    def highpass(stack: torch.Tensor) -> torch.Tensor:
        keep = (frequency[None] >= cut[:, None, None]) & (frequency[None] < 0.5)
        return torch.fft.ifft2(torch.fft.fft2(stack) * keep).real

    return (highpass(model - shifted) ** 2).sum((1, 2)) - (highpass(shifted) ** 2).sum((1, 2))


@pytest.mark.parametrize("engine", ["numba", "torch"])
def test_fourier_score_equals_real_space_formula(engine):
    """Both implementations (the CPU kernel and the CUDA path's tensors, here on the CPU) against the
    score evaluated literally in real space with RELION's CTF typed independently."""
    rng = np.random.default_rng(5)
    box = 32
    volume = torch.from_numpy(rng.normal(size=(box, box, box))).float()
    images = torch.from_numpy(rng.normal(size=(12, box, box))).float()
    # rlnCtfBfactor and rlnCtfScalefactor as RELION applies them; half the particles without an envelope
    batch = make_batch(12, rng, 1.3, ctf_bfactor=np.where(np.arange(12) % 2 == 0, rng.uniform(20, 200, 12), 0.0),
                       ctf_scalefactor=rng.uniform(0.5, 1.5, 12))
    ours = fourier_scores(volume, images, batch, 8.0, engine=engine)
    expected = direct_scores(volume, images, batch, 8.0)
    assert torch.allclose(ours, expected, rtol=2e-5, atol=1e-3 * float(expected.abs().mean()))


def test_fourier_score_per_particle_pixel_size(monkeypatch):
    """Particles of two optics groups use their own pixel size in the cut-off and the CTF."""
    rng = np.random.default_rng(6)
    box = 32
    volume = torch.from_numpy(rng.normal(size=(box, box, box))).float()
    images = torch.from_numpy(rng.normal(size=(8, box, box))).float()
    batch = make_batch(8, rng, 1.0, pixel_size=np.array([1.0, 1.2] * 4))
    ours = fourier_scores(volume, images, batch, 6.0)
    assert torch.allclose(ours, direct_scores(volume, images, batch, 6.0), rtol=2e-5, atol=1e-2)


@pytest.mark.parametrize("box, angstrom", [(16, math.inf), (17, 5.0), (32, 8.0), (65, 20.0)])
def test_kernel_blocks_cover_each_band_sample_once(box: int, angstrom: float) -> None:
    """The CPU kernel's block layout holds every band sample exactly once, with its Friedel
    weight, and nothing else; blocks stay inside their row."""
    samples = BandSamples(box, 1.0 / angstrom, "cpu")
    blocks = samples.blocks
    assert np.all(blocks.column >= 0) and np.all(blocks.column + _kernels.BLOCK <= blocks.width)
    covered = np.zeros((box, blocks.width))
    columns = blocks.column[:, None] + np.arange(_kernels.BLOCK)[None, :]
    np.add.at(covered, (np.broadcast_to(blocks.row[:, None], columns.shape), columns),
              blocks.weight.reshape(columns.shape))
    expected = np.zeros((box, blocks.width))
    expected[samples.row.numpy(), samples.column.numpy()] = samples.weight.numpy()
    np.testing.assert_array_equal(covered, expected)
    kx = columns.astype(float)
    ky = np.fft.fftfreq(box, d=1.0 / box)[blocks.row][:, None]
    np.testing.assert_allclose(blocks.u2_cycles.reshape(columns.shape), kx**2 + ky**2, rtol=0, atol=1e-12)


@pytest.mark.parametrize("engine", ["numba", "torch"])
@pytest.mark.parametrize("box", [16, 20])
def test_fourier_score_small_boxes_without_cutoff(box: int, engine: str) -> None:
    """Boxes narrower than a kernel block (zero-padded spectra) and no high-pass at all."""
    rng = np.random.default_rng(8)
    volume = torch.from_numpy(rng.normal(size=(box, box, box))).float()
    images = torch.from_numpy(rng.normal(size=(6, box, box))).float()
    batch = make_batch(6, rng, 1.1)
    ours = fourier_scores(volume, images, batch, math.inf, engine=engine)
    expected = direct_scores(volume, images, batch, math.inf)
    assert torch.allclose(ours, expected, rtol=2e-5, atol=1e-3 * float(expected.abs().mean()))


@pytest.mark.skipif(not _kernels.AVAILABLE, reason="numba not installed")
def test_corner_layout_and_grid_reads_give_the_same_scores(monkeypatch) -> None:
    """The kernel's 8-corner layout holds each voxel's trilinear neighbours, and scoring from
    it equals scoring from the grid itself (used where the layout would not fit in memory)."""
    rng = np.random.default_rng(9)
    box = 24
    volume = torch.from_numpy(rng.normal(size=(box, box, box))).float()
    projector = FourierSliceProjector(volume)
    grid = projector.grid.reshape(projector.shape).numpy()
    corners = corner_layout(projector)
    assert corners is not None and corners.ctypes.data % 64 == 0
    layout = corners.reshape(grid.shape[0] - 1, grid.shape[1] - 1, grid.shape[2] - 1, 2, 2, 2)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                np.testing.assert_array_equal(layout[..., dz, dy, dx],
                                              grid[dz:dz + layout.shape[0], dy:dy + layout.shape[1],
                                                   dx:dx + layout.shape[2]])
    images = torch.from_numpy(rng.normal(size=(10, box, box))).float()
    batch = make_batch(10, rng, 1.2)
    from_corners = fourier_scores(volume, images, batch, 10.0)
    monkeypatch.setattr(_kernels, "CORNER_LAYOUT_MEMORY", 0)
    from_grid = fourier_scores(volume, images, batch, 10.0)
    assert torch.allclose(from_corners, from_grid, rtol=1e-5, atol=1e-5 * float(from_grid.abs().max()))


def test_viewing_direction_order_is_a_permutation_and_leaves_scores_unchanged(known_truth, monkeypatch):
    from cryosieve.scoring import loop as scoring_module

    rng = np.random.default_rng(9)
    rot, tilt, _ = uniform_random_euler(1000, rng)
    order = scoring_module.viewing_direction_order(rot, tilt, chunk=300)
    assert sorted(order.tolist()) == list(range(1000))
    assert all(set(order[start:start + 300]) == set(range(start, min(start + 300, 1000)))
               for start in range(0, 1000, 300))
    # Neighbours in the new order are closer in viewing direction than in the input order.
    def step(indices):
        z = np.cos(np.radians(tilt[indices]))
        return np.mean(np.abs(np.diff(z)) + np.abs(np.diff(np.radians(rot[indices]))) / np.pi)
    assert step(order[:300]) < 0.5 * step(np.arange(300))

    table = read_particles(known_truth.star)
    settings = SieveSettings(retention_ratio=0.8, highpass_angstrom=20.0)
    paths = [str(known_truth.half1), str(known_truth.half2)]
    reader, volumes, mask, half_set = load_inputs(table, known_truth.folder, paths, str(known_truth.mask), settings)
    ordered = sieve(table, reader, volumes, mask, half_set, settings).scores
    monkeypatch.setattr(scoring_module, "viewing_direction_order", lambda rot, tilt: np.arange(len(rot)))
    unordered = sieve(table, reader, volumes, mask, half_set, settings).scores
    assert np.array_equal(ordered, unordered)


@pytest.mark.slow
def test_known_truth_junk_removal_and_bfactor_ranking(known_truth, capsys):
    """10 % junk of another protein, per-particle B-factors, half maps from RELION.

    At a 20 Å cut-off the FSC-weighted Fourier scorer must put >= 90 % of the junk in the
    sieved set and do at least as well as the published real-space projector, both at
    junk removal and at ranking the true B-factors of the good particles.
    """
    table = read_particles(known_truth.star)
    truth = pd.read_csv(known_truth.folder / "truth.csv")
    assert (truth["rlnImageName"].to_numpy() == table.image_name).all()
    junk = truth["is_junk"].to_numpy()
    bfactor = truth["bfactor"].to_numpy()
    results = {}
    for projector in ("fourier", "realspace"):
        settings = SieveSettings(retention_ratio=0.8, highpass_angstrom=20.0, projector=projector,
                                 reference_weighting="auto")
        reader, volumes, mask, half_set = load_inputs(table, known_truth.folder, [str(known_truth.half1),
                                                      str(known_truth.half2)], str(known_truth.mask), settings)
        result = sieve(table, reader, volumes, mask, half_set, settings)
        removed = float((~result.kept & junk).sum() / junk.sum())
        ranking = float(spearmanr(result.scores[~junk], bfactor[~junk]).correlation)
        results[projector] = (result, removed, ranking)
    fourier, realspace = results["fourier"], results["realspace"]
    assert fourier[0].reference_weighting == "fsc" and realspace[0].reference_weighting == "none"
    between = float(spearmanr(fourier[0].scores, realspace[0].scores).correlation)
    with capsys.disabled():
        print(f"\n[known truth, 20 Å] junk sieved: fourier+fsc {fourier[1]:.3f}, realspace {realspace[1]:.3f}; "
              f"rank corr(score, true B): fourier+fsc {fourier[2]:.3f}, realspace {realspace[2]:.3f}; "
              f"rank corr between scorers {between:.3f}")
    assert fourier[1] >= 0.9
    assert fourier[1] >= realspace[1]
    assert fourier[2] >= realspace[2]
    assert fourier[2] > 0.3  # worse particles (larger B) score higher
    assert between > 0.8


def test_corner_layout_only_where_memory_allows(monkeypatch) -> None:
    gib = 1 << 30
    monkeypatch.setattr(_kernels, "available_memory", lambda: 20 * gib)
    assert _kernels.corner_layout_allowed(5 * gib)  # a quarter of what is available
    assert not _kernels.corner_layout_allowed(5 * gib + 1)
    monkeypatch.setattr(_kernels, "available_memory", lambda: 100 * gib)
    assert _kernels.corner_layout_allowed(_kernels.CORNER_LAYOUT_MEMORY)
    assert not _kernels.corner_layout_allowed(_kernels.CORNER_LAYOUT_MEMORY + 1)  # the cap
    monkeypatch.setattr(_kernels, "available_memory", lambda: None)  # unknown: 1 GiB at most
    assert _kernels.corner_layout_allowed(gib) and not _kernels.corner_layout_allowed(gib + 1)
    monkeypatch.setattr(_kernels, "available_memory", lambda: 2 * gib)
    assert corner_layout(FourierSliceProjector(torch.zeros(24, 24, 24))) is not None  # 1.2 MB
    monkeypatch.setattr(_kernels, "available_memory", lambda: 1024)
    assert corner_layout(FourierSliceProjector(torch.zeros(24, 24, 24))) is None


def test_scores_of_a_batch_read_slice_by_slice_equal_those_of_the_whole_batch(tmp_path) -> None:
    """The CPU scorer reads a BatchImages slice by slice between its FFTs: same numbers, bit for bit."""
    import mrcfile
    import starfile

    from cryosieve.io.stack import BatchImages, StackReader

    rng = np.random.default_rng(12)
    box, count = 24, 37  # not a multiple of the CPU chunk
    images = rng.normal(size=(count, box, box)).astype(np.float32)
    with mrcfile.new(str(tmp_path / "a.mrcs")) as handle:
        handle.set_data(images)
    particles = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@a.mrcs" for i in range(count)],
                              "rlnAngleRot": np.zeros(count), "rlnAngleTilt": np.zeros(count),
                              "rlnAnglePsi": np.zeros(count), "rlnDefocusU": np.full(count, 1e4),
                              "rlnDefocusV": np.full(count, 1e4), "rlnDefocusAngle": np.zeros(count),
                              "rlnOpticsGroup": np.ones(count, int)})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["g"], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                           "rlnImagePixelSize": [1.2], "rlnImageSize": [box], "rlnImageDimensionality": [2]})
    starfile.write({"optics": optics, "particles": particles}, tmp_path / "particles.star")
    reader = StackReader(read_particles(tmp_path / "particles.star"), tmp_path)
    reader.validate()
    rows = rng.permutation(count)
    batch = make_batch(count, rng, 1.2)
    scorer = FourierScorer(box, 10.0, 1.2, torch.device("cpu"))
    scorer.prepare(rng.normal(size=(box, box, box)).astype(np.float32))
    whole = scorer.score(batch, torch.from_numpy(reader.read(rows)))
    sliced = scorer.score(batch, BatchImages(reader, rows))
    assert torch.equal(whole, sliced)
    reader.close()
