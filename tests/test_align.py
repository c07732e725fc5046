"""The built-in gold-standard local refinement (:mod:`cryosieve.align`) against known truth.

Simulated particles (``cryosieve.simulate``) are the truth; their STAR poses are then turned by 5-15
degrees and their origins moved by 3-5 pixels (``align_data.misalign``), and the refinement must bring them
back, leave the others where they are, keep the two half-sets apart to the bit, and make a map as close to
the truth as the true poses do. The SNR 0.05 cases at box 128 are long (``slow``).
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch
from scipy.spatial.transform import Rotation

from align_data import Misaligned, misalign, simulate
from cryosieve.align import (
    GoldStandardSettings,
    SearchSettings,
    angle_between,
    half_reference,
    noise_spectrum,
    refine_gold_standard,
    search_levels,
)
from cryosieve.align._kernels import quadratic_peak, subpixel
from cryosieve.align.orientations import lattice, neighbours, quadratic_fit, quadratic_terms, rotation_matrices
from cryosieve.align.search import _search_numba, _search_torch, _terms
from cryosieve.align.spectra import Band
from cryosieve.batch import ParticleBatch
from cryosieve.cli.refine import main as refine_main
from cryosieve.cli.rhbfactor import main as rh_main
from cryosieve.fsc import fourier_shell_correlation
from cryosieve.geometry import euler_to_matrix
from cryosieve.io.mrc import read_volume
from cryosieve.io.stack import StackReader
from cryosieve.io.star import read_particles

BOX, PIXEL = 48, 3.3


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 noiseless particles of box 48 (no envelope); their STAR file holds the true poses."""
    return simulate(tmp_path_factory.mktemp("clean") / "data", 200, BOX, PIXEL, math.inf, bfactor=(0.0, 0.0))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Misaligned:
    """200 particles of box 48 at SNR 1, 40 % of them misaligned."""
    star = simulate(tmp_path_factory.mktemp("small") / "data", 200, BOX, PIXEL, 1.0, bfactor=(0.0, 0.0))
    return misalign(star, star.parent / "misaligned.star", 0.4)


@pytest.fixture(scope="module")
def clean_misaligned(clean: Path) -> Misaligned:
    return misalign(clean, clean.parent / "misaligned.star", 0.4)


def errors(particles: object, data: Misaligned) -> tuple[np.ndarray, np.ndarray]:
    """Each particle's angle (degrees) and origin (pixels) from the truth."""
    matrices = euler_to_matrix(particles.rot, particles.tilt, particles.psi)  # type: ignore[attr-defined]
    origin = np.stack([particles.origin_x, particles.origin_y], axis=1)  # type: ignore[attr-defined]
    return angle_between(matrices, data.truth), np.linalg.norm(origin - data.origin, axis=1)


def refine(star: Path, mask: np.ndarray | None, iterations: int, **search: object) -> object:
    table = read_particles(star)
    with StackReader(table, star.parent) as reader:
        return refine_gold_standard(table, reader, mask, GoldStandardSettings(
            search=SearchSettings(**search), iterations=iterations))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- geometry of the search


def test_rotation_vectors_and_angles_match_scipy() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 3)) * rng.uniform(0, 1, (50, 1))
    np.testing.assert_allclose(rotation_matrices(vectors), Rotation.from_rotvec(vectors).as_matrix(), atol=1e-12)
    given = Rotation.random(50, random_state=1).as_matrix()
    turned = rotation_matrices(vectors) @ given
    np.testing.assert_allclose(angle_between(turned, given), np.degrees(np.linalg.norm(vectors, axis=1)), atol=1e-6)
    points = lattice(3.0)
    assert len(points) == 123 and np.array_equal(points[0], [0, 0, 0])  # the integer points of a ball of radius 3
    assert len(neighbours()) == 27 and np.array_equal(neighbours()[0], [0, 0, 0])


def test_quadratic_peak_and_parabola_find_known_maxima() -> None:
    hessian = np.array([[-2.0, 0.3, 0.1], [0.3, -1.0, -0.2], [0.1, -0.2, -0.5]])
    peak = np.array([0.3, -0.4, 0.25])
    pattern = neighbours()
    values = np.array([0.5 * (x - peak) @ hessian @ (x - peak) + 7.0 for x in pattern])
    np.testing.assert_allclose(quadratic_peak(quadratic_fit(pattern) @ values), peak, atol=1e-9)
    assert quadratic_terms(pattern).shape == (27, 10)
    assert quadratic_peak(quadratic_fit(pattern) @ -values) == (0.0, 0.0, 0.0)  # a minimum: no peak
    assert subpixel(1.0, 2.0, 1.5) == pytest.approx(0.5 * (1.0 - 1.5) / (1.0 - 4.0 + 1.5))
    assert subpixel(-math.inf, 2.0, 1.5) == 0.0


def test_levels_go_from_the_coarse_step_down_to_the_finest() -> None:
    levels = search_levels(15.0, 0.5, 2.0, 150.0, 40.0, 128, 1.25)
    assert levels.steps[-1] == 0.5 and np.allclose(levels.steps[1:] / levels.steps[:-1], 0.5)
    assert 3.75 <= levels.steps[0] <= 5.0
    assert levels.frequencies[-1] == 40.0 and np.all(np.diff(levels.frequencies) >= 0)
    coarse = search_levels(15.0, 0.5, 8.0, 150.0, 20.0, 128, 1.25)  # 8 Å supports steps of 1.53 degrees only
    assert coarse.finest == pytest.approx(math.degrees(8.0 / 300.0))


# --------------------------------------------------------------------------- one search


def test_a_noiseless_image_is_the_ctf_times_the_slice_of_its_pose(clean: Path) -> None:
    """The conventions the search rests on (origin sign, centring, CTF, slice orientation): a noiseless
    simulated image's band samples, moved by its origin, equal the CTF times the true map's slice of its pose."""
    from cryosieve.align.slices import slices
    from cryosieve.align.spectra import ctf_on, observed
    from cryosieve.projection import FourierSliceProjector

    table = read_particles(clean)
    rows = np.arange(8)
    band = Band.of(BOX, 18.0)
    inside = band.inside()
    with StackReader(table, clean.parent) as reader:
        images = torch.from_numpy(reader.read(rows))
    batch = ParticleBatch.from_table(table, rows)
    samples = observed(images, batch, band)[:, inside]
    projector = FourierSliceProjector(torch.from_numpy(mrcfile.read(clean.parent / "truth.mrc")))
    ky, kx = (np.broadcast_to(values, band.shape)[inside] for values in (band.ky[:, None], band.kx[None, :]))
    model = ctf_on(batch, band, "cpu")[:, inside] * slices(
        projector, euler_to_matrix(table.rot[rows], table.tilt[rows], table.psi[rows]), ky, kx)
    error = (samples - model).abs().pow(2).sum() / model.abs().pow(2).sum()
    assert float(error) < 1e-4
    shifted = ParticleBatch.from_table(table.with_values(origin_x=table.origin_x + 1.0), rows)
    moved = observed(images, shifted, band)[:, inside]
    assert float((moved - model).abs().pow(2).sum() / model.abs().pow(2).sum()) > 0.1  # a pixel off is far off


def test_torch_engine_equals_numba_engine(clean_misaligned: Misaligned) -> None:
    """The batched tensor search (CUDA's path), run on the CPU, finds what the numba kernel finds."""
    table = read_particles(clean_misaligned.star)
    folder = clean_misaligned.folder
    rows = np.arange(24)
    half1, half2 = (mrcfile.read(folder / "truth.mrc"),) * 2
    mask = read_volume(folder / "mask.mrc").data
    reference = half_reference(half1, (half1, half2), mask, PIXEL, 30.0)
    reference.limit = 20.0
    with StackReader(table, folder) as reader:
        noise = noise_spectrum(table, reader, rows, reference.projector("cpu"), reference.limit)
        images = torch.from_numpy(reader.read(rows))
    levels = search_levels(15.0, 0.5, BOX * PIXEL / reference.limit, 150.0, reference.limit, BOX, PIXEL)
    band = Band.of(BOX, reference.limit)
    data, weight = _terms(ParticleBatch.from_table(table, rows), images, band,
                          torch.from_numpy(noise.weights(band).astype(np.float32)))
    given = euler_to_matrix(table.rot[rows], table.tilt[rows], table.psi[rows])
    projector = reference.projector("cpu")
    numba_found = _search_numba(projector, data, weight, band, given, levels, 5.0)
    torch_found = _search_torch(projector, data, weight, band, given, levels, 5.0)
    # float32 sums in another order: near the edge of the shift range (5 px) two shifts may tie
    inside = numba_found.distance() < 4.5
    assert inside.sum() >= 20
    np.testing.assert_allclose(torch_found.vector[inside], numba_found.vector[inside], atol=1e-4)  # radians
    np.testing.assert_allclose(torch_found.shift[inside], numba_found.shift[inside], atol=1e-3)  # pixels
    np.testing.assert_allclose(torch_found.score, numba_found.score, rtol=1e-4)
    assert np.median(numba_found.angle()[clean_misaligned.turned[rows]]) > 3  # they did turn


# --------------------------------------------------------------------------- the refinement, noiseless


def test_true_poses_stay_noiseless(clean: Path) -> None:
    """Noiseless particles given their true poses: none moves by more than the finest step, nor its origin by
    more than a tenth of a pixel."""
    outcome = refine(clean, read_volume(clean.parent / "mask.mrc").data, iterations=1)
    finest = min(outcome.history[0].finest_step.values())  # type: ignore[attr-defined]
    assert np.max(outcome.angle) <= finest, (np.max(outcome.angle), finest)  # type: ignore[attr-defined]
    assert np.max(np.hypot(*outcome.shift.T)) < 0.1  # type: ignore[attr-defined]


def test_misaligned_particles_come_back_noiseless(clean_misaligned: Misaligned) -> None:
    data = clean_misaligned
    outcome = refine(data.star, read_volume(data.folder / "mask.mrc").data, iterations=3)
    angle, origin = errors(outcome.particles, data)  # type: ignore[attr-defined]
    assert np.median(angle[data.turned]) < 0.5 and np.percentile(angle[data.turned], 90) < 1.0, angle[data.turned]
    assert np.median(origin[data.shifted]) < 0.05 and origin.max() < 0.5
    assert np.median(angle[~data.turned]) < 0.5


# --------------------------------------------------------------------------- gold standard


def test_one_half_set_never_sees_the_other(small: Misaligned, tmp_path: Path) -> None:
    """Changing the images of half-set 2 (noise added) leaves every pose and origin of half-set 1 unchanged, bit
    for bit, over two iterations, with each half-set's own mask (none given)."""
    data = small
    folder = tmp_path / "changed"
    folder.mkdir()
    shutil.copy(data.star, folder / "misaligned.star")
    table = read_particles(data.star)
    images = mrcfile.read(data.folder / "particles.mrcs").copy()
    second = table.random_subset == 2
    images[table.image_index[second]] += np.random.default_rng(3).normal(
        0, images.std(), images[table.image_index[second]].shape).astype(np.float32)
    with mrcfile.new(str(folder / "particles.mrcs")) as handle:
        handle.set_data(images)
        handle.voxel_size = PIXEL
    first = refine(data.star, None, iterations=2)
    changed = refine(folder / "misaligned.star", None, iterations=2)
    one = table.random_subset == 1
    for name in ("rot", "tilt", "psi", "origin_x", "origin_y"):
        np.testing.assert_array_equal(getattr(first.particles, name)[one],  # type: ignore[attr-defined]
                                      getattr(changed.particles, name)[one])  # type: ignore[attr-defined]
        assert not np.array_equal(getattr(first.particles, name)[second],  # type: ignore[attr-defined]
                                  getattr(changed.particles, name)[second])  # type: ignore[attr-defined]
    np.testing.assert_array_equal(first.maps[1], changed.maps[1])  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- the commands


def test_refine_command_leaves_relions_files(small: Misaligned, tmp_path: Path) -> None:
    data = small
    out = tmp_path / "out"
    out.mkdir()
    code = refine_main(["--i", str(data.star), "--o", str(out / "s.csv"), "--directory", str(data.folder),
                        "--backend", "builtin", "--iterations", "2", "--quiet"])
    assert code == 0
    summary = pd.read_csv(out / "s.csv")
    assert not summary["fixed pose"].iloc[0] and summary["number of particles"].iloc[0] == 200
    job = out / "s_jobs" / "01_misaligned_trial1"
    assert Path(summary["alignment3D"].iloc[0]) == job / "run_data.star"
    for name in ("run_data.star", "run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc", "run_moves.csv",
                 "run_iterations.csv", "postprocess/postprocess.json", "mask.mrc"):
        assert (job / name).is_file(), name
    given = starfile.read(data.star, always_dict=True)
    refined = starfile.read(job / "run_data.star", always_dict=True)
    assert list(refined["particles"].columns) == list(given["particles"].columns)
    pd.testing.assert_frame_equal(refined["optics"], given["optics"])
    kept = [name for name in given["particles"].columns if "Angle" not in name and "Origin" not in name]
    pd.testing.assert_frame_equal(refined["particles"][kept], given["particles"][kept])
    angle, origin = errors(read_particles(job / "run_data.star"), data)
    assert np.median(angle[data.turned]) < 3.0 and np.median(origin[data.shifted]) < 0.5  # from 10 and 4
    np.testing.assert_allclose(refined["particles"]["rlnOriginXAngst"] / PIXEL,
                               read_particles(job / "run_data.star").origin_x)
    moves = pd.read_csv(job / "run_moves.csv")
    assert list(moves["rlnImageName"]) == list(given["particles"]["rlnImageName"])
    assert np.median(moves["angle_degrees"][data.turned]) > 4 and np.median(moves["origin_pixels"][data.shifted]) > 2.5
    with mrcfile.open(job / "run_half1_class001_unfil.mrc") as handle:
        assert handle.data.shape == (BOX,) * 3 and float(handle.voxel_size.x) == pytest.approx(PIXEL)


@pytest.mark.slow
def test_rhbfactor_with_the_builtin_refinement(small: Misaligned, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    code = rh_main(["--i", str(small.star), "--o", str(out / "rh.csv"), "--directory", str(small.folder), "--backend",
                    "builtin", "--iterations", "1", "--halves", "1", "--quiet"])
    assert code == 0
    raw = pd.read_csv(out / "rh_raw.csv")
    assert sorted(raw["number of particles"]) == [100, 200] and not raw["fixed pose"].any()
    assert (out / "rh_rh.png").is_file()


@pytest.mark.slow
def test_pipeline_validates_each_set_with_the_builtin_refinement(small: Misaligned, tmp_path: Path) -> None:
    """``cryosieve --validate builtin``: each round's set is refined again by the built-in refinement (poses
    re-estimated, not fixed) in ``PREFIX_validate/``; the first set's misaligned particles come back towards their
    true poses, and its map with the poses re-estimated is at least as good as the pipeline's own with the given
    ones (40 % of them off by 5-15 degrees)."""
    from cryosieve.cli.pipeline import main as pipeline_main

    prefix = str(tmp_path / "run") + "/"
    code = pipeline_main(["--i", str(small.star), "--o", prefix, "--mask", str(small.folder / "mask.mrc"),
                          "--directory", str(small.folder), "--num_iters", "1", "--frequency_start", "20",
                          "--frequency_end", "20", "--retention_ratio", "0.9", "--validate", "builtin", "--device",
                          "cpu", "--quiet"])
    assert code == 0
    summary = pd.read_csv(prefix + "_summary.csv")
    assert len(summary) == 2 and np.isfinite(summary["validated_resolution_angstrom"]).all()
    assert summary["validated_resolution_angstrom"][0] <= summary["resolution_angstrom"][0]
    job = Path(prefix + "_validate") / "set0_half0"
    for name in ("run_data.star", "run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc", "run_moves.csv"):
        assert (job / name).is_file(), name
    angle, origin = errors(read_particles(job / "run_data.star"), small)
    assert np.median(angle[small.turned]) < 3.0 and np.median(origin[small.shifted]) < 0.5  # from 10 and 4
    assert "built-in gold-standard local refinement" in Path(prefix + "_report.html").read_text()


@pytest.mark.parametrize(("extra", "message"), [
    (["--search_range", "0"], "--search_range 0.0: must be in (0, 180] degrees"),
    (["--angular_step", "20"], "--angular_step 20.0: must not exceed --search_range 15.0"),
    (["--shift_range", "-1"], "--shift_range -1.0: must be in [0, 100] pixels"),
    (["--iterations", "0"], "--iterations 0: must be at least 1"),
    (["--ref", "REF"], "the built-in refinement starts from each half-set's own map"),
])
def test_bad_input_is_one_line_and_writes_nothing(extra: list[str], message: str, clean: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    extra = [str(clean.parent / "truth.mrc") if word == "REF" else word for word in extra]
    code = refine_main(["--i", str(clean), "--o", str(out / "s.csv"), "--directory", str(clean.parent),
                        "--backend", "builtin", "--quiet", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("cryosieve-refine: error:") and message in err[0], err
    assert list(out.iterdir()) == []


# --------------------------------------------------------------------------- SNR 0.05 (long)


@pytest.fixture(scope="module")
def noisy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Misaligned, object]:
    """1,000 particles of box 128 at SNR 0.05, 30 % of them turned by 5-15 degrees and moved by 3-5 pixels,
    refined (3 iterations)."""
    star = simulate(tmp_path_factory.mktemp("noisy") / "data", 1000, 128, 1.25, 0.05)
    data = misalign(star, star.parent / "misaligned.star", 0.3)
    return data, refine(data.star, read_volume(data.folder / "mask.mrc").data, iterations=3)


@pytest.mark.slow
def test_misaligned_particles_come_back_at_snr_005(noisy: tuple[Misaligned, object]) -> None:
    data, outcome = noisy
    angle, origin = errors(outcome.particles, data)  # type: ignore[attr-defined]
    assert np.median(angle[data.turned]) <= 1.5, np.median(angle[data.turned])
    assert np.median(origin[data.shifted]) <= 0.5, np.median(origin[data.shifted])
    assert np.median(outcome.angle[~data.turned]) < 1.0  # type: ignore[attr-defined]  # the others do not drift


@pytest.mark.slow
def test_true_poses_stay_at_snr_005(noisy: tuple[Misaligned, object]) -> None:
    """Particles given their true poses move, in the median, by no more than the finest step."""
    data, outcome = noisy
    finest = max(step for record in outcome.history for step in record.finest_step.values())  # type: ignore
    assert np.median(outcome.angle[~data.turned]) <= finest  # type: ignore[attr-defined]


@pytest.mark.slow
def test_refined_map_is_within_a_shell_of_the_true_poses_map(noisy: tuple[Misaligned, object]) -> None:
    """Against the true map (FSC 0.5), the map of the refined set reaches the shell of the map of the true poses,
    less one at most; the map of the misaligned set as given falls short of it."""
    from cryosieve.reconstruct import reconstruct

    data, outcome = noisy
    truth = mrcfile.read(data.folder / "truth.mrc")
    mask = read_volume(data.folder / "mask.mrc").data

    def shell(volume: np.ndarray) -> int:
        fsc = fourier_shell_correlation(torch.from_numpy(volume * mask), torch.from_numpy(truth * mask)).numpy()
        return int(np.flatnonzero(fsc < 0.5)[0])

    true_table = read_particles(data.folder / "particles.star")
    given_table = read_particles(data.star)
    with StackReader(true_table, data.folder) as reader:
        refined = reconstruct(outcome.particles, reader)  # type: ignore[attr-defined]
        true_map = reconstruct(true_table, reader)
        given_map = reconstruct(given_table, reader)
    assert shell(refined) >= shell(true_map) - 1, (shell(refined), shell(true_map))
    assert shell(given_map) < shell(true_map)


@pytest.mark.slow
def test_torchrun_ranks_give_the_poses_of_one_process(small: Misaligned, tmp_path: Path) -> None:
    """``cryosieve-refine --backend builtin`` under ``torchrun`` with 2 CPU ranks: every rank searches and
    reconstructs its share, and the poses are those of one process (to the float64 sums' order in the maps)."""
    from test_world import run_job, torchrun

    args = ["--i", str(small.star), "--directory", str(small.folder), "--backend", "builtin", "--iterations", "1",
            "--quiet"]
    run_job([sys.executable, "-m", "cryosieve.cli.refine", *args, "--o", str(tmp_path / "one" / "s.csv")], tmp_path)
    result = run_job(torchrun(2, "cryosieve.cli.refine", [*args, "--o", str(tmp_path / "two" / "s.csv")]), tmp_path)
    assert result.returncode == 0, result.stderr
    one, two = (read_particles(tmp_path / name / "s_jobs" / "01_misaligned_trial1" / "run_data.star")
                for name in ("one", "two"))
    matrices = [euler_to_matrix(table.rot, table.tilt, table.psi) for table in (one, two)]
    assert np.max(angle_between(*matrices)) < 1e-3
    np.testing.assert_allclose(two.origin_x, one.origin_x, atol=1e-4)
