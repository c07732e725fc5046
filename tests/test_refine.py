"""``cryosieve-refine`` and ``cryosieve-rhbfactor`` with the fixed-pose back-end: outputs, the
Rosenthal-Henderson B-factor against the simulation's truth, resuming, dry runs and bad input.

The RELION back-end is tested in ``test_refine_relion.py``.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile

from cryosieve.cli.core import main as core_main
from cryosieve.cli.refine import main as refine_main
from cryosieve.cli.rhbfactor import main as rh_main
from cryosieve.simulate import SimulationSettings, simulate_particles

BOX, PIXEL = 64, 2.0


def simulate(folder: Path, bfactor: tuple[float, float], junk: float = 0.0, count: int = 4000, seed: int = 11,
             half_maps: bool = False) -> Path:
    """A simulated set (no junk unless asked) of envelope B-factors uniform in ``bfactor``; its STAR file."""
    settings = SimulationSettings(num_particles=count, box=BOX, pixel_size=PIXEL, junk_fraction=junk, snr=0.05,
                                  bfactor_min=bfactor[0], bfactor_max=bfactor[1], seed=seed, half_maps=half_maps)
    simulate_particles(folder, settings)
    return folder / "particles.star"


@pytest.fixture(scope="module")
def b40(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return simulate(tmp_path_factory.mktemp("b40") / "data", (40.0, 40.0))


@pytest.fixture(scope="module")
def b160(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return simulate(tmp_path_factory.mktemp("b160") / "data", (160.0, 160.0))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return simulate(tmp_path_factory.mktemp("small") / "data", (0.0, 100.0), count=400, seed=5)


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and its SHA-256."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def rh_table(star: Path, out: Path, *extra: str) -> pd.DataFrame:
    code = rh_main(["--i", str(star), "--o", str(out), "--backend", "fixed", "--halves", "3", "--directory",
                    str(star.parent), "--quiet", *extra])
    assert code == 0
    return pd.read_csv(out)


@pytest.mark.slow
def test_rh_bfactors_follow_the_envelope_truth(b40: Path, b160: Path, tmp_path: Path) -> None:
    """Two sets that differ only in their envelope B-factor (40 and 160 Å²): both fits order them, and the
    straight line's B lies within 60 Å² of the envelope (the map's own fall-off and interpolation add to it)."""
    low = rh_table(b40, tmp_path / "b40" / "rh.csv")
    high = rh_table(b160, tmp_path / "b160" / "rh.csv")
    assert list(low.columns[:3]) == ["filename", "resolution (A)", "RH-b-factor (A^2)"]
    classical_low, classical_high = low["classical RH-b-factor (A^2)"][0], high["classical RH-b-factor (A^2)"][0]
    assert classical_low < classical_high
    assert abs(classical_low - 40) < 60 and abs(classical_high - 160) < 60
    # the published fit reports -a: the worse set is the more negative
    assert high["RH-b-factor (A^2)"][0] < low["RH-b-factor (A^2)"][0] < 0
    assert low["resolution (A)"][0] < high["resolution (A)"][0]
    raw = pd.read_csv(tmp_path / "b40" / "rh_raw.csv")
    assert list(raw["number of particles"]) == [4000, 2000, 1000, 500]
    assert raw["fixed pose"].all() and low["fixed pose"].all()
    assert (tmp_path / "b40" / "rh_rh.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_the_sieved_set_has_a_lower_rh_bfactor(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """Junk and a spread of B-factors: the set kept by one sieve has a lower (straight-line) RH B-factor, and a
    published one closer to 0, than the full set."""
    star = simulate(tmp_path_factory.mktemp("mixed") / "data", (0.0, 300.0), junk=0.1, count=6000, seed=21,
                    half_maps=True)
    data = star.parent
    kept = tmp_path / "sieve" / "kept.star"
    assert core_main(["--i", str(star), "--o", str(kept), "--directory", str(data), "--volume", str(data / "half1.mrc"),
                      "--volume", str(data / "half2.mrc"), "--mask", str(data / "mask.mrc"), "--retention_ratio", "0.6",
                      "--frequency", "8", "--device", "cpu", "--quiet"]) == 0
    full = rh_table(star, tmp_path / "full" / "rh.csv")
    sieved = rh_table(kept, tmp_path / "kept" / "rh.csv", "--directory", str(data))
    assert sieved["classical RH-b-factor (A^2)"][0] < full["classical RH-b-factor (A^2)"][0]
    assert sieved["RH-b-factor (A^2)"][0] > full["RH-b-factor (A^2)"][0]


@pytest.mark.slow
def test_refine_summary_trials_and_resume(small: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "summary.csv"
    args = ["--i", str(small), str(small), "--o", str(out), "--backend", "fixed", "--repeat", "2", "--resplit",
            "--workers", "2", "--directory", str(small.parent), "--quiet"]
    assert refine_main(args) == 0
    table = pd.read_csv(out)
    assert list(table.columns[:5]) == ["filename", "number of particles", "resolution (A)", "b-factor (A^2)",
                                       "alignment3D"]
    assert len(table) == 4 and list(table["trial"]) == [1, 2, 1, 2]
    assert (table["number of particles"] == 400).all() and table["fixed pose"].all()
    for _, row in table.iterrows():
        assert Path(row["alignment3D"]).is_file()
        # no --mask: the summary says which mask each job made and used
        made = Path(row["alignment3D"]).parent / "mask.mrc"
        assert row["mask"] == f"{made} (made around the half maps)" and made.is_file()
    first = table[table["filename"] == str(small)].iloc[:2]
    assert first["median resolution (A)"].iloc[0] == pytest.approx(np.median(first["resolution (A)"]))
    # new half-sets per trial (seeded): the two trials' particle files differ, and are balanced
    trial1, trial2 = (starfile.read(path)["particles"]["rlnRandomSubset"].to_numpy()
                      for path in first["alignment3D"])
    assert not np.array_equal(trial1, trial2) and np.bincount(trial1)[1:].tolist() == [200, 200]
    # run again: nothing recomputed, same bytes
    jobs = out.parent / "summary_jobs"
    before, times = tree(out.parent), {path: path.stat().st_mtime_ns for path in jobs.rglob("result.json")}
    assert refine_main(args) == 0
    assert tree(out.parent) == before
    assert {path: path.stat().st_mtime_ns for path in jobs.rglob("result.json")} == times


def test_dry_run_plans_and_writes_nothing(small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out" / "rh.csv"
    (tmp_path / "out").mkdir()
    code = rh_main(["--i", str(small), "--o", str(out), "--halves", "2", "--directory", str(small.parent),
                    "--relion_refine", "mpirun -n 3 relion_refine_mpi", "--j", "2", "--dry_run", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "3 refinement jobs" in printed
    assert printed.count("relion_refine_mpi --o") == 3 and "--auto_refine --split_random_halves" in printed
    assert "--j 2" in printed and "--sigma_ang" not in printed
    assert list((tmp_path / "out").iterdir()) == []


def test_local_searches_and_ranks_in_the_command(small: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code = refine_main(["--i", str(small), "--o", str(tmp_path / "s.csv"), "--directory", str(small.parent),
                        "--relion_refine", "mpirun --allow-run-as-root -n 5 relion_refine_mpi", "--local",
                        "--dry_run", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "mpirun --allow-run-as-root -n 5 relion_refine_mpi --o" in printed
    assert "--sigma_ang 2" in printed and "built-in reconstruction" in printed


def fake_program(folder: Path, name: str, text: str, code: int) -> Path:
    """An executable that prints ``text`` and exits with ``code`` (a RELION that fails)."""
    path = folder / name
    path.write_text(f"#!/bin/sh\necho '{text}'\nexit {code}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def no_half_sets(small: Path, folder: Path) -> Path:
    blocks = starfile.read(small, always_dict=True)
    blocks["particles"] = blocks["particles"].drop(columns=["rlnRandomSubset"])
    folder.mkdir(parents=True, exist_ok=True)
    starfile.write(blocks, folder / "nohalves.star")
    return folder / "nohalves.star"


@pytest.mark.parametrize(("case", "message"), [
    ("symmetry", "--sym X7"),
    ("halves", "column rlnRandomSubset missing; give --resplit"),
    ("small", "200 particles in its smaller half-set; at least 320 are needed"),
    ("voltage", "--voltage 120: only 200 and 300 kV"),
    ("ranks", "at least 3 ranks"),
    ("missing", "program 'no_such_relion_refine_mpi' not found"),
    ("output", "the summary must be a .csv file"),
])
def test_bad_input(case: str, message: str, small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    args = ["--i", str(small), "--o", str(out / "rh.csv"), "--directory", str(small.parent), "--backend", "fixed",
            "--quiet"]
    extra = {"symmetry": ["--sym", "X7"], "small": ["--halves", "5"], "voltage": ["--voltage", "120"],
             "ranks": ["--backend", "relion", "--relion_refine", "mpirun -n 2 relion_refine_mpi"],
             "missing": ["--backend", "relion", "--relion_refine", "mpirun -n 3 no_such_relion_refine_mpi"],
             "output": ["--o", str(out / "rh.txt")]}.get(case, [])
    if case == "halves":
        args[1] = str(no_half_sets(small, tmp_path / "in"))
    code = rh_main([*args, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("cryosieve-rhbfactor: error:") and message in err[0], err
    assert list(out.iterdir()) == []


def test_a_failing_relion_stops_the_run_with_its_log(small: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    program = fake_program(tmp_path, "relion_refine_mpi", "ERROR: out of memory on this node", 3)
    launcher = fake_program(tmp_path, "mpirun", "", 0)
    launcher.write_text('#!/bin/sh\nshift 2\nexec "$@"\n')  # "mpirun -n 3 PROGRAM ARGS": runs PROGRAM ARGS
    out = tmp_path / "out"
    out.mkdir()
    code = refine_main(["--i", str(small), "--o", str(out / "s.csv"), "--directory", str(small.parent),
                        "--relion_refine", f"{launcher} -n 3 {program}", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3, err
    assert len(err) == 1 and "cryosieve-refine: error:" in err[0]
    log = out / "s_jobs" / "01_particles_trial1.program.txt"
    assert str(log) in err[0]
    assert "out of memory" in log.read_text()
    assert not (out / "s.csv").exists()
    assert sorted(path.name for path in (out / "s_jobs").iterdir() if not path.name.startswith(".")) == [
        "01_particles_trial1.log", "01_particles_trial1.program.txt"]
    os.unlink(log)


def test_pipeline_refuses_a_validation_its_last_set_cannot_feed(small: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """200 per half-set, two rounds at 0.5: the last set keeps 50; RH with 4 halvings needs 160 per half-set."""
    from cryosieve.cli.pipeline import main as pipeline_main

    prefix = tmp_path / "out"
    prefix.mkdir()
    code = pipeline_main(["--i", str(small), "--o", str(prefix) + "/", "--mask", str(small.parent / "mask.mrc"),
                          "--directory", str(small.parent), "--num_iters", "2", "--retention_ratio", "0.5",
                          "--frequency_start", "20", "--frequency_end", "10", "--validate", "fixed", "--validate_rh",
                          "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "--validate: the last set keeps 50 particles in its smaller half-set" in err[0]
    assert "need at least 160" in err[0]
    assert list(prefix.iterdir()) == []


def test_a_full_disk_is_named_not_an_empty_log(small: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The built-in refinement's maps do not fit (1m), or an external program fills the disk (3m): one error line,
    'No space left on device', naming where; the job folders are not left. The command reported the failure of the
    job with its log, which the full disk had left empty."""
    from safety_helpers import small_filesystem

    program = fake_program(tmp_path, "relion_refine_mpi", "", 0)
    program.write_text('#!/bin/sh\nwhile [ $# -gt 0 ] && [ "$1" != "--o" ]; do shift; done\n'
                       'head -c 20000000 /dev/zero > "$2_big.bin" || exit 1\n')  # RELION writing as the disk fills
    launcher = fake_program(tmp_path, "mpirun", "", 0)
    launcher.write_text('#!/bin/sh\nshift 2\nexec "$@"\n')
    folder = tmp_path / "full"
    relion = ["--relion_refine", f"{launcher} -n 3 {program}"]
    for size, backend in (("1m", ["--backend", "fixed"]), ("3m", relion)):
        with small_filesystem(folder, size):
            code = refine_main(["--i", str(small), "--o", str(folder / "s.csv"), "--directory", str(small.parent),
                                *backend, "--quiet"])
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 1 and err[-1].startswith("cryosieve-refine: error: "), err
            assert "No space left on device" in err[-1] and str(folder / "s_jobs") in err[-1], err
            assert not [line for line in err[:-1] if "error" in line], err
            assert not (folder / "s.csv").exists()
            assert sorted(path.name for path in (folder / "s_jobs").iterdir() if not path.name.startswith(".")) == [
                "01_particles_trial1.log"] + (["01_particles_trial1.program.txt"] if size == "3m" else [])
