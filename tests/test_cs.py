"""``cryosieve.io.cs``: CryoSPARC ``.cs`` particles in and out, against pyem's conventions."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cryosparc.dataset import Dataset

from cryosieve.cli.core import main as core_main
from cryosieve.errors import CryoSieveInputError
from cryosieve.io.cs import particles_to_dataset, read_cs_particles
from cryosieve.io.star import read_particles
from safety_helpers import SmallData, make_small_data


def pyem_expmap(vector: np.ndarray) -> np.ndarray:
    """pyem's ``geom.expmap`` (the matrix ``csparc2star`` decomposes), typed from its formula."""
    theta = np.linalg.norm(vector)
    w = vector / theta
    k = np.array([[0, w[2], -w[1]], [-w[2], 0, w[0]], [w[1], -w[0], 0]])
    return np.identity(3) + math.sin(theta) * k + (1 - math.cos(theta)) * k @ k


def relion_angles(r: np.ndarray) -> tuple[float, float, float]:
    """RELION's ``Euler_matrix2angles`` (as pyem's ``rot2euler``) for a regular matrix, degrees."""
    tilt = math.atan2(math.hypot(r[0, 2], r[1, 2]), r[2, 2])
    psi = math.atan2(r[1, 2], -r[0, 2])
    rot = math.atan2(r[2, 1], r[2, 0])
    return math.degrees(rot), math.degrees(tilt), math.degrees(psi)


def angle_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs((np.asarray(a) - np.asarray(b) + 180.0) % 360.0 - 180.0)


def write_cs(dataset: Dataset, path: Path) -> Path:
    with open(path, "wb") as handle:
        dataset.save(handle)
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> SmallData:
    return make_small_data(tmp_path_factory.mktemp("cs") / "data")


@pytest.fixture(scope="module")
def cs_file(small: SmallData) -> Path:
    """The small data set's particles described as a ``.cs`` file beside its stack."""
    return write_cs(particles_to_dataset(read_particles(small.star), seed=4), small.folder / "particles.cs")


def test_poses_shifts_and_ctf_follow_pyem(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    n = 50
    axis = rng.normal(size=(n, 3))
    pose = axis / np.linalg.norm(axis, axis=1, keepdims=True) * rng.uniform(0.1, 3.0, size=(n, 1))
    dataset = Dataset.allocate(n, [("blob/path", "O"), ("blob/idx", "u4"), ("blob/psize_A", "f4"),
                                   ("alignments3D/pose", "f4", (3,)), ("alignments3D/shift", "f4", (2,)),
                                   ("alignments3D/split", "u4"), ("ctf/df1_A", "f4"), ("ctf/df2_A", "f4"),
                                   ("ctf/df_angle_rad", "f4"), ("ctf/accel_kv", "f4"), ("ctf/cs_mm", "f4"),
                                   ("ctf/amp_contrast", "f4"), ("ctf/phase_shift_rad", "f4")])
    dataset["blob/path"] = np.array(["J12/extract/stack.mrc"] * n, dtype=object)
    dataset["blob/idx"] = np.arange(n)
    dataset["blob/psize_A"] = 1.25
    dataset["alignments3D/pose"] = pose
    dataset["alignments3D/shift"] = rng.normal(size=(n, 2))
    dataset["alignments3D/split"] = np.arange(n) % 2
    dataset["ctf/df1_A"], dataset["ctf/df2_A"] = 15000.0, 14000.0
    dataset["ctf/df_angle_rad"] = rng.uniform(0, math.pi, n)
    dataset["ctf/phase_shift_rad"] = 0.5
    dataset["ctf/accel_kv"], dataset["ctf/cs_mm"], dataset["ctf/amp_contrast"] = 300.0, 2.7, 0.07
    particles = read_cs_particles(write_cs(dataset, tmp_path / "p.cs"))
    stored = np.asarray(dataset["alignments3D/pose"], dtype=np.float64)
    expected = np.array([relion_angles(pyem_expmap(vector)) for vector in stored])
    assert angle_difference(particles.rot, expected[:, 0]).max() < 1e-6
    assert angle_difference(particles.tilt, expected[:, 1]).max() < 1e-6
    assert angle_difference(particles.psi, expected[:, 2]).max() < 1e-6
    np.testing.assert_array_equal(particles.origin_x, np.asarray(dataset["alignments3D/shift"])[:, 0])
    np.testing.assert_array_equal(particles.origin_y, np.asarray(dataset["alignments3D/shift"])[:, 1])
    np.testing.assert_array_equal(particles.random_subset, np.arange(n) % 2 + 1)
    np.testing.assert_allclose(particles.defocus_angle, np.degrees(np.asarray(dataset["ctf/df_angle_rad"])))
    np.testing.assert_allclose(particles.phase_shift, np.degrees(np.float32(0.5)))
    assert particles.image_name[3] == "000004@J12/extract/stack.mrc" and particles.image_index[3] == 3
    assert float(particles.pixel_size[0]) == 1.25


def test_star_and_cs_descriptions_give_the_same_selection(small: SmallData, cs_file: Path, tmp_path: Path) -> None:
    common = ["--directory", str(small.folder), "--volume", str(small.half1), "--volume", str(small.half2), "--mask",
              str(small.mask), "--frequency", "12", "--device", "cpu", "--quiet"]
    assert core_main(["--i", str(small.star), "--o", str(tmp_path / "star" / "kept.star"), *common]) == 0
    assert core_main(["--i", str(cs_file), "--o", str(tmp_path / "cs" / "kept.cs"), *common]) == 0
    star_scores = pd.read_csv(tmp_path / "star" / "kept_scores.csv")
    cs_scores = pd.read_csv(tmp_path / "cs" / "kept_scores.csv")
    assert list(cs_scores.columns) == ["rlnImageName", "uid", "half_set", "score", "kept"]
    assert list(cs_scores["rlnImageName"]) == list(star_scores["rlnImageName"])
    # the .cs stores float32: the scores agree to its precision, the selection exactly
    np.testing.assert_allclose(cs_scores["score"], star_scores["score"], rtol=1e-4,
                               atol=1e-5 * np.abs(star_scores["score"]).max())
    np.testing.assert_array_equal(cs_scores["kept"], star_scores["kept"])
    # rows are a subset: every field and uid of the input, unchanged, nothing re-created
    source = Dataset.load(cs_file)
    kept = Dataset.load(tmp_path / "cs" / "kept.cs")
    sieved = Dataset.load(tmp_path / "cs" / "kept_sieved.cs")
    rows = np.flatnonzero(cs_scores["kept"].to_numpy() == 1)
    assert kept.fields() == source.fields()
    for name in source.fields():
        np.testing.assert_array_equal(np.asarray(kept[name]), np.asarray(source[name])[rows])
    assert len(kept) + len(sieved) == len(source)
    np.testing.assert_array_equal(np.asarray(kept["uid"]), cs_scores["uid"].to_numpy(dtype=np.uint64)[rows])
    # the same input gives the same bytes
    assert core_main(["--i", str(cs_file), "--o", str(tmp_path / "again" / "kept.cs"), *common]) == 0
    assert (tmp_path / "again" / "kept.cs").read_bytes() == (tmp_path / "cs" / "kept.cs").read_bytes()
    # --o x.star converts
    assert core_main(["--i", str(cs_file), "--o", str(tmp_path / "converted" / "kept.star"), *common]) == 0
    converted = read_particles(tmp_path / "converted" / "kept.star")
    original = read_particles(small.star).subset(rows)
    assert list(converted.image_name) == list(original.image_name)
    np.testing.assert_allclose(converted.defocus_u, original.defocus_u, rtol=1e-6)
    assert angle_difference(converted.tilt, original.tilt).max() < 1e-3


def test_passthrough_fields_are_merged_by_uid(small: SmallData, cs_file: Path, tmp_path: Path) -> None:
    full = Dataset.load(cs_file)
    ctf = [name for name in full.fields() if name.startswith("ctf/")]
    main = full.copy().drop_fields(ctf)
    order = np.random.default_rng(0).permutation(len(full))
    passthrough = full.take(order).filter_fields(["uid", *ctf])
    merged = read_cs_particles(write_cs(main, tmp_path / "main.cs"), (str(write_cs(passthrough, tmp_path / "pt.cs")),))
    whole = read_cs_particles(cs_file)
    for name in ("defocus_u", "defocus_v", "defocus_angle", "voltage", "amplitude_contrast", "rot", "origin_x"):
        np.testing.assert_array_equal(getattr(merged, name), getattr(whole, name))
    with pytest.raises(CryoSieveInputError, match="field ctf/df1_A missing"):
        read_cs_particles(tmp_path / "main.cs")
    short = passthrough.take(np.arange(len(passthrough) - 1))
    with pytest.raises(CryoSieveInputError, match="holds no particle of uid"):
        read_cs_particles(tmp_path / "main.cs", (str(write_cs(short, tmp_path / "short.cs")),))


@pytest.mark.parametrize(("drop", "message"), [
    ("alignments3D/pose", "field alignments3D/pose missing"),
    ("blob/path", "field blob/path missing"),
])
def test_missing_fields_are_one_line_errors(small: SmallData, cs_file: Path, tmp_path: Path, drop: str,
                                            message: str, capsys: pytest.CaptureFixture[str]) -> None:
    damaged = write_cs(Dataset.load(cs_file).drop_fields([drop]), small.folder / f"no_{drop.replace('/', '_')}.cs")
    out = tmp_path / "out"
    out.mkdir()
    code = core_main(["--i", str(damaged), "--o", str(out / "kept.cs"), "--directory", str(small.folder),
                      "--volume", str(small.half1), "--volume", str(small.half2), "--frequency", "12", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert list(out.iterdir()) == []
    damaged.unlink()


def test_pipeline_runs_on_cs_input_with_passthrough(small: SmallData, cs_file: Path, tmp_path: Path) -> None:
    """The pipeline on a .cs input (CTF fields in a passthrough file) keeps the same particles round by round as on
    the STAR description, writes every set as .cs rows of the input, and validates them (--validate fixed)."""
    from cryosieve.cli.pipeline import main as pipeline_main

    full = Dataset.load(cs_file)
    ctf = [name for name in full.fields() if name.startswith("ctf/")]
    main_cs = write_cs(full.copy().drop_fields(ctf), tmp_path / "main.cs")
    passthrough = write_cs(full.filter_fields(["uid", *ctf]), tmp_path / "passthrough.cs")
    common = ["--mask", str(small.mask), "--directory", str(small.folder), "--num_iters", "2", "--frequency_start",
              "30", "--frequency_end", "12", "--device", "cpu", "--quiet"]
    assert pipeline_main(["--i", str(small.star), "--o", str(tmp_path / "star") + "/", *common]) == 0
    assert pipeline_main(["--i", str(main_cs), "--passthrough", str(passthrough), "--o", str(tmp_path / "cs") + "/",
                          "--validate", "fixed", *common]) == 0
    for iteration in (1, 2):
        star_scores = pd.read_csv(tmp_path / "star" / f"_iter{iteration}_scores.csv")
        cs_scores = pd.read_csv(tmp_path / "cs" / f"_iter{iteration}_scores.csv")
        np.testing.assert_array_equal(cs_scores["kept"], star_scores["kept"])
        kept = Dataset.load(tmp_path / "cs" / f"_iter{iteration}.cs")
        assert kept.fields() == Dataset.load(main_cs).fields()
        assert set(np.asarray(kept["uid"]).tolist()) <= set(np.asarray(full["uid"]).tolist())
    star_summary = pd.read_csv(tmp_path / "star" / "_summary.csv")
    cs_summary = pd.read_csv(tmp_path / "cs" / "_summary.csv")
    np.testing.assert_allclose(cs_summary["resolution_angstrom"][:2], star_summary["resolution_angstrom"][:2],
                               rtol=0.05)
    assert np.isfinite(cs_summary["validated_resolution_angstrom"]).all()
    assert not (tmp_path / "cs" / "_iter0.star").exists()


def test_pipeline_gives_an_external_reconstruction_a_star_description(small: SmallData, cs_file: Path,
                                                                       tmp_path: Path) -> None:
    from conftest import require
    from cryosieve.cli.pipeline import main as pipeline_main

    require("relion_reconstruct")
    prefix = str(tmp_path / "out") + "/"
    assert pipeline_main(["--i", str(cs_file), "--o", prefix, "--mask", str(small.mask), "--directory",
                          str(small.folder), "--num_iters", "1", "--frequency_start", "20", "--frequency_end", "20",
                          "--reconstruct_software", "relion_reconstruct", "--device", "cpu", "--quiet"]) == 0
    view = read_particles(prefix + "_iter0_relion.star")
    np.testing.assert_array_equal(view.image_name, read_cs_particles(cs_file).image_name)
    assert Path(prefix + "_iter0_half1.mrc").is_file() and Path(prefix + "_iter1.cs").is_file()


def test_new_poses_are_written_back_as_cryosparc_poses(cs_file: Path, tmp_path: Path) -> None:
    particles = read_cs_particles(cs_file)
    rng = np.random.default_rng(8)
    n = len(particles)
    rot, tilt, psi = rng.uniform(-180, 180, n), rng.uniform(1, 179, n), rng.uniform(-180, 180, n)
    origin_x, origin_y = rng.uniform(-4, 4, n), rng.uniform(-4, 4, n)
    particles.with_poses(rot, tilt, psi, origin_x, origin_y).write(tmp_path / "out.cs")
    back = read_cs_particles(tmp_path / "out.cs")
    expected = np.array([relion_angles(pyem_expmap(vector))
                         for vector in np.asarray(Dataset.load(str(tmp_path / "out.cs"))["alignments3D/pose"],
                                                  dtype=np.float64)])
    assert angle_difference(expected[:, 0], rot).max() < 1e-3  # float32 fields
    assert angle_difference(back.tilt, tilt).max() < 1e-3
    assert angle_difference(back.psi, psi).max() < 1e-3
    np.testing.assert_allclose(back.origin_x, origin_x, atol=1e-5)
    np.testing.assert_array_equal(back.source.uid, particles.source.uid)
    np.testing.assert_array_equal(back.defocus_u, particles.defocus_u)
