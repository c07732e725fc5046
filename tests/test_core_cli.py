"""``cryosieve-core`` end to end: outputs, determinism, multi-process, bad input."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryosieve.cli.core import main


def core_args(data, out: Path, *extra: str, volumes=None) -> list[str]:
    volumes = volumes or [data.half1, data.half2]
    args = ["--i", str(data.star), "--o", str(out), "--directory", str(data.folder), "--mask", str(data.mask),
            "--retention_ratio", "0.8", "--frequency", "20", "--quiet"]
    for volume in volumes:
        args += ["--volume", str(volume)]
    return args + list(extra)


def test_outputs_partition_the_input_exactly(known_truth, tmp_path):
    out = tmp_path / "run" / "kept.star"
    assert main(core_args(known_truth, out)) == 0
    original = starfile.read(known_truth.star, always_dict=True)
    kept = starfile.read(out, always_dict=True)
    sieved = starfile.read(tmp_path / "run" / "kept_sieved.star", always_dict=True)
    scores = pd.read_csv(tmp_path / "run" / "kept_scores.csv")
    pd.testing.assert_frame_equal(kept["optics"], original["optics"])
    pd.testing.assert_frame_equal(sieved["optics"], original["optics"])
    # Every input row exactly once, in input order, with the same values.
    merged = pd.concat([kept["particles"], sieved["particles"]])
    order = merged["rlnImageName"].map({name: i for i, name in enumerate(original["particles"]["rlnImageName"])})
    merged = merged.iloc[np.argsort(order.to_numpy(), kind="stable")].reset_index(drop=True)
    pd.testing.assert_frame_equal(merged, original["particles"])
    assert order[: len(kept["particles"])].is_monotonic_increasing
    assert list(scores.columns) == ["rlnImageName", "half_set", "score", "kept"]
    assert scores["rlnImageName"].tolist() == original["particles"]["rlnImageName"].tolist()
    assert set(scores.loc[scores.kept == 1, "rlnImageName"]) == set(kept["particles"]["rlnImageName"])
    for subset in (1, 2):
        members = original["particles"]["rlnRandomSubset"] == subset
        assert (kept["particles"]["rlnRandomSubset"] == subset).sum() == round(0.8 * members.sum())
        # The kept ones are the lowest scores of their half-set.
        group = scores[scores.half_set == subset]
        assert group.loc[group.kept == 1, "score"].max() <= group.loc[group.kept == 0, "score"].min()


def test_repeated_and_multi_process_runs_are_identical(known_truth, tmp_path):
    runs = [("one", []), ("again", []), ("two_processes", ["--num_gpus", "2", "--device", "cpu"])]
    for name, extra in runs:
        assert main(core_args(known_truth, tmp_path / name / "kept.star", *extra)) == 0
    for name, _ in runs[1:]:
        for output in ("kept_scores.csv", "kept.star", "kept_sieved.star"):  # byte for byte: no time stamps
            assert (tmp_path / name / output).read_bytes() == (tmp_path / "one" / output).read_bytes(), output


def test_without_half_sets_one_volume_scores_all(known_truth, tmp_path):
    blocks = starfile.read(known_truth.star, always_dict=True)
    blocks["particles"] = blocks["particles"].drop(columns=["rlnRandomSubset"])
    star = tmp_path / "nosubset.star"
    starfile.write(blocks, star)
    args = ["--i", str(star), "--o", str(tmp_path / "out.star"), "--directory", str(known_truth.folder),
            "--volume", str(known_truth.half1), "--retention_ratio", "0.5", "--frequency", "30", "--quiet"]
    assert main(args) == 0
    kept = starfile.read(tmp_path / "out.star", always_dict=True)["particles"]
    assert len(kept) == round(0.5 * len(blocks["particles"]))
    # every particle scored against the one map, the lowest half of all of them kept
    scores = pd.read_csv(tmp_path / "out_scores.csv")
    assert (scores["half_set"] == 1).all() and scores["score"].notna().all()
    assert scores["score"].nunique() == len(scores)
    lowest = set(scores.nsmallest(len(kept), "score")["rlnImageName"])
    assert set(kept["rlnImageName"]) == lowest
    assert scores.loc[scores.kept == 1, "score"].max() < scores.loc[scores.kept == 0, "score"].min()


def test_relion30_star_gives_the_same_scores(known_truth, tmp_path):
    blocks = starfile.read(known_truth.star, always_dict=True)
    particles = blocks["particles"].copy()
    optics = blocks["optics"].iloc[0]
    particles["rlnOriginX"] = particles.pop("rlnOriginXAngst") / optics["rlnImagePixelSize"]
    particles["rlnOriginY"] = particles.pop("rlnOriginYAngst") / optics["rlnImagePixelSize"]
    for column in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"):
        particles[column] = optics[column]
    particles = particles.drop(columns=["rlnOpticsGroup"])
    star = tmp_path / "relion30.star"
    starfile.write({"images": particles}, star)
    args = core_args(known_truth, tmp_path / "a" / "kept.star")
    assert main(args) == 0
    args30 = core_args(known_truth, tmp_path / "b" / "kept.star", "--angpix", str(known_truth.voxel))
    args30[1] = str(star)
    assert main(args30) == 0
    first = pd.read_csv(tmp_path / "a" / "kept_scores.csv")
    second = pd.read_csv(tmp_path / "b" / "kept_scores.csv")
    np.testing.assert_allclose(second["score"], first["score"], rtol=1e-6, atol=1e-5 * first["score"].abs().mean())


def test_help_lists_the_original_flags():
    """Every flag of the published cryosieve-core (1.3.3) is accepted, with its published meaning."""
    from cryosieve.cli.core import build_parser

    result = subprocess.run([sys.executable, "-m", "cryosieve.cli.core", "-h"], capture_output=True, text=True)
    assert result.returncode == 0
    published = {"--i": "i", "--o": "o", "--directory": "directory", "--angpix": "angpix", "--volume": "volume",
                 "--mask": "mask", "--retention_ratio": "retention_ratio", "--frequency": "frequency",
                 "--balance": "balance", "--num_gpus": "num_gpus"}
    ours = {option: action.dest for action in build_parser()._actions for option in action.option_strings}
    for flag, destination in published.items():
        assert flag in result.stdout.split(), flag
        assert ours.get(flag) == destination, flag
    for flag in ("--device", "--batch_size", "--projector", "--reference_weighting"):
        assert flag in ours


def test_balance_keeps_the_same_number_in_both_half_sets(known_truth, tmp_path):
    blocks = starfile.read(known_truth.star, always_dict=True)
    particles = blocks["particles"]
    blocks["particles"] = particles.drop(index=particles.index[particles["rlnRandomSubset"] == 2][:200])
    star = tmp_path / "unbalanced.star"
    starfile.write(blocks, star)
    for name, extra in (("plain", []), ("balanced", ["--balance"])):
        args = core_args(known_truth, tmp_path / name / "kept.star", *extra)
        args[1] = str(star)
        assert main(args) == 0
    plain = pd.read_csv(tmp_path / "plain" / "kept_scores.csv")
    balanced = pd.read_csv(tmp_path / "balanced" / "kept_scores.csv")
    counts = {subset: int((plain.half_set == subset).sum()) for subset in (1, 2)}
    assert counts[1] - counts[2] == 200
    assert [int(plain[plain.half_set == s].kept.sum()) for s in (1, 2)] == [round(0.8 * counts[s]) for s in (1, 2)]
    target = round(0.8 * counts[2])
    assert [int(balanced[balanced.half_set == s].kept.sum()) for s in (1, 2)] == [target, target]
    pd.testing.assert_series_equal(plain["score"], balanced["score"])  # same scores, another cut
    for subset in (1, 2):  # still the lowest of each half-set
        group = balanced[balanced.half_set == subset]
        assert group.loc[group.kept == 1, "score"].max() <= group.loc[group.kept == 0, "score"].min()


def _copy_data(data, folder: Path) -> Path:
    shutil.copytree(data.folder, folder)
    return folder


def _bad_cases():
    def missing_star(folder):
        return {"--i": str(folder / "absent.star")}, "absent.star"

    def missing_column(folder):
        blocks = starfile.read(folder / "particles.star", always_dict=True)
        blocks["particles"] = blocks["particles"].drop(columns=["rlnDefocusV"])
        starfile.write(blocks, folder / "particles.star", overwrite=True)
        return {}, "rlnDefocusV"

    def unknown_optics_group(folder):
        blocks = starfile.read(folder / "particles.star", always_dict=True)
        blocks["particles"].loc[3, "rlnOpticsGroup"] = 9
        starfile.write(blocks, folder / "particles.star", overwrite=True)
        return {}, "rlnOpticsGroup 9"

    def index_beyond_stack(folder):
        blocks = starfile.read(folder / "particles.star", always_dict=True)
        blocks["particles"].loc[5, "rlnImageName"] = "999999@particles.mrcs"
        starfile.write(blocks, folder / "particles.star", overwrite=True)
        return {}, "999999@particles.mrcs"

    def missing_stack(folder):
        (folder / "particles.mrcs").unlink()
        return {}, "particles.mrcs"

    def box_mismatch(folder):
        with mrcfile.new(str(folder / "small.mrc"), overwrite=True) as handle:
            handle.set_data(np.zeros((32, 32, 32), dtype=np.float32))
            handle.voxel_size = 2.0
        return {"--volume": [str(folder / "small.mrc"), str(folder / "half2.mrc")]}, "small.mrc"

    def pixel_size_mismatch(folder):
        with mrcfile.open(str(folder / "half2.mrc"), mode="r+") as handle:
            handle.voxel_size = 3.0
        return {}, "half2.mrc"

    def ratio_zero(folder):
        return {"--retention_ratio": "0"}, "--retention_ratio"

    def ratio_above_one(folder):
        return {"--retention_ratio": "1.5"}, "--retention_ratio"

    def finer_than_nyquist(folder):
        return {"--frequency": "3"}, "--frequency"

    def nan_image(folder):
        with mrcfile.open(str(folder / "particles.mrcs"), mode="r+") as handle:
            handle.data[17, 3, 3] = np.nan
        return {}, "000018@particles.mrcs"

    def nan_volume(folder):
        with mrcfile.open(str(folder / "half1.mrc"), mode="r+") as handle:
            handle.data[1, 2, 3] = np.nan
        return {}, "half1.mrc"

    def more_volumes_than_half_sets(folder):
        return {"--volume": [str(folder / "half1.mrc"), str(folder / "half2.mrc"), str(folder / "half2.mrc")]}, \
            "half-sets"

    def mask_outside_unit_range(folder):
        with mrcfile.open(str(folder / "mask.mrc"), mode="r+") as handle:
            handle.data[0, 0, 0] = 2.0
        return {}, "mask.mrc"

    return [missing_star, missing_column, unknown_optics_group, index_beyond_stack, missing_stack, box_mismatch,
            pixel_size_mismatch, ratio_zero, ratio_above_one, finer_than_nyquist, nan_image, nan_volume,
            more_volumes_than_half_sets, mask_outside_unit_range]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda case: case.__name__)
def test_bad_input_one_line_exit_2_no_output(known_truth, tmp_path, case):
    folder = _copy_data(known_truth, tmp_path / "data")
    changes, culprit = case(folder)
    options = {"--i": str(folder / "particles.star"), "--o": str(tmp_path / "out" / "kept.star"),
               "--directory": str(folder), "--volume": [str(folder / "half1.mrc"), str(folder / "half2.mrc")],
               "--mask": str(folder / "mask.mrc"), "--retention_ratio": "0.8", "--frequency": "20"}
    options.update(changes)
    args = [sys.executable, "-m", "cryosieve.cli.core", "--quiet"]
    for key, value in options.items():
        for item in value if isinstance(value, list) else [value]:
            args += [key, item]
    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert culprit in lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
