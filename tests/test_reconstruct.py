"""The built-in reconstruction against RELION, against the known truth and exact identities.

Particles are simulated with RELION's own ``relion_project --ctf`` from a map made with
gemmi (random uniform poses, origins, astigmatic defocus, per-particle rlnCtfBfactor,
random half-sets), with seeded Gaussian noise added here. The STAR file given to the
reconstruction programs has no rlnCtfBfactor (the B-factors are the unknown truth).
Each test against RELION or the truth runs both engines (``engine="numba"``, the CPU
kernels, and ``engine="torch"``, the tensor code CUDA uses, here on the CPU):

* CTF-corrected, noisy, C1: our map's FSC with the ground truth crosses 0.5 at a
  resolution within 5 % of (or better than) ``relion_reconstruct --ctf``'s, and the two
  maps agree shell by shell in amplitude (same scale). At every shell up to Nyquist our
  FSC with the truth (computed here with numpy) is at least RELION's within 0.0015, and
  better on average over the upper half (RELION's gridding weight correction).
* The same for D2 and C4, with particles projected from a map symmetrised by
  ``relion_image_handler --sym``.
* Noiseless, CTF-free round trip: FSC with the truth above 0.99 to 0.9 x Nyquist and
  amplitudes within 3 %.
* The half maps of the shared known-truth stack (conftest) against RELION's half maps.

Exact identities, for each engine: half-grid insertion equals a brute-force insertion of
both Friedel halves; the filled ``x = 0`` plane is Hermitian; the gridding weight equals
a brute-force evaluation of the iterated density correction on both Friedel halves; the
symmetrised grid of a lattice-preserving group (D2, O) is the sum over the group looked
up directly, and invariant under it; one image inserted on grid points is read back
along its slice.
The two engines give the same maps (float tolerance), from the stack and from one grid;
half-set maps from one pass equal single-subset reconstructions; batch size and thread
count do not change the map; the CPU engine does not import torch.

* The command line: exit 2 with one line and no output for bad input; the same map
  through ``main`` and ``python -m``.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

import cryosieve.reconstruct as reconstruction
import cryosieve.reconstruct.tensor_path as reconstruction_torch
from conftest import KnownTruthData, model_map, optics_table, require, write_map
from cryosieve.batch import ParticleBatch
from cryosieve.cli.reconstruct import main
from cryosieve.ctf import CtfParameters
from cryosieve.errors import CryoSieveInputError
from cryosieve.fsc import fourier_shell_correlation, resolution_at_threshold, shell_index
from cryosieve.geometry import euler_to_matrix
from cryosieve.io.stack import StackReader
from cryosieve.io.star import read_particles
from cryosieve.reconstruct import reconstruct, reconstruct_star_file, reconstruct_subsets

VOXEL = 2.0


# ---------------------------------------------------------------------------------------
# Simulation with RELION's programs
# ---------------------------------------------------------------------------------------


@dataclass
class Simulated:
    folder: Path
    star: Path  # what the reconstruction programs read (no rlnCtfBfactor)
    truth: np.ndarray  # the map the particles were projected from
    box: int


def random_poses(count: int, rng: np.random.Generator) -> pd.DataFrame:
    defocus_u = rng.uniform(8000, 25000, count)
    return pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@particles.mrcs" for i in range(count)],
        "rlnAngleRot": rng.uniform(-180, 180, count),
        "rlnAngleTilt": np.degrees(np.arccos(rng.uniform(-1, 1, count))),
        "rlnAnglePsi": rng.uniform(-180, 180, count),
        "rlnOriginXAngst": rng.uniform(-6, 6, count),
        "rlnOriginYAngst": rng.uniform(-6, 6, count),
        "rlnDefocusU": defocus_u,
        "rlnDefocusV": defocus_u - rng.uniform(0, 2000, count),
        "rlnDefocusAngle": rng.uniform(-180, 180, count),
        "rlnOpticsGroup": 1,
        "rlnRandomSubset": rng.permutation(np.arange(count) % 2 + 1),
    })


def simulate(folder: Path, truth: np.ndarray, count: int, seed: int, *, ctf: bool = True,
             snr: float | None = 0.05, max_bfactor: float = 200.0) -> Simulated:
    """Project ``truth`` with ``relion_project`` and add Gaussian noise of the given SNR."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    box = truth.shape[0]
    write_map(folder / "truth.mrc", truth, VOXEL)
    particles = random_poses(count, rng)
    with_bfactor = particles.assign(rlnCtfBfactor=rng.uniform(0, max_bfactor, count))
    starfile.write({"optics": optics_table(box, VOXEL), "particles": with_bfactor}, folder / "project.star",
                   overwrite=True)
    command = [require("relion_project"), "--i", str(folder / "truth.mrc"), "--o", str(folder / "projected"),
               "--ang", str(folder / "project.star"), "--angpix", str(VOXEL)]
    if ctf:
        command.append("--ctf")
    subprocess.run(command, check=True, capture_output=True)
    images = mrcfile.read(folder / "projected.mrcs").astype(np.float32)
    if snr is not None:
        images += rng.normal(0, np.sqrt(images.var() / snr), images.shape).astype(np.float32)
    with mrcfile.new(str(folder / "particles.mrcs"), overwrite=True) as handle:
        handle.set_data(images)
        handle.voxel_size = VOXEL
    star = folder / "particles.star"
    starfile.write({"optics": optics_table(box, VOXEL), "particles": particles}, star, overwrite=True)
    return Simulated(folder, star, truth, box)


def relion_reconstruct(data: Simulated, symmetry: str = "C1", ctf: bool = True) -> np.ndarray:
    output = data.folder / f"relion_{symmetry}_{'ctf' if ctf else 'noctf'}.mrc"
    command = [require("relion_reconstruct"), "--i", str(data.star), "--o", str(output),
               "--angpix", str(VOXEL), "--sym", symmetry]
    if ctf:
        command += ["--ctf", "true"]
    subprocess.run(command, check=True, capture_output=True, cwd=data.folder)
    return mrcfile.read(output).astype(np.float32)


def ours(data: Simulated, **keywords) -> np.ndarray:
    table = read_particles(data.star)
    reader = StackReader(table, data.folder)
    try:
        return reconstruct(table, reader, **keywords)
    finally:
        reader.close()


def fsc(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    return fourier_shell_correlation(torch.from_numpy(first), torch.from_numpy(second)).numpy()


def resolution(volume: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> float:
    return resolution_at_threshold(torch.from_numpy(fsc(volume, truth)), truth.shape[0], VOXEL, threshold)


def shell_amplitude_ratio(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """sqrt(power of ``first`` / power of ``second``) per Fourier shell."""
    shells = shell_index(first.shape[0]).numpy()
    a, b = np.abs(np.fft.rfftn(first)) ** 2, np.abs(np.fft.rfftn(second)) ** 2
    count = first.shape[0] // 2 + 1
    power_a = np.bincount(shells.ravel(), a.ravel(), minlength=count)[:count]
    power_b = np.bincount(shells.ravel(), b.ravel(), minlength=count)[:count]
    return np.sqrt(power_a / power_b)


@pytest.fixture(scope="module")
def noisy(tmp_path_factory: pytest.TempPathFactory) -> Simulated:
    truth = model_map("1BD2.pdb.gz", 64, VOXEL)
    return simulate(tmp_path_factory.mktemp("noisy"), truth, 2000, seed=11)


# ---------------------------------------------------------------------------------------
# Against RELION and the ground truth
# ---------------------------------------------------------------------------------------


ENGINES = ["numba", "torch"]


@pytest.fixture(scope="module")
def relion_noisy(noisy: Simulated) -> np.ndarray:
    return relion_reconstruct(noisy, "C1")


@pytest.mark.parametrize("engine", ENGINES)
def test_ctf_corrected_resolution_matches_relion(noisy: Simulated, relion_noisy: np.ndarray, engine: str) -> None:
    mine = ours(noisy, apply_ctf=True, engine=engine)
    theirs = relion_noisy
    ours_resolution = resolution(mine, noisy.truth)
    relion_resolution = resolution(theirs, noisy.truth)
    print(f"{engine}: FSC 0.5 with the truth: ours {ours_resolution:.3f} Å, relion_reconstruct "
          f"{relion_resolution:.3f} Å")
    # measured: ours 6.198 Å, RELION 6.204 Å (box 64, 2 Å/px, 2000 particles, SNR 0.05)
    assert ours_resolution <= 1.05 * relion_resolution
    assert ours_resolution < 8.0  # and the data do resolve the map
    # Same map: FSC between the two above 0.98 to 3/4 of Nyquist, same scale per shell.
    agreement = fsc(mine, theirs)
    assert agreement[1:25].min() > 0.98
    ratio = shell_amplitude_ratio(mine, theirs)
    assert np.all(np.abs(ratio[2:29] - 1) < 0.03), ratio
    assert abs(ratio[1] - 1) < 0.06, ratio  # measured 0.96 at 128 Å, where the CTF is small
    # CTF correction matters: without it the map is much worse.
    uncorrected = ours(noisy, apply_ctf=False, engine=engine)
    assert resolution(uncorrected, noisy.truth) > 1.3 * ours_resolution


def fsc_with_truth(volume: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """FSC of ``volume`` with ``truth`` in shells of width one Fourier voxel (shell ``s``: the
    frequencies of length ``round(|k|) = s``, ``k`` in cycles per box), written out with numpy
    here, independent of the package's FSC. Returns ``n // 2 + 1`` values."""
    size = truth.shape[0]
    first, second = np.fft.rfftn(volume.astype(np.float64)), np.fft.rfftn(truth.astype(np.float64))
    k = np.fft.fftfreq(size, 1.0 / size)
    kx = np.fft.rfftfreq(size, 1.0 / size)
    shell = np.rint(np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)).astype(int)
    count = size // 2 + 1
    cross = np.bincount(shell.ravel(), (first * second.conj()).real.ravel(), count)[:count]
    power_first = np.bincount(shell.ravel(), (np.abs(first) ** 2).ravel(), count)[:count]
    power_second = np.bincount(shell.ravel(), (np.abs(second) ** 2).ravel(), count)[:count]
    return cross / np.sqrt(power_first * power_second)


#: How far below relion_reconstruct's FSC with the truth ours may fall at any one shell.
#: Measured on four sets like ``noisy`` (seeds 11, 21, 22, 23): the gridding weight of
#: this package is at worst 0.0005 below RELION at a shell (0.0003 with RELION's 10
#: iterations instead of 6); the plain division D / (W + lambda) used before was 0.0024 to
#: 0.0043 below at its worst shell.
FSC_TOLERANCE = 0.0015


@pytest.mark.relion
@pytest.mark.parametrize("engine", ENGINES)
def test_fsc_with_truth_at_least_relions_at_every_shell(noisy: Simulated, relion_noisy: np.ndarray,
                                                         engine: str) -> None:
    """Against the known truth, shell by shell up to Nyquist (every shell where RELION's map
    still has an FSC above 0.1 with the truth), our map is as good as
    ``relion_reconstruct --ctf``'s within :data:`FSC_TOLERANCE`, and better on average
    over the upper half of those shells (RELION's iterative gridding weight correction,
    done as :func:`cryosieve.reconstruct.grid.gridding_multiplier` does)."""
    mine = fsc_with_truth(ours(noisy, apply_ctf=True, engine=engine), noisy.truth)
    theirs = fsc_with_truth(relion_noisy, noisy.truth)
    signal = np.flatnonzero(theirs[1:] > 0.1) + 1
    shells = np.arange(1, signal.max() + 1)
    difference = mine[shells] - theirs[shells]
    print(f"{engine}: FSC with the truth, ours - RELION, shells {shells[0]}..{shells[-1]}:",
          np.round(difference, 4))
    assert shells[-1] >= 28  # the data resolve the map to near Nyquist (32)
    worst = int(np.argmin(difference))
    assert difference[worst] >= -FSC_TOLERANCE, (
        f"shell {shells[worst]}: ours {mine[shells[worst]]:.4f}, RELION {theirs[shells[worst]]:.4f}")
    # measured +0.0062 (both engines); the plain division: +0.0037, all of it from the last
    # three shells (it was 0.0009 below RELION on average over shells 17 to 29)
    assert difference[len(difference) // 2:].mean() > 0


@dataclass
class SymmetricCase:
    symmetry: str
    data: Simulated
    relion: np.ndarray  # relion_reconstruct --sym symmetry


@pytest.fixture(scope="module", params=["D2", "C4"])
def symmetric(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> SymmetricCase:
    """600 particles projected from a map symmetrised by ``relion_image_handler --sym``."""
    symmetry = request.param
    folder = tmp_path_factory.mktemp(f"symmetric_{symmetry}")
    asymmetric = folder / "asymmetric.mrc"
    write_map(asymmetric, model_map("1BD2.pdb.gz", 64, VOXEL), VOXEL)
    symmetric_path = folder / "symmetric.mrc"
    subprocess.run([require("relion_image_handler"), "--i", str(asymmetric), "--o", str(symmetric_path),
                    "--sym", symmetry], check=True, capture_output=True)
    truth = mrcfile.read(symmetric_path).astype(np.float32)
    data = simulate(folder / "particles", truth, 600, seed=5)
    return SymmetricCase(symmetry, data, relion_reconstruct(data, symmetry))


@pytest.mark.parametrize("engine", ENGINES)
def test_symmetric_reconstruction_matches_relion(symmetric: SymmetricCase, engine: str) -> None:
    symmetry, data, truth = symmetric.symmetry, symmetric.data, symmetric.data.truth
    mine = ours(data, symmetry=symmetry, engine=engine)
    ours_resolution = resolution(mine, truth)
    relion_resolution = resolution(symmetric.relion, truth)
    print(f"{symmetry}, {engine}: FSC 0.5 with the truth: ours {ours_resolution:.3f} Å, "
          f"relion {relion_resolution:.3f} Å")
    # measured: D2 6.954 vs 6.955 Å, C4 6.607 vs 6.609 Å
    assert ours_resolution <= 1.05 * relion_resolution
    assert fsc(mine, symmetric.relion)[1:25].min() > 0.98
    # Imposing the symmetry helps (600 particles are few), and a wrong group hurts.
    assert resolution(ours(data, symmetry="C1", engine=engine), truth) > 1.1 * ours_resolution
    wrong = "C4" if symmetry == "D2" else "D2"
    assert resolution(ours(data, symmetry=wrong, engine=engine), truth) > 1.2 * ours_resolution


@pytest.fixture(scope="module")
def noiseless(tmp_path_factory: pytest.TempPathFactory) -> Simulated:
    truth = model_map("4E43.pdb.gz", 48, VOXEL)
    return simulate(tmp_path_factory.mktemp("noiseless"), truth, 3000, seed=3, ctf=False, snr=None)


@pytest.mark.parametrize("engine", ENGINES)
def test_round_trip_recovers_the_map(noiseless: Simulated, engine: str) -> None:
    truth = noiseless.truth
    mine = ours(noiseless, apply_ctf=False, engine=engine)
    correlation = fsc(mine, truth)
    last = int(0.9 * 48 / 2)
    print(f"{engine}: round trip FSC:", np.round(correlation, 4))
    assert correlation[1:last + 1].min() > 0.99  # measured 0.9997
    ratio = shell_amplitude_ratio(mine, truth)
    assert np.all(np.abs(ratio[1:last + 1] - 1) < 0.03), ratio


@pytest.mark.parametrize("engine", ENGINES)
def test_half_maps_match_relion_half_maps(known_truth: KnownTruthData, engine: str) -> None:
    """The two half maps of the shared known-truth stack (10 % junk, per-particle B-factors
    unknown to the reconstruction) against ``relion_reconstruct --subset 1|2`` of it."""
    table = read_particles(known_truth.star)
    with StackReader(table, known_truth.folder) as reader:
        maps = reconstruct_subsets(table, reader, engine=engine)
    truth = mrcfile.read(known_truth.folder / "truth.mrc").astype(np.float32)
    for subset, path in ((1, known_truth.half1), (2, known_truth.half2)):
        theirs = mrcfile.read(path).astype(np.float32)
        ours_resolution, relion_resolution = resolution(maps[subset], truth), resolution(theirs, truth)
        print(f"{engine}, half {subset}: FSC 0.5 with the truth: ours {ours_resolution:.3f} Å, "
              f"relion {relion_resolution:.3f} Å; FSC with RELION's", np.round(fsc(maps[subset], theirs), 4))
        assert ours_resolution <= 1.05 * relion_resolution
        assert fsc(maps[subset], theirs)[1:25].min() > 0.98
        ratio = shell_amplitude_ratio(maps[subset], theirs)
        assert np.all(np.abs(ratio[2:29] - 1) < 0.03), ratio


# ---------------------------------------------------------------------------------------
# Exact identities of the implementation
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Simulated:
    truth = model_map("4E43.pdb.gz", 32, VOXEL)
    return simulate(tmp_path_factory.mktemp("small"), truth, 300, seed=2, snr=0.5)


def test_half_sets_in_one_pass_equal_single_subset_maps(small: Simulated) -> None:
    table = read_particles(small.star)
    reader = StackReader(table, small.folder)
    seen: list[int] = []
    maps = reconstruct_subsets(table, reader, subsets=(1, 2), symmetry="C2", batch_size=64, progress=seen.append)
    assert sum(seen) == len(table)
    for subset in (1, 2):
        rows = np.flatnonzero(table.random_subset == subset)
        alone = reconstruct(table, reader, rows=rows, symmetry="C2", batch_size=64)
        assert maps[subset].shape == (32, 32, 32) and maps[subset].dtype == np.float32
        np.testing.assert_array_equal(maps[subset], alone)
    mask = table.random_subset == 1
    np.testing.assert_array_equal(reconstruct(table, reader, rows=mask, symmetry="C2", batch_size=64), maps[1])
    assert fsc(maps[1], maps[2])[1:6].min() > 0.8  # both halves see the same particle


@pytest.mark.parametrize("engine", ["numba", "torch"])
def test_a_union_of_subsets_is_the_map_of_their_particles(small: Simulated, engine: str) -> None:
    """Quarters 11, 12 of half-set 1 and their union 1 in one pass: the union is the map of half-set 1 itself."""
    table = read_particles(small.star)
    quarters = np.where(table.random_subset == 1, 11, 21) + np.arange(len(table)) % 2
    split = table.with_values(random_subset=quarters)
    with StackReader(table, small.folder) as reader:
        maps = reconstruct_subsets(split, reader, subsets=(11, 12, 21, 22), unions={1: (11, 12), 2: (21, 22)},
                                   engine=engine)
        halves = reconstruct_subsets(table, reader, engine=engine)
    assert sorted(maps) == [1, 2, 11, 12, 21, 22]
    for half in (1, 2):
        np.testing.assert_allclose(maps[half], halves[half], rtol=0, atol=1e-6 * np.abs(halves[half]).max())
        assert not np.allclose(maps[half * 10 + 1], halves[half], atol=1e-3 * np.abs(halves[half]).max())
    with pytest.raises(ValueError, match="union 11"):
        reconstruct_subsets(split, StackReader(table, small.folder), subsets=(11, 12), unions={11: (11, 12)})


def test_batch_size_and_thread_count_do_not_change_the_map(small: Simulated) -> None:
    """Only the order of the float64 sums changes (threads fill separate grid copies)."""
    import numba

    reference = ours(small, batch_size=128)
    tolerance = 1e-6 * np.abs(reference).max()
    np.testing.assert_allclose(ours(small, batch_size=7), reference, rtol=0, atol=tolerance)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        np.testing.assert_allclose(ours(small, batch_size=50), reference, rtol=0, atol=tolerance)
    finally:
        numba.set_num_threads(threads)


@pytest.mark.parametrize("symmetry", ["C1", "D2"])
def test_torch_engine_equals_numba_engine(small: Simulated, symmetry: str) -> None:
    """The ``index_add_`` engine (used on CUDA), run on the CPU, computes the same maps as the
    numba kernels: one map, and two half maps from one pass."""
    cpu = ours(small, symmetry=symmetry, engine="numba")
    generic = ours(small, symmetry=symmetry, engine="torch")
    np.testing.assert_allclose(generic, cpu, rtol=0, atol=1e-5 * np.abs(cpu).max())
    table = read_particles(small.star)
    with StackReader(table, small.folder) as reader:
        halves = {engine: reconstruct_subsets(table, reader, symmetry=symmetry, engine=engine)
                  for engine in ("numba", "torch")}
    for subset in (1, 2):
        expected = halves["numba"][subset]
        np.testing.assert_allclose(halves["torch"][subset], expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def brute_force_full_insertion(image: np.ndarray, rotations: np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Trilinear insertion of every sample of the full 2D transform (both Friedel halves)
    into a full complex 3D grid indexed ``K + P/2`` on all three axes; weight ``1 + |k|^2/10``."""
    box = image.shape[0]
    padded = pad * box
    spectrum = np.fft.fft2(image)
    data = np.zeros((padded + 2,) * 3, dtype=np.complex128)
    weight = np.zeros((padded + 2,) * 3)
    frequencies = np.fft.fftfreq(box, 1.0 / box)
    for matrix in rotations:
        for row, ky in enumerate(frequencies):
            for column, kx in enumerate(frequencies):
                if kx * kx + ky * ky >= (box / 2) ** 2:
                    continue
                point = pad * (matrix.T @ np.array([kx, ky, 0.0]))  # (x, y, z)
                base = np.floor(point)
                fraction = point - base
                for corner in np.ndindex(2, 2, 2):  # (dx, dy, dz)
                    share = np.prod([fraction[a] if corner[a] else 1 - fraction[a] for a in range(3)])
                    x, y, z = (int(base[a]) + corner[a] + padded // 2 for a in range(3))
                    data[z, y, x] += share * spectrum[row, column]
                    weight[z, y, x] += share * (1 + (kx * kx + ky * ky) / 10)
    return data, weight


@pytest.mark.parametrize("path", ["numba", "torch"])
def test_half_grid_insertion_equals_full_hermitian_insertion(path: str) -> None:
    """Friedel folding, the zero frequency's multiplicity and the x = 0 plane's Hermitian
    completion reproduce exactly what inserting both halves of each image would give."""
    box, pad = 8, 2
    padded = pad * box
    rng = np.random.default_rng(4)
    image = rng.normal(size=(box, box))
    rotations = euler_to_matrix(*(rng.uniform(-180, 180, 3) for _ in range(3)))
    rotations[0] = euler_to_matrix(np.array(0.0), np.array(90.0), np.array(0.0))
    samples = reconstruction.SliceSamples.for_box(box)
    spectrum = np.fft.rfft2(image).reshape(-1)[samples.flat_index]
    radius2 = samples.frequency_x ** 2 + samples.frequency_y ** 2
    values = np.stack([spectrum.real * samples.multiplicity, spectrum.imag * samples.multiplicity,
                       (1 + radius2 / 10) * samples.multiplicity], axis=-1)
    values = np.ascontiguousarray(np.broadcast_to(values[None], (len(rotations), *values.shape)))
    shape = reconstruction.grid_shape(box, pad)
    if path == "numba":
        grid = np.zeros(shape)
        reconstruction.insert_slices_cpu(grid, rotations, samples.frequency_y, samples.frequency_x, values, pad)
        reconstruction.enforce_hermitian(grid)
    else:
        tensor = torch.zeros(shape, dtype=torch.float64)
        torch_samples = reconstruction_torch.TorchSamples.from_samples(samples)
        reconstruction_torch.insert_slices_torch(tensor, torch.from_numpy(rotations), torch_samples.frequency_y,
                                                 torch_samples.frequency_x, torch.from_numpy(values), pad)
        reconstruction.enforce_hermitian(tensor)
        grid = tensor.numpy()
    data, weight = brute_force_full_insertion(image, rotations, pad)
    half = padded // 2
    expected = data[:padded + 1, :padded + 1, half:half + half + 1]
    np.testing.assert_allclose(grid[:, :, :half + 1, 0], expected.real, atol=1e-9)
    np.testing.assert_allclose(grid[:, :, :half + 1, 1], expected.imag, atol=1e-9)
    np.testing.assert_allclose(grid[:, :, :half + 1, 2], weight[:padded + 1, :padded + 1, half:2 * half + 1],
                               atol=1e-9)


def random_batch(count: int, rng: np.random.Generator, **poses: np.ndarray) -> ParticleBatch:
    """``count`` particles with random poses (or those given: ``rot``, ``tilt``, ``psi``, degrees), origins
    and CTFs (per-particle envelope and scale included), as the engines read them."""
    defocus_u = rng.uniform(8000, 25000, count)
    ctf = CtfParameters.from_values(defocus_u, defocus_u - rng.uniform(0, 2000, count), rng.uniform(-180, 180, count),
                                    np.full(count, 300.0), np.full(count, 2.7), np.full(count, 0.1), np.zeros(count),
                                    rng.uniform(0, 100, count), rng.uniform(0.5, 1.5, count))
    values = {"origin_x": rng.uniform(-3, 3, count), "origin_y": rng.uniform(-3, 3, count),
              "rot": rng.uniform(-180, 180, count), "tilt": np.degrees(np.arccos(rng.uniform(-1, 1, count))),
              "psi": rng.uniform(-180, 180, count)}
    values.update(poses)
    return ParticleBatch(table=None, rows=np.arange(count), pixel_size=np.full(count, VOXEL), ctf=ctf,  # type: ignore[arg-type]
                         **values)


def inserted_grid(engine: str, images: np.ndarray, batch: ParticleBatch, pad: int,
                  apply_ctf: bool) -> np.ndarray | torch.Tensor:
    """One grid filled by an engine's batch insertion (before the Hermitian fill)."""
    box = images.shape[-1]
    if engine == "numba":
        insertion = reconstruction.NumbaInsertion(box, pad, [0], apply_ctf, len(images))
    else:
        insertion = reconstruction_torch.TensorInsertion(box, pad, [0], apply_ctf, "cpu")
    insertion.insert(images.astype(np.float32), batch, np.zeros(len(images), dtype=np.int64))
    return insertion.pop(0)


def as_numpy(grid: np.ndarray | torch.Tensor) -> np.ndarray:
    return grid.numpy() if isinstance(grid, torch.Tensor) else grid


@pytest.mark.parametrize("engine", ENGINES)
def test_filled_grid_is_hermitian_on_the_x0_plane(engine: str) -> None:
    """After the fill, (0, Ky, Kz) and (0, -Ky, -Kz) hold conjugate data and equal weights,
    and the fill added each one's mate (the plane is not what the insertion left)."""
    rng = np.random.default_rng(8)
    box, pad = 16, 2
    padded = pad * box
    grid = inserted_grid(engine, rng.normal(size=(6, box, box)), random_batch(6, rng), pad, apply_ctf=True)
    before = as_numpy(grid)[:, :, 0].copy()
    reconstruction.enforce_hermitian(grid)
    plane = as_numpy(grid)[:, :, 0]
    mirror = plane[padded::-1, padded::-1]  # index i <-> P - i, i.e. K <-> -K
    scale = np.abs(plane).max()
    np.testing.assert_allclose(plane[..., 0], mirror[..., 0], rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(plane[..., 1], -mirror[..., 1], rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(plane[..., 2], mirror[..., 2], rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(plane, before + np.stack([before[padded::-1, padded::-1, 0],
                                                         -before[padded::-1, padded::-1, 1],
                                                         before[padded::-1, padded::-1, 2]], axis=-1),
                               rtol=0, atol=1e-12 * scale)
    assert np.abs(before[..., 1] + before[padded::-1, padded::-1, 1]).max() > 1e-3 * scale


def full_hermitian(rng: np.random.Generator, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Random data ``F`` (complex) and weights ``W`` (real) over ``K`` in ``[-h, h]^3``, indexed
    ``[Kz + h, Ky + h, Kx + h]``, with ``F(-K) = conj F(K)`` and ``W(-K) = W(K)``."""
    size = 2 * half + 1
    data = rng.normal(size=(size,) * 3) + 1j * rng.normal(size=(size,) * 3)
    weight = rng.uniform(0, 1, (size,) * 3)
    return (data + np.conj(data[::-1, ::-1, ::-1])) / 2, (weight + weight[::-1, ::-1, ::-1]) / 2


def half_grid_of(data: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The stored half (Kx >= 0) of a full transform, in the layout of cryosieve.reconstruct.grid."""
    half = (data.shape[0] - 1) // 2
    grid = np.zeros((2 * half + 1, 2 * half + 1, half + 2, 3))
    grid[:, :, :half + 1, 0] = data[:, :, half:].real
    grid[:, :, :half + 1, 1] = data[:, :, half:].imag
    grid[:, :, :half + 1, 2] = weight[:, :, half:]
    return grid


def full_of(grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The full transform a half grid stands for (Kx < 0 from the Friedel mates)."""
    half = (grid.shape[0] - 1) // 2
    data = np.zeros((2 * half + 1,) * 3, dtype=np.complex128)
    weight = np.zeros((2 * half + 1,) * 3)
    data[:, :, half:] = grid[:, :, :half + 1, 0] + 1j * grid[:, :, :half + 1, 1]
    weight[:, :, half:] = grid[:, :, :half + 1, 2]
    data[:, :, :half] = np.conj(data[::-1, ::-1, :half:-1])
    weight[:, :, :half] = weight[::-1, ::-1, :half:-1]
    return data, weight


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("symmetry", ["D2", "O"])
def test_symmetrised_grid_is_the_sum_over_the_group(engine: str, symmetry: str) -> None:
    """Every rotation of D2 and O maps the integer lattice onto itself, so trilinear
    interpolation is exact: inside the sphere the symmetrised grid must be
    ``sum_R G(R K)`` looked up directly in the full transform, zero outside, and invariant
    under the group's rotations."""
    from cryosieve.symmetry import symmetry_matrices

    half = 10
    rng = np.random.default_rng(12)
    data, weight = full_hermitian(rng, half)
    grid = half_grid_of(data, weight)
    rotations = symmetry_matrices(symmetry)
    if engine == "numba":
        result = reconstruction.symmetrise_grid(grid, rotations)
    else:
        result = reconstruction.symmetrise_grid(torch.from_numpy(grid), torch.from_numpy(rotations)).numpy()
    axis = np.arange(-half, half + 1)
    kz, ky, kx = np.meshgrid(axis, axis, np.arange(half + 2), indexing="ij")
    inside = kx * kx + ky * ky + kz * kz < half * half
    points = np.stack([kx[inside], ky[inside], kz[inside]], axis=-1)  # (x, y, z)
    expected_data = np.zeros(len(points), dtype=np.complex128)
    expected_weight = np.zeros(len(points))
    for matrix in rotations:
        moved = points @ matrix.T
        lattice = np.rint(moved).astype(np.int64)
        assert np.abs(moved - lattice).max() < 1e-9
        expected_data += data[lattice[:, 2] + half, lattice[:, 1] + half, lattice[:, 0] + half]
        expected_weight += weight[lattice[:, 2] + half, lattice[:, 1] + half, lattice[:, 0] + half]
    np.testing.assert_allclose(result[..., 0][inside], expected_data.real, rtol=0, atol=1e-9)
    np.testing.assert_allclose(result[..., 1][inside], expected_data.imag, rtol=0, atol=1e-9)
    np.testing.assert_allclose(result[..., 2][inside], expected_weight, rtol=0, atol=1e-9)
    assert not result[~inside].any()
    # invariance: G'(R K) = G'(K) for every K in the sphere and every R of the group
    symmetric_data, symmetric_weight = full_of(result)
    for matrix in rotations:
        lattice = np.rint(points @ matrix.T).astype(np.int64) + half
        np.testing.assert_allclose(symmetric_data[lattice[:, 2], lattice[:, 1], lattice[:, 0]],
                                   symmetric_data[points[:, 2] + half, points[:, 1] + half, points[:, 0] + half],
                                   rtol=0, atol=1e-9)
        np.testing.assert_allclose(symmetric_weight[lattice[:, 2], lattice[:, 1], lattice[:, 0]],
                                   symmetric_weight[points[:, 2] + half, points[:, 1] + half, points[:, 0] + half],
                                   rtol=0, atol=1e-9)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("apply_ctf", [False, True])
def test_single_image_is_read_back_from_its_slice(engine: str, apply_ctf: bool) -> None:
    """One image inserted at a pose whose slice lies on grid points (Euler angles in steps
    of 90 degrees), then read back along the same slice (the Fourier slice theorem's
    projection): at ``K = pad A^T k`` the data divided by the weight is the image's own DFT
    ``S(k)`` (about pixel n // 2, moved by the origin) without CTF, and with CTF the data is
    ``C S`` and the weight ``C^2`` for one real ``C`` per sample; every other voxel is empty."""
    box, pad = 16, 2
    padded, half = pad * box, box
    rng = np.random.default_rng(21)
    frequencies = np.fft.fftfreq(box, 1.0 / box)
    ky, kx = np.meshgrid(frequencies, frequencies, indexing="ij")
    disc = kx * kx + ky * ky < (box / 2) ** 2
    for rot, tilt, psi in ((0, 0, 0), (90, 90, 0), (180, 90, 270), (-90, 180, 90)):
        image = rng.normal(size=(1, box, box))
        batch = random_batch(1, rng, rot=np.array([rot], float), tilt=np.array([tilt], float),
                             psi=np.array([psi], float))
        grid = inserted_grid(engine, image, batch, pad, apply_ctf)
        reconstruction.enforce_hermitian(grid)
        grid = as_numpy(grid)
        centre = box // 2
        expected = np.fft.fft2(image[0].astype(np.float32)) * np.exp(
            2j * np.pi / box * (kx * (centre - batch.origin_x[0]) + ky * (centre - batch.origin_y[0])))
        matrix = euler_to_matrix(np.array(float(rot)), np.array(float(tilt)), np.array(float(psi)))
        points = pad * np.stack([kx[disc], ky[disc], np.zeros(disc.sum())], axis=-1) @ matrix  # A^T k, (x, y, z)
        lattice = np.rint(points).astype(np.int64)
        assert np.abs(points - lattice).max() < 1e-9
        folded = np.where(lattice[:, :1] < 0, -lattice, lattice)
        sign = np.where(lattice[:, 0] < 0, -1.0, 1.0)
        voxels = grid[folded[:, 2] + half, folded[:, 1] + half, folded[:, 0]]
        data = voxels[:, 0] + 1j * sign * voxels[:, 1]
        weight = voxels[:, 2]
        spectrum = expected[disc]
        scale = np.abs(spectrum).max()
        if apply_ctf:
            # C = data / S is real, and its square is the weight
            ctf = data / spectrum
            assert np.abs(ctf.imag).max() < 1e-5 * np.abs(ctf.real).max()
            np.testing.assert_allclose(ctf.real ** 2, weight, rtol=1e-4, atol=1e-6)
            assert weight.min() < 0.5 * weight.max()  # the CTF varies: it was applied
        else:
            np.testing.assert_allclose(weight, 1.0, rtol=0, atol=1e-12)
            np.testing.assert_allclose(data / weight, spectrum, rtol=0, atol=1e-5 * scale)
        touched = np.zeros(grid.shape[:3], dtype=bool)
        touched[folded[:, 2] + half, folded[:, 1] + half, folded[:, 0]] = True
        touched[padded - folded[:, 2] - half, padded - folded[:, 1] - half, 0] |= folded[:, 0] == 0
        assert np.abs(grid[~touched]).max() < 1e-9 * scale


def relion_blob_profile(radius: float = 3.8, alpha: float = 15.0) -> np.ndarray:
    """RELION's gridding blob (Kaiser-Bessel, order 0, ``--blob_r 1.9`` on the twice padded
    grid, ``--blob_a 15``) at offsets -3..3 along one axis, normalised to sum 1."""
    offsets = np.arange(-3, 4)
    values = np.i0(alpha * np.sqrt(1 - (offsets / radius) ** 2))
    return values / values.sum()


@pytest.mark.parametrize("engine", ENGINES)
def test_gridding_weight_is_the_iterated_density_correction(engine: str) -> None:
    """The gridding weight ``M`` against a brute-force evaluation on the full transform
    (both Friedel halves, scipy's convolution): with ``w = W / mean(W)`` over the sphere
    ``|K| < h`` and ``v = 1`` there, each iteration sets ``v <- v / max(S(v w) / S(sphere),
    1e-3)`` inside the sphere, ``S`` the 3D convolution with RELION's blob profile along each
    axis; then ``M = v / mean(W)``. Weights stored outside the sphere do not count. A
    uniform weight gives ``M = 1 / W`` everywhere inside, up to the surface; no iterations
    give the plain ``1 / (W + 1e-3 mean(W))``."""
    from scipy.ndimage import convolve1d

    half = 12
    rng = np.random.default_rng(8)
    data, weight = full_hermitian(rng, half)
    weight += 0.1
    axis = np.arange(-half, half + 1)
    inside = axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2 < half * half
    profile = relion_blob_profile()

    def smooth(values: np.ndarray) -> np.ndarray:
        for dimension in range(3):
            values = convolve1d(values, profile, axis=dimension, mode="constant")
        return values

    def multiplier(grid: np.ndarray, iterations: int) -> np.ndarray:
        """M = scale * density / W, as the weighting applies it."""
        source = grid if engine == "numba" else torch.from_numpy(grid)
        density, scale = reconstruction.gridding_multiplier(source, iterations, 1e-3)
        stored = grid[:, :, :half + 1, 2]
        return np.where(stored > 0, as_numpy(density) * scale / np.where(stored > 0, stored, 1), 0)

    mean = weight[inside].mean()
    sphere = smooth(inside.astype(np.float64)) + ~inside  # the smoothed sphere (1 outside: not used)
    expected = inside.astype(np.float64)
    for _ in range(6):
        density = smooth(expected * np.where(inside, weight / mean, 0)) / sphere
        expected = np.where(inside, expected / np.maximum(density, 1e-3), 0)
    expected /= mean
    got = multiplier(half_grid_of(data, weight), 6)
    assert got.shape == (2 * half + 1, 2 * half + 1, half + 1)
    np.testing.assert_allclose(got, expected[:, :, half:], rtol=1e-5, atol=0)  # float32
    assert np.abs(got - 1 / weight[:, :, half:]).max() > 0.1 * np.abs(1 / weight).max()  # not the plain 1 / W
    np.testing.assert_allclose(multiplier(half_grid_of(data, weight), 0),
                               np.where(inside, 1 / (weight + 1e-3 * mean), 0)[:, :, half:], rtol=1e-5, atol=0)
    uniform = np.full_like(weight, 5.0)
    np.testing.assert_allclose(multiplier(half_grid_of(data, uniform), 6), np.where(inside, 0.2, 0)[:, :, half:],
                               rtol=1e-5, atol=0)


def test_grid_operations_agree_between_engines() -> None:
    """The numba and torch code of each grid operation (symmetrisation, mean weight,
    division, inverse transform, mask and gridding correction) give the same map from the
    same accumulated grid."""
    from cryosieve.symmetry import symmetry_matrices

    box, pad = 12, 2
    rng = np.random.default_rng(5)
    data, weight = full_hermitian(rng, pad * box // 2)
    grid = half_grid_of(data, weight * 10)
    for symmetry in ("C1", "C3", "D2"):
        rotations = symmetry_matrices(symmetry)
        numba_map = reconstruction.finish_grid(grid.copy(), box, pad, rotations)
        torch_map = reconstruction.finish_grid(torch.from_numpy(grid.copy()), box, pad, rotations)
        assert numba_map.shape == torch_map.shape == (box,) * 3 and torch_map.dtype == np.float32
        np.testing.assert_allclose(torch_map, numba_map, rtol=0, atol=1e-5 * np.abs(numba_map).max())
    with pytest.raises(CryoSieveInputError, match="not for box 16 padded 2 times"):
        reconstruction.grid_to_map(grid, 16, pad)


def test_numba_engine_does_not_import_torch(small: Simulated, tmp_path: Path) -> None:
    """The CPU reconstruction (engine auto or numba) runs without importing torch; the torch
    engine does import it."""
    for engine, imports_torch in (("auto", False), ("torch", True)):
        code = ("import sys\n"
                "from cryosieve.reconstruct import reconstruct_star_file\n"
                f"reconstruct_star_file({str(small.star)!r}, {str(tmp_path / (engine + '.mrc'))!r}, "
                f"directory={str(small.folder)!r}, engine={engine!r})\n"
                "print('torch' in sys.modules)\n")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == str(imports_torch), (engine, result.stdout)
    np.testing.assert_allclose(mrcfile.read(tmp_path / "torch.mrc"), mrcfile.read(tmp_path / "auto.mrc"), rtol=0,
                               atol=1e-5 * np.abs(mrcfile.read(tmp_path / "auto.mrc")).max())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_equals_cpu(small: Simulated) -> None:
    cpu = ours(small, symmetry="D2")
    gpu = ours(small, symmetry="D2", device="cuda")
    np.testing.assert_allclose(gpu, cpu, rtol=0, atol=1e-5 * np.abs(cpu).max())


def test_ctf_b_factor_and_scale_are_applied(small: Simulated, tmp_path: Path) -> None:
    """rlnCtfBfactor / rlnCtfScalefactor enter C (as in RELION): a global B-factor B
    multiplies C S by exp(-B s^2/4) and C^2 by exp(-B s^2/2), so the map is boosted by
    exp(+B s^2/4) where the weight dominates; a global scale c divides the map by c."""
    table = read_particles(small.star)
    base = ours(small)
    frame = starfile.read(small.star, always_dict=True)
    frame["particles"]["rlnCtfScalefactor"] = 2.0
    scaled_star = tmp_path / "scaled.star"
    starfile.write(frame, scaled_star, overwrite=True)
    shutil.copy(small.folder / "particles.mrcs", tmp_path / "particles.mrcs")
    scaled = ours(Simulated(tmp_path, scaled_star, small.truth, small.box))
    # D/(W + lambda) with lambda relative to the mean weight: exactly half.
    np.testing.assert_allclose(scaled, base / 2, rtol=0, atol=1e-5 * np.abs(base).max())
    frame["particles"]["rlnCtfScalefactor"] = 1.0
    frame["particles"]["rlnCtfBfactor"] = 50.0
    blurred_star = tmp_path / "blurred.star"
    starfile.write(frame, blurred_star, overwrite=True)
    sharpened = ours(Simulated(tmp_path, blurred_star, small.truth, small.box))
    ratio = shell_amplitude_ratio(sharpened, base)
    shells = np.arange(ratio.size)
    expected = np.exp(50.0 * (shells / (small.box * VOXEL)) ** 2 / 4)
    assert np.all(np.abs(ratio[1:12] / expected[1:12] - 1) < 0.05), (ratio, expected)
    assert len(table) == 300


def test_bad_library_input(small: Simulated) -> None:
    table = read_particles(small.star)
    reader = StackReader(table, small.folder)
    with pytest.raises(CryoSieveInputError, match="no particles selected"):
        reconstruct(table, reader, rows=np.array([], dtype=np.int64))
    with pytest.raises(CryoSieveInputError, match="no particles with rlnRandomSubset 3"):
        reconstruct_subsets(table, reader, subsets=(1, 3))
    with pytest.raises(CryoSieveInputError, match=r"^symmetry Q: unknown symmetry"):
        reconstruct(table, reader, symmetry="Q")
    with pytest.raises(CryoSieveInputError, match="engine 'fast': expected one of auto, numba, torch"):
        reconstruct(table, reader, engine="fast")
    with pytest.raises(CryoSieveInputError, match="engine numba: runs on the CPU only"):
        reconstruct_subsets(table, reader, engine="numba", device="cuda")
    with pytest.raises(CryoSieveInputError, match="engine 'gpu'"):
        reconstruct_star_file(str(small.star), str(small.folder / "never.mrc"), directory=str(small.folder),
                              engine="gpu")
    assert not (small.folder / "never.mrc").exists()


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def test_command_line_writes_the_same_map(small: Simulated, tmp_path: Path) -> None:
    output = tmp_path / "out" / "half1.mrc"
    code = main(["--i", str(small.star), "--o", str(output), "--ctf", "true", "--subset", "1", "--sym", "c2",
                 "--directory", str(small.folder), "--device", "cpu", "--quiet"])
    assert code == 0
    table = read_particles(small.star)
    expected = reconstruct(table, StackReader(table, small.folder), rows=table.random_subset == 1, symmetry="C2")
    with mrcfile.open(output) as handle:
        np.testing.assert_array_equal(handle.data, expected)
        assert handle.voxel_size.x == pytest.approx(VOXEL)
    # python -m, from the particles' folder, "--ctf" alone, logging on stderr
    second = tmp_path / "all.mrc"
    result = subprocess.run([sys.executable, "-m", "cryosieve.cli.reconstruct", "--i", "particles.star",
                             "--o", str(second), "--ctf", "--batch_size", "100"],
                            cwd=small.folder, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "reconstructing 300 particles" in result.stderr and "wrote" in result.stderr
    np.testing.assert_array_equal(mrcfile.read(second), reconstruct(table, StackReader(table, small.folder)))
    # --ctf false: no CTF correction
    third = tmp_path / "plain.mrc"
    assert main(["--i", str(small.star), "--o", str(third), "--ctf", "false", "--directory", str(small.folder),
                 "--quiet"]) == 0
    np.testing.assert_array_equal(mrcfile.read(third),
                                  reconstruct(table, StackReader(table, small.folder), apply_ctf=False))


def test_relion_30_star_with_angpix(small: Simulated, tmp_path: Path) -> None:
    """A RELION 3.0 STAR file (origins in pixels, optics per particle) gives the same map."""
    frame = starfile.read(small.star, always_dict=True)
    particles = frame["particles"].copy()
    particles["rlnOriginX"] = particles.pop("rlnOriginXAngst") / VOXEL
    particles["rlnOriginY"] = particles.pop("rlnOriginYAngst") / VOXEL
    particles = particles.drop(columns=["rlnOpticsGroup"]).assign(
        rlnVoltage=300.0, rlnSphericalAberration=2.7, rlnAmplitudeContrast=0.1)
    old_star = tmp_path / "relion30.star"
    starfile.write({"images": particles}, old_star, overwrite=True)
    output = tmp_path / "old.mrc"
    assert main(["--i", str(old_star), "--o", str(output), "--ctf", "--angpix", str(VOXEL),
                 "--directory", str(small.folder), "--quiet"]) == 0
    table = read_particles(small.star)
    expected = reconstruct(table, StackReader(table, small.folder))
    np.testing.assert_allclose(mrcfile.read(output), expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    assert mrcfile.open(output).voxel_size.x == pytest.approx(VOXEL)
    missing = tmp_path / "no_angpix.mrc"
    assert main(["--i", str(old_star), "--o", str(missing), "--directory", str(small.folder), "--quiet"]) == 2
    assert not missing.exists()


def _bad_inputs(small: Simulated, folder: Path) -> dict[str, tuple[list[str], str]]:
    frame = starfile.read(small.star, always_dict=True)
    no_angle = folder / "no_angle.star"
    starfile.write({"optics": frame["optics"], "particles": frame["particles"].drop(columns=["rlnAngleTilt"])},
                   no_angle, overwrite=True)
    no_subset = folder / "no_subset.star"
    starfile.write({"optics": frame["optics"], "particles": frame["particles"].drop(columns=["rlnRandomSubset"])},
                   no_subset, overwrite=True)
    # two stacks of different box sizes
    shutil.copy(small.folder / "particles.mrcs", folder / "particles.mrcs")
    with mrcfile.new(str(folder / "other.mrcs"), overwrite=True) as handle:
        handle.set_data(np.zeros((5, 40, 40), dtype=np.float32))
    mixed_particles = frame["particles"].copy()
    mixed_particles.loc[:4, "rlnImageName"] = [f"{i + 1:06d}@other.mrcs" for i in range(5)]
    optics = frame["optics"].drop(columns=["rlnImageSize"])
    mixed = folder / "mixed.star"
    starfile.write({"optics": optics, "particles": mixed_particles}, mixed, overwrite=True)
    missing_stack = folder / "missing_stack.star"
    starfile.write({"optics": frame["optics"],
                    "particles": frame["particles"].assign(rlnImageName="1@nowhere.mrcs")},
                   missing_stack, overwrite=True)
    star, directory = str(small.star), str(small.folder)
    return {
        "unknown symmetry": (["--i", star, "--sym", "XYZ", "--directory", directory], "--sym XYZ: unknown symmetry"),
        "empty subset": (["--i", str(no_subset), "--subset", "1", "--directory", directory], "rlnRandomSubset"),
        "missing file": (["--i", str(folder / "absent.star")], "file not found"),
        "missing column": (["--i", str(no_angle), "--directory", directory], "rlnAngleTilt"),
        "inconsistent boxes": (["--i", str(mixed), "--directory", str(folder)], "box size"),
        "missing stack": (["--i", str(missing_stack), "--directory", directory], "not found"),
        "bad ctf value": (["--i", star, "--ctf", "maybe", "--directory", directory], "--ctf maybe"),
        "wrong angpix": (["--i", star, "--angpix", "3.0", "--directory", directory], "--angpix 3.0"),
        "bad batch size": (["--i", star, "--batch_size", "0", "--directory", directory], "--batch_size 0"),
    }


def test_command_line_bad_input(small: Simulated, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name, (arguments, expected) in _bad_inputs(small, tmp_path).items():
        output = tmp_path / f"{name.replace(' ', '_')}.mrc"
        code = main([*arguments, "--o", str(output), "--quiet"])
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert code == 2, name
        assert len(lines) == 1 and lines[0].startswith("cryosieve-reconstruct: error:"), (name, captured.err)
        assert expected in lines[0], (name, lines[0])
        assert not output.exists(), name
        assert not list(tmp_path.glob(f".{output.name}*")), name  # no temporary left behind
    # an empty half-set, through python -m
    frame = starfile.read(small.star, always_dict=True)
    only_first = tmp_path / "only_first.star"
    starfile.write({"optics": frame["optics"], "particles": frame["particles"].assign(rlnRandomSubset=1)},
                   only_first, overwrite=True)
    output = tmp_path / "empty.mrc"
    result = subprocess.run([sys.executable, "-m", "cryosieve.cli.reconstruct", "--i", str(only_first), "--o",
                             str(output), "--subset", "2", "--directory", str(small.folder)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"cryosieve-reconstruct: error: --subset 2: no particles with rlnRandomSubset 2 in {only_first}"]
    assert not output.exists()
