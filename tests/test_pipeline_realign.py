"""``cryosieve --realign``: each round's set refined locally (the built-in gold-standard refinement) before its
sieve, against known truth.

The quick case: 200 particles of box 48 at SNR 1, 40 % of them turned by 5-15 degrees and moved by 3-5 pixels
(``align_data``): the round's realigned set brings them back, the sieve scores against the new poses, the next
set carries them, the report shows how many moved, and a resumed run redoes nothing. Then a set with junk,
misaligned particles and wrong origins, sieved with and without ``--realign``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import torch

from align_data import Misaligned, misalign, simulate
from cryosieve.align import angle_between
from cryosieve.cli.pipeline import main as pipeline_main
from cryosieve.fsc import fourier_shell_correlation
from cryosieve.geometry import euler_to_matrix
from cryosieve.io.star import read_particles

BOX, PIXEL = 48, 3.3
PIXEL_LONG = 2.0  # Å, of the set with junk


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Misaligned:
    """200 particles of box 48 at SNR 1, 40 % of them misaligned."""
    star = simulate(tmp_path_factory.mktemp("realign") / "data", 200, BOX, PIXEL, 1.0, bfactor=(0.0, 0.0))
    return misalign(star, star.parent / "misaligned.star", 0.4)


def arguments(data: Misaligned, prefix: str, *extra: str) -> list[str]:
    return ["--i", str(data.star), "--o", prefix, "--mask", str(data.folder / "mask.mrc"), "--directory",
            str(data.folder), "--num_iters", "1", "--frequency_start", "20", "--frequency_end", "20",
            "--retention_ratio", "0.9", "--device", "cpu", "--quiet", *extra]


@pytest.fixture(scope="module")
def realigned(small: Misaligned, tmp_path_factory: pytest.TempPathFactory) -> str:
    prefix = str(tmp_path_factory.mktemp("run") / "out") + "/"
    assert pipeline_main(arguments(small, prefix, "--realign", "1")) == 0
    return prefix


def errors(star: str | Path, data: Misaligned) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of ``data`` in ``star`` and their angle (degrees) and origin (pixels) from the truth."""
    table = read_particles(star)
    order = {name: row for row, name in enumerate(read_particles(data.star).image_name)}
    rows = np.array([order[name] for name in table.image_name])
    matrices = euler_to_matrix(table.rot, table.tilt, table.psi)
    origin = np.stack([table.origin_x, table.origin_y], axis=1)
    return rows, angle_between(matrices, data.truth[rows]), np.linalg.norm(origin - data.origin[rows], axis=1)


def test_realigned_set_comes_back_to_the_truth(realigned: str, small: Misaligned) -> None:
    rows, angle, origin = errors(realigned + "_iter0_realigned.star", small)
    assert len(rows) == 200
    turned = small.turned[rows]
    # from 5-15 degrees and 3-5 pixels off; the others stay (SNR 1, box 48: coarse steps)
    assert np.median(angle[turned]) < 3.0 and np.median(origin[turned]) < 0.5
    assert np.median(angle[~turned]) < 1.5 and np.median(origin[~turned]) < 0.5
    for name in ("_iter0_realigned_half1.mrc", "_iter0_realigned_half2.mrc", "_iter0_realigned_iterations.csv"):
        assert Path(realigned + name).is_file(), name


def test_the_next_set_carries_the_realigned_poses(realigned: str, small: Misaligned) -> None:
    """``_iter1.star`` (kept) and ``_iter1_sieved.star`` hold the realigned poses exactly, and the moves table's
    turns and origin moves are those between the given and the realigned poses."""
    fixed = read_particles(realigned + "_iter0_realigned.star")
    new = {name: row for row, name in enumerate(fixed.image_name)}
    for star in ("_iter1.star", "_iter1_sieved.star"):
        table = read_particles(realigned + star)
        rows = np.array([new[name] for name in table.image_name])
        for column in ("rot", "tilt", "psi", "origin_x", "origin_y"):
            np.testing.assert_allclose(getattr(table, column), getattr(fixed, column)[rows], rtol=0, atol=1e-5)
    moves = pd.read_csv(realigned + "_iter0_realigned_moves.csv")
    given = read_particles(small.star)
    assert moves["rlnImageName"].tolist() == list(given.image_name)
    turn = angle_between(euler_to_matrix(fixed.rot, fixed.tilt, fixed.psi),
                         euler_to_matrix(given.rot, given.tilt, given.psi))
    np.testing.assert_allclose(moves["angle_degrees"], turn, atol=1e-3)
    np.testing.assert_allclose(moves["origin_x_pixels"], fixed.origin_x - given.origin_x, atol=1e-5)


def test_summary_and_report_show_how_many_moved(realigned: str, small: Misaligned) -> None:
    summary = pd.read_csv(realigned + "_summary.csv")
    moves = pd.read_csv(realigned + "_iter0_realigned_moves.csv")
    iterations = pd.read_csv(realigned + "_iter0_realigned_iterations.csv")
    # each half-set's finest step, as the table gives it (6 digits) and exactly (the state)
    finest = iterations.groupby("half_set")["finest step (deg)"].min()
    recorded = json.loads(Path(realigned + "_state.json").read_text())["outcomes"]["realign 0"]["finest_step"]
    assert [recorded[str(half)] for half in (1, 2)] == pytest.approx(finest.loc[[1, 2]].tolist(), rel=1e-5)
    own = np.array([recorded[str(half)] for half in moves["rlnRandomSubset"]])
    moved = int(summary["realigned_moved"][0])
    # those turned beyond their half-set's finest step or moved by more than half a pixel; the 80 of 200
    # misaligned among them (turns of exactly one lattice step are common: compared with the exact step)
    assert moved == int(np.sum((moves["angle_degrees"].to_numpy() > own) | (moves["origin_pixels"] > 0.5)))
    assert small.turned.sum() <= moved <= len(moves)
    assert summary["realigned_median_turn_degrees"][0] == pytest.approx(np.median(moves["angle_degrees"]), rel=1e-5)
    assert summary["realigned_median_origin_move_pixels"][0] == pytest.approx(np.median(moves["origin_pixels"]),
                                                                              rel=1e-5)
    assert math.isfinite(summary["realigned_resolution_angstrom"][0])
    assert math.isnan(summary["realigned_moved"][1])  # the last set is not sieved, so not realigned
    page = Path(realigned + "_report.html").read_text()
    assert "moved by --realign" in page and "--realign" in page


def test_a_resumed_run_redoes_nothing(realigned: str, small: Misaligned, tmp_path: Path) -> None:
    before = {path.name: path.read_bytes() for path in Path(realigned).iterdir() if path.is_file()
              and path.suffix in (".star", ".mrc", ".csv")}
    assert pipeline_main([*arguments(small, realigned, "--realign", "1"), "--continue"]) == 0
    after = {path.name: path.read_bytes() for path in Path(realigned).iterdir() if path.is_file()
             and path.suffix in (".star", ".mrc", ".csv")}
    assert after == before
    # the second run found every step done, the realignment among them, and recomputed none
    last = Path(realigned + "_pipeline.log").read_text().split("cryosieve continuing")[-1]
    done = next(line for line in last.splitlines() if "already done:" in line)
    assert "realign 0" in done and "sieve 0" in done and ": done in" not in last


def test_a_second_run_gives_the_same_bytes(realigned: str, small: Misaligned, tmp_path: Path) -> None:
    """The same command into another prefix: every particle file, map and table byte for byte the same."""
    again = str(tmp_path / "again") + "/"
    assert pipeline_main(arguments(small, again, "--realign", "1")) == 0
    names = sorted(path.name for path in Path(realigned).iterdir() if path.suffix in (".star", ".mrc", ".csv"))
    assert "_iter0_realigned_moves.csv" in names and "_iter0_realigned_half1.mrc" in names
    for name in names:
        assert (Path(again) / name).read_bytes() == (Path(realigned) / name).read_bytes(), name


@pytest.mark.parametrize(("extra", "message"), [
    (["--realign", "-1"], "--realign -1: must be from 0 (none) to 20 iterations"),
    (["--realign", "--search_range", "0"], "--search_range 0.0: must be in (0, 180] degrees"),
    (["--validate", "builtin", "--shift_range", "-2"], "--shift_range -2.0: must be in [0, 100] pixels"),
])
def test_bad_input_is_one_line_and_writes_nothing(extra: list[str], message: str, small: Misaligned, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    code = pipeline_main(arguments(small, str(out) + "/", *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("cryosieve: error:") and message in err[0], err
    assert list(out.iterdir()) == []


# --------------------------------------------------------------------------- junk and misaligned particles


def _map_against_truth(star: str, folder: Path) -> float:
    """Mean FSC, up to 10 Å, between the truth and the map of ``star``'s particles with their poses."""
    from cryosieve.io.stack import StackReader
    from cryosieve.reconstruct import reconstruct_subsets

    table = read_particles(star)
    with StackReader(table, folder) as reader:
        maps = reconstruct_subsets(table.with_values(random_subset=np.ones(len(table), dtype=np.int64)), reader,
                                   subsets=(1,), device="cpu")
    with mrcfile.open(folder / "truth.mrc") as handle:
        truth = np.asarray(handle.data, dtype=np.float64)
    fsc = fourier_shell_correlation(torch.from_numpy(maps[1].astype(np.float64)), torch.from_numpy(truth)).numpy()
    box = truth.shape[0]
    shells = np.arange(len(fsc))
    inside = (shells > 0) & (shells <= box * PIXEL_LONG / 10.0)
    return float(np.mean(fsc[inside]))


def test_realign_keeps_more_good_particles_and_a_map_at_least_as_good(tmp_path: Path) -> None:
    """1,200 particles of box 64 at SNR 0.1: 15 % junk, and of the rest 25 % turned by 5-15 degrees and 10 %
    with origins off by 2-4 Å (``truth.csv``). One round keeping 70 %: with ``--realign`` more of the good
    particles (misaligned ones included: they are good particles with wrong poses) are kept than without, and
    the kept set's map against the true map is at least as good."""
    from cryosieve.simulate import SimulationSettings, simulate_particles

    folder = tmp_path / "data"
    simulate_particles(folder, SimulationSettings(
        num_particles=1200, box=64, pixel_size=PIXEL_LONG, junk_fraction=0.15, snr=0.1, bfactor_min=0.0,
        bfactor_max=50.0, seed=3, misaligned_fraction=0.25, misalignment_min=5.0, misalignment_max=15.0,
        wrong_origin_fraction=0.10, origin_error=8.0, half_maps=False))
    truth = pd.read_csv(folder / "truth.csv")
    good = set(truth["rlnImageName"][truth["kind"] != "junk"])
    misaligned = set(truth["rlnImageName"][truth["kind"] == "misaligned"])
    runs = {}
    for label, extra in (("given", []), ("realign", ["--realign", "2"])):
        prefix = str(tmp_path / label) + "/"
        code = pipeline_main(["--i", str(folder / "particles.star"), "--o", prefix, "--mask",
                              str(folder / "mask.mrc"), "--directory", str(folder), "--num_iters", "1",
                              "--frequency_start", "15", "--frequency_end", "15", "--retention_ratio", "0.7",
                              "--device", "cpu", "--quiet", *extra])
        assert code == 0
        kept = read_particles(prefix + "_iter1.star")
        names = set(kept.image_name)
        runs[label] = (len(names & good), len(names & misaligned), _map_against_truth(prefix + "_iter1.star", folder))
    print(f"good and misaligned particles kept, map against the truth: {runs}")
    assert runs["realign"][0] > runs["given"][0] and runs["realign"][1] > runs["given"][1]
    assert runs["realign"][2] >= runs["given"][2]
