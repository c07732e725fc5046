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


def test_exported_paths_are_read_as_cryosparc_means_them(small: SmallData, cs_file: Path, tmp_path: Path) -> None:
    """A job or result group exported by CryoSPARC lies in a folder of its own, its data beside the ``.cs`` file,
    every ``blob/path`` marked with a leading ``>`` (which CryoSPARC removes when it imports them)."""
    export = tmp_path / "exports" / "groups" / "P3_J42_particles"
    (export / "J40" / "extract").mkdir(parents=True)
    dataset = Dataset.load(cs_file)
    files = sorted({str(value) for value in np.asarray(dataset["blob/path"])})
    for file in files:
        (export / "J40" / "extract" / Path(file).name).write_bytes((small.folder / file).read_bytes())
    dataset["blob/path"] = np.array([f">J40/extract/{Path(str(value)).name}" for value in dataset["blob/path"]],
                                    dtype=object)
    exported = write_cs(dataset, export / "P3_J42_particles_exported.cs")
    particles = read_cs_particles(exported)
    assert {Path(file) for file in particles.image_file} == {export / "J40" / "extract" / Path(file).name
                                                              for file in files}
    common = ["--volume", str(small.half1), "--volume", str(small.half2), "--mask", str(small.mask), "--frequency",
              "12", "--device", "cpu", "--quiet"]
    elsewhere = tmp_path / "project"  # --directory does not matter for these paths
    elsewhere.mkdir()
    assert core_main(["--i", str(cs_file), "--directory", str(small.folder), "--o", str(tmp_path / "a" / "kept.cs"),
                      *common]) == 0
    assert core_main(["--i", str(exported), "--directory", str(elsewhere), "--o", str(tmp_path / "b" / "kept.cs"),
                      *common]) == 0
    np.testing.assert_array_equal(pd.read_csv(tmp_path / "a" / "kept_scores.csv")["kept"],
                                  pd.read_csv(tmp_path / "b" / "kept_scores.csv")["kept"])
    # a subset written to another folder still names the same images
    kept = read_cs_particles(tmp_path / "b" / "kept.cs")
    assert all(str(value).startswith(">") for value in Dataset.load(tmp_path / "b" / "kept.cs")["blob/path"])
    assert {Path(file).resolve() for file in kept.image_file} <= {Path(file).resolve()
                                                                   for file in particles.image_file}


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


@pytest.mark.slow
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


def test_pipeline_realigns_cs_input_and_writes_the_poses_as_cs_rows(small: SmallData, cs_file: Path,
                                                                     tmp_path: Path) -> None:
    """``--realign`` on a .cs input: the realigned set and the next sets are .cs rows of the input (every field
    kept) with the new poses and shifts, read back as the same poses; the STAR description of the same particles
    gives the same poses."""
    from cryosieve.cli.pipeline import main as pipeline_main

    common = ["--mask", str(small.mask), "--directory", str(small.folder), "--num_iters", "1", "--frequency_start",
              "30", "--frequency_end", "30", "--realign", "1", "--device", "cpu", "--quiet"]
    assert pipeline_main(["--i", str(cs_file), "--o", str(tmp_path / "cs") + "/", *common]) == 0
    assert pipeline_main(["--i", str(small.star), "--o", str(tmp_path / "star") + "/", *common]) == 0
    realigned = Dataset.load(tmp_path / "cs" / "_iter0_realigned.cs")
    assert realigned.fields() == Dataset.load(cs_file).fields() and len(realigned) == len(Dataset.load(cs_file))
    given = read_cs_particles(cs_file)
    from_cs = read_cs_particles(tmp_path / "cs" / "_iter0_realigned.cs")
    from_star = read_particles(tmp_path / "star" / "_iter0_realigned.star")
    assert np.any(np.abs(from_cs.origin_x - given.origin_x) > 0.01)  # the poses did change
    # the same rotations (the .cs file holds rotation vectors: compared through their matrices)
    from cryosieve.align import angle_between
    from cryosieve.geometry import euler_to_matrix

    turn = angle_between(euler_to_matrix(from_cs.rot, from_cs.tilt, from_cs.psi),
                         euler_to_matrix(from_star.rot, from_star.tilt, from_star.psi))
    assert float(np.max(turn)) < 0.01
    np.testing.assert_allclose(from_cs.origin_x, from_star.origin_x, atol=1e-3)
    kept = read_cs_particles(tmp_path / "cs" / "_iter1.cs")
    rows = {name: row for row, name in enumerate(from_cs.image_name)}
    chosen = np.array([rows[name] for name in kept.image_name])
    np.testing.assert_allclose(kept.origin_y, from_cs.origin_y[chosen], atol=1e-6)


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


# --------------------------------------------------------------------------- values checked as STAR values are


def without_uid(source: Path, target: Path) -> Path:
    """``source`` saved again as a plain numpy record array without its ``uid`` field."""
    records = np.load(source, allow_pickle=False)
    kept = [name for name in records.dtype.names if name != "uid"]
    stripped = np.empty(len(records), dtype=[(name, records.dtype[name]) for name in kept])
    for name in kept:
        stripped[name] = records[name]
    with open(target, "wb") as handle:
        np.save(handle, stripped)
    return target


def with_value(dataset: Dataset, field: str, row: int, value: float) -> Dataset:
    dataset = dataset.copy()
    values = np.array(dataset[field])
    values[row] = value
    dataset[field] = values
    return dataset


def repeated_rows(dataset: Dataset, rows: np.ndarray) -> Dataset:
    """The dataset with ``rows`` appended again (same uids), their defocus changed."""
    extra = dataset.take(rows)
    records = np.concatenate([dataset.to_records(), extra.to_records()])
    repeated = Dataset(records)
    defocus = np.array(repeated["ctf/df1_A"])
    defocus[len(dataset):] += 5000.0
    repeated["ctf/df1_A"] = defocus
    return repeated


def split_ctf(dataset: Dataset, folder: Path) -> tuple[Path, Path]:
    """The dataset as a main file without CTF fields and a passthrough file with them."""
    ctf = [name for name in dataset.fields() if name.startswith("ctf/")]
    return (write_cs(dataset.copy().drop_fields(ctf), folder / "main.cs"),
            write_cs(dataset.filter_fields(["uid", *ctf]), folder / "ctf.cs"))


BAD_CS = {
    # name: (build(full dataset, cs file, folder) -> (main, passthrough files), message fragment)
    "no_uid": (lambda full, cs, folder: (without_uid(cs, folder / "nouid.cs"), []),
               "nouid.cs: field uid missing"),
    "repeated_uid": (lambda full, cs, folder: (write_cs(repeated_rows(full, np.array([3])), folder / "twice.cs"), []),
                     "twice.cs: uid {uid3} appears twice (rows 4 and 241)"),
    "repeated_uid_in_passthrough": (
        lambda full, cs, folder: (split_ctf(full, folder)[0],
                                  [write_cs(repeated_rows(Dataset.load(split_ctf(full, folder)[1]), np.arange(10)),
                                            folder / "ctf_twice.cs")]),
        "ctf_twice.cs: uid {uid0} appears twice (rows 1 and 241)"),
    "nan_shift": (lambda full, cs, folder: (write_cs(with_value(full, "alignments3D/shift", 5, np.nan),
                                                     folder / "nan.cs"), []),
                  "nan.cs: field alignments3D/shift at row 6 (uid {uid5}) holds"),
    "inf_pose": (lambda full, cs, folder: (write_cs(with_value(full, "alignments3D/pose", 7, np.inf),
                                                    folder / "inf.cs"), []),
                 "inf.cs: field alignments3D/pose at row 8 (uid {uid7}) holds inf, inf, inf: not a finite number"),
    "nan_defocus_in_passthrough": (
        lambda full, cs, folder: (split_ctf(with_value(full, "ctf/df2_A", 9, np.nan), folder)[0],
                                  [split_ctf(with_value(full, "ctf/df2_A", 9, np.nan), folder)[1]]),
        "ctf.cs: field ctf/df2_A at row 10 (uid {uid9}) holds nan: not a finite number"),
    "nan_amplitude_contrast": (lambda full, cs, folder: (write_cs(with_value(full, "ctf/amp_contrast", 0, np.nan),
                                                                  folder / "amp.cs"), []),
                               "amp.cs: field ctf/amp_contrast at row 1"),
    "inf_phase_shift": (lambda full, cs, folder: (write_cs(with_value(full, "ctf/phase_shift_rad", 2, -np.inf),
                                                           folder / "phase.cs"), []),
                        "phase.cs: field ctf/phase_shift_rad at row 3"),
    "nan_pixel_size": (lambda full, cs, folder: (write_cs(with_value(full, "blob/psize_A", 4, np.nan),
                                                          folder / "psize.cs"), []),
                       "psize.cs: field blob/psize_A at row 5"),
    "zero_pixel_size": (lambda full, cs, folder: (write_cs(with_value(full, "blob/psize_A", 4, 0.0),
                                                           folder / "psize0.cs"), []),
                        "psize0.cs: field blob/psize_A at row 5 (uid {uid4}): the pixel size must be positive"),
}


@pytest.mark.parametrize("case", sorted(BAD_CS))
def test_bad_cs_values_are_one_line_errors(case: str, small: SmallData, cs_file: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A .cs file without uids, a repeated uid (main or passthrough file), a value that is not a finite number:
    exit 2, one line naming the file, field, row and uid, nothing written."""
    build, fragment = BAD_CS[case]
    full = Dataset.load(cs_file)
    folder = tmp_path / "in"
    folder.mkdir()
    main, passthrough = build(full, cs_file, folder)
    uid = np.asarray(full["uid"])
    fragment = fragment.format(**{f"uid{row}": int(uid[row]) for row in range(10)})
    out = tmp_path / "out"
    out.mkdir()
    extra = ["--passthrough", *map(str, passthrough)] if passthrough else []
    code = core_main(["--i", str(main), *extra, "--o", str(out / "kept.cs"), "--directory", str(small.folder),
                      "--volume", str(small.half1), "--volume", str(small.half2), "--frequency", "12", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("cryosieve-core: error: "), err
    assert fragment in err[0], err
    assert list(out.iterdir()) == []


def test_pipeline_refuses_a_nan_shift(small: SmallData, cs_file: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Once given score nan, kept 0 and all-NaN half maps: now refused before anything is written."""
    from cryosieve.cli.pipeline import main as pipeline_main

    damaged = write_cs(with_value(Dataset.load(cs_file), "alignments3D/shift", 5, np.nan), tmp_path / "nan.cs")
    code = pipeline_main(["--i", str(damaged), "--o", str(tmp_path / "run") + "/", "--mask", str(small.mask),
                          "--directory", str(small.folder), "--num_iters", "1", "--frequency_start", "20",
                          "--frequency_end", "20", "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "field alignments3D/shift at row 6" in err[0], err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- uids of converted particles


def star_set(folder: Path, count: int, seed: int) -> Path:
    from conftest import optics_table, random_particles

    particles = random_particles(count, np.random.default_rng(seed), 1.0, "particles.mrcs")
    particles["rlnRandomSubset"] = np.arange(count) % 2 + 1
    folder.mkdir(parents=True, exist_ok=True)
    import starfile

    starfile.write({"optics": optics_table(64, 1.0), "particles": particles}, folder / "particles.star")
    return folder / "particles.star"


def converted_uids(star: Path) -> np.ndarray:
    from cryosieve.io.particle_files import in_format_of

    converted = in_format_of(read_particles(star), star.with_suffix(".cs"))
    return np.asarray(converted.source.dataset["uid"])


def test_different_inputs_get_different_uids_and_the_same_input_the_same_bytes(tmp_path: Path) -> None:
    """Two data sets converted from STAR share no uid (they all came from seed 0 before); the same input gives the
    same bytes, and a subset the uids its particles had in the whole set."""
    from cryosieve.io.particle_files import in_format_of

    first, second = star_set(tmp_path / "a", 300, 1), star_set(tmp_path / "b", 300, 2)
    uids = converted_uids(first)
    assert len(np.unique(uids)) == 300 and uids.min() >= 1 and uids.max() < 2**63
    assert not set(uids.tolist()) & set(converted_uids(second).tolist())
    # the same particles under another file name and order: the same uid for each
    shuffled = star_set(tmp_path / "c", 300, 1)
    import starfile

    blocks = starfile.read(shuffled, always_dict=True)
    order = np.random.default_rng(0).permutation(300)
    blocks["particles"] = blocks["particles"].iloc[order].reset_index(drop=True)
    starfile.write(blocks, shuffled)
    np.testing.assert_array_equal(converted_uids(shuffled), uids[order])
    # the same input, the same bytes
    particles = read_particles(first)
    written = []
    for name in ("one.cs", "two.cs"):
        in_format_of(particles, tmp_path / name).write(tmp_path / name)
        written.append((tmp_path / name).read_bytes())
    assert written[0] == written[1]
    # a subset (a sieve's kept set) keeps the uids of the whole
    rows = np.arange(0, 300, 3)
    np.testing.assert_array_equal(np.asarray(in_format_of(particles.subset(rows), tmp_path / "s.cs").source.dataset[
        "uid"]), uids[rows])


def test_a_repeated_particle_gets_a_uid_of_its_own(tmp_path: Path) -> None:
    from cryosieve.io.cs import particle_uids

    particles = read_particles(star_set(tmp_path / "a", 20, 3))
    twice = particles.subset(np.array([*range(20), 4, 4, 7]))
    uids = particle_uids(twice)
    assert len(np.unique(uids)) == 23
    np.testing.assert_array_equal(uids[:20], particle_uids(particles))
    assert not np.array_equal(particle_uids(particles, seed=1), particle_uids(particles))


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
