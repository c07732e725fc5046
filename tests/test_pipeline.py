"""The iterative ``cryosieve`` command, end to end.

Data: the ``known_truth`` fixture (2,000 particles simulated by ``relion_project``, box
64, 2 Å/px, 10 % junk), made unbalanced (100 particles of half-set 2 dropped) so that
``--balance`` has work to do.  Three rounds at cut-offs 40, 16 and 10 Å.

* the built-in back-end: every file named as the published program names it, particle
  counts exactly ``round(0.8 n)`` per half-set and round, nested kept sets, sieved =
  previous minus kept, resolutions between Nyquist and 100 Å that match
  ``relion_postprocess`` on the same half maps, less junk at the end than at the start;
* ``relion_reconstruct`` + ``relion_postprocess`` through the external path: the same
  layout, resolutions read from RELION's own STAR files, final resolution within 5 % of
  the built-in back-end's;
* SIGKILL twice mid-run, then ``--continue``: outputs identical to the uninterrupted
  run, finished steps not recomputed (files untouched); refusals of a rerun without
  ``--continue`` and of changed arguments with it;
* bad input: one line, exit 2, no output.
"""

from __future__ import annotations

import json
import math
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryosieve.cli.pipeline import main
from cryosieve.schedule import CutoffSchedule

NUM_ITERS = 3
CUTOFFS = [40.0, 16.0, 10.0]  # 1 / linspace(1/40, 1/10, 3)
DROPPED_FROM_HALF2 = 100


@pytest.fixture(scope="module")
def unbalanced(known_truth, tmp_path_factory):
    """The known-truth STAR with the first 100 particles of half-set 2 removed (1000 + 900)."""
    folder = tmp_path_factory.mktemp("unbalanced")
    blocks = starfile.read(known_truth.star, always_dict=True)
    particles = blocks["particles"]
    drop = particles.index[particles["rlnRandomSubset"] == 2][:DROPPED_FROM_HALF2]
    blocks["particles"] = particles.drop(index=drop).reset_index(drop=True)
    star = folder / "unbalanced.star"
    starfile.write(blocks, star, overwrite=True)
    return star


def common_arguments(known_truth, star: Path) -> list[str]:
    return ["--i", str(star), "--angpix", str(known_truth.voxel), "--mask", str(known_truth.mask),
            "--directory", str(known_truth.folder), "--num_iters", str(NUM_ITERS), "--frequency_start", "40",
            "--frequency_end", "10", "--retention_ratio", "0.8", "--balance", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def builtin_run(known_truth, unbalanced, tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("builtin") / "out") + "/"
    assert main([*common_arguments(known_truth, unbalanced), "--o", prefix]) == 0
    return prefix


@pytest.fixture(scope="module")
def relion_run(known_truth, unbalanced, tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("relion") / "run")
    assert main([*common_arguments(known_truth, unbalanced),
                 "--o", prefix, "--reconstruct_software", "relion_reconstruct",
                 "--postprocess_software", "relion_postprocess"]) == 0
    return prefix


def image_names(path: str | Path) -> list[str]:
    return starfile.read(path, always_dict=True)["particles"]["rlnImageName"].astype(str).tolist()


def half_set_counts(path: str | Path) -> tuple[int, int]:
    subsets = starfile.read(path, always_dict=True)["particles"]["rlnRandomSubset"].to_numpy()
    return int(np.sum(subsets == 1)), int(np.sum(subsets == 2))


def expected_counts() -> list[int]:
    counts = [1000 - DROPPED_FROM_HALF2]  # balanced: the smaller half-set
    for _ in range(NUM_ITERS):
        counts.append(round(0.8 * counts[-1]))
    return counts  # per half-set: 900, 720, 576, 461


def relion_postprocess_star(half1: Path, half2: Path, mask: Path, voxel: float, root: Path) -> dict:
    """Run ``relion_postprocess`` as the published CryoSieve does; returns its STAR blocks."""
    root.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["relion_postprocess", "--i", str(half1), "--i2", str(half2), "--mask", str(mask), "--angpix",
                    str(voxel), "--auto_bfac", "--autob_lowres", "10", "--o", str(root)], check=True,
                   capture_output=True)
    return starfile.read(root.with_suffix(".star"), always_dict=True)


def check_layout_and_selection(prefix: str, known_truth, external: bool) -> pd.DataFrame:
    """Files named as published, counts, nesting; returns the summary table."""
    for iteration in range(NUM_ITERS):
        for subset in (1, 2):
            assert Path(f"{prefix}_iter{iteration}_half{subset}.mrc").is_file()
        directory = Path(f"{prefix}_postprocess_iter{iteration}")
        # every back-end leaves the built-in post-processing's files; RELION's STAR file beside them
        names = ["mrc", "json", "_fsc.csv", "_masked.mrc", "_fsc.png", "_guinier.png"] + (["star"] if external else [])
        for name in names:
            separator = "" if name.startswith("_") else "."
            assert (directory / f"iter{iteration}{separator}{name}").is_file(), (directory, name)
        if external:
            assert Path(f"{prefix}_iter{iteration}_reconstruct_half1.txt").is_file()
            assert Path(f"{prefix}_postprocess_iter{iteration}.txt").is_file()
    # as published, the last kept set is not reconstructed
    assert not Path(f"{prefix}_iter{NUM_ITERS}_half1.mrc").exists()
    for suffix in ("_summary.csv", "_report.html", "_fsc.png", "_resolution.png", "_scores.png", "_state.json",
                   "_pipeline.log"):
        assert Path(prefix + suffix).is_file(), suffix

    counts = expected_counts()
    summary = pd.read_csv(prefix + "_summary.csv")
    assert summary["iteration"].tolist() == list(range(NUM_ITERS + 1))
    np.testing.assert_allclose(summary["cutoff_angstrom"].to_numpy()[:NUM_ITERS], CUTOFFS)
    assert math.isnan(summary["cutoff_angstrom"].iloc[NUM_ITERS])
    for iteration in range(NUM_ITERS + 1):
        star = f"{prefix}_iter{iteration}.star"
        assert half_set_counts(star) == (counts[iteration], counts[iteration]), star
        assert summary["particles_half1"].iloc[iteration] == counts[iteration]
        assert summary["particles_half2"].iloc[iteration] == counts[iteration]
    for iteration in range(NUM_ITERS):
        previous = image_names(f"{prefix}_iter{iteration}.star")
        kept = image_names(f"{prefix}_iter{iteration + 1}.star")
        sieved = image_names(f"{prefix}_iter{iteration + 1}_sieved.star")
        assert set(kept) <= set(previous)
        assert not set(kept) & set(sieved)
        assert sorted(kept + sieved) == sorted(previous)
        # kept particles stay in input order
        position = {name: index for index, name in enumerate(previous)}
        assert [position[name] for name in kept] == sorted(position[name] for name in kept)
    resolutions = summary["resolution_angstrom"].to_numpy()[:NUM_ITERS]
    nyquist = 2 * known_truth.voxel
    assert np.all(np.isfinite(resolutions))
    assert np.all((resolutions >= nyquist) & (resolutions <= 100.0)), resolutions
    assert math.isnan(summary["resolution_angstrom"].iloc[NUM_ITERS])
    assert np.all(np.isfinite(summary["bfactor"].to_numpy()[:NUM_ITERS]))

    page = Path(prefix + "_report.html").read_text()
    assert page.count("data:image/png;base64,") == 4  # resolution, FSC, scores, viewing directions
    assert "src=\"http" not in page and ".png\"" not in page
    # the best round: the finest reported resolution, ties told apart by the interpolated FSC crossing
    crossings = summary["resolution_interpolated_angstrom"].to_numpy()[:NUM_ITERS]
    finest = resolutions == resolutions.min()
    best = int(np.flatnonzero(finest)[np.argmin(crossings[finest])])
    assert f"{resolutions[best]:.2f} Å</b> at iteration <b>{best}</b>" in page
    assert summary["best"].tolist() == [iteration == best for iteration in range(NUM_ITERS + 1)]
    assert summary["shells_from_best"].iloc[best] == 0
    if finest.sum() > 1:  # rounds of the same reported shell are marked as ties
        assert "same shell (tie)" in page and "Within one Fourier shell of the best" in page
    return summary


def test_cutoffs_are_rounded_to_a_thousandth_of_an_angstrom_as_published():
    """CryoSieve 1.3.3 passes ``--frequency {F:.3f}`` to each round's sieve."""
    exact = 1 / np.linspace(1 / 40.0, 1 / 3.0, 7)
    assert np.array_equal(CutoffSchedule(40.0, 3.0, 7).cutoffs, [float(f"{value:.3f}") for value in exact])
    assert CutoffSchedule(40.0, 3.0, 7).cutoffs[1] == 13.091  # 13.09 at 0.01 Å


def test_builtin_backend(builtin_run, known_truth, unbalanced, tmp_path):
    prefix = builtin_run
    summary = check_layout_and_selection(prefix, known_truth, external=False)
    # _iter0.star: the input minus particles of half-set 1 drawn at random (seeded)
    input_names = image_names(unbalanced)
    iter0 = image_names(prefix + "_iter0.star")
    assert set(iter0) <= set(input_names) and len(iter0) == 1800
    # every round's post-processing agrees with relion_postprocess on the same half maps: the masked
    # FSC exactly; the resolution to one Fourier shell, because both randomise phases with their own
    # random numbers, which moves the corrected FSC by a few hundredths where it crosses 0.143
    box_angstrom = known_truth.box * known_truth.voxel
    for iteration in range(NUM_ITERS):
        relion = relion_postprocess_star(
            Path(f"{prefix}_iter{iteration}_half1.mrc"), Path(f"{prefix}_iter{iteration}_half2.mrc"),
            known_truth.mask, known_truth.voxel, tmp_path / f"check{iteration}" / "postprocess")
        ours = pd.read_csv(f"{prefix}_postprocess_iter{iteration}/iter{iteration}_fsc.csv")
        np.testing.assert_allclose(ours["fsc_masked"].to_numpy(),
                                   relion["fsc"]["rlnFourierShellCorrelationMaskedMaps"].to_numpy(), atol=2e-5)
        measured = summary["resolution_angstrom"].iloc[iteration]
        reference = float(relion["general"]["rlnFinalResolution"])
        assert abs(box_angstrom / measured - box_angstrom / reference) <= 1.0 + 1e-3, (iteration, measured, reference)
        recorded = json.loads(Path(f"{prefix}_postprocess_iter{iteration}/iter{iteration}.json").read_text())
        assert measured == pytest.approx(recorded["final_resolution_angstrom"], rel=1e-5)
    # the sieve removes junk: its share in the last kept set is below the input's
    junk = set(known_truth.truth["rlnImageName"][known_truth.truth["is_junk"]])
    share_before = np.mean([name in junk for name in iter0])
    share_after = np.mean([name in junk for name in image_names(f"{prefix}_iter{NUM_ITERS}.star")])
    print(f"built-in: resolutions {summary['resolution_angstrom'].tolist()}, junk {share_before:.3f} -> "
          f"{share_after:.3f}")
    assert share_after < 0.5 * share_before


@pytest.mark.slow
def test_relion_backend(relion_run, builtin_run, known_truth):
    prefix = relion_run
    summary = check_layout_and_selection(prefix, known_truth, external=True)
    for iteration in range(NUM_ITERS):
        blocks = starfile.read(f"{prefix}_postprocess_iter{iteration}/iter{iteration}.star", always_dict=True)
        general = blocks["general"]
        # the files every back-end leaves, made from RELION's STAR file
        ours = pd.read_csv(f"{prefix}_postprocess_iter{iteration}/iter{iteration}_fsc.csv")
        np.testing.assert_allclose(ours["fsc_corrected"], blocks["fsc"]["rlnFourierShellCorrelationCorrected"])
        np.testing.assert_allclose(ours["fsc_unmasked"], blocks["fsc"]["rlnFourierShellCorrelationUnmaskedMaps"])
        document = json.loads(Path(f"{prefix}_postprocess_iter{iteration}/iter{iteration}.json").read_text())
        assert document["program"] == "relion_postprocess"
        assert document["final_resolution_angstrom"] == pytest.approx(float(general["rlnFinalResolution"]))
        assert summary["resolution_angstrom"].iloc[iteration] == pytest.approx(
            float(general["rlnFinalResolution"]), rel=1e-5)
        assert summary["bfactor"].iloc[iteration] == pytest.approx(
            float(general["rlnBfactorUsedForSharpening"]), rel=1e-5)
    # relion_reconstruct wrote the half maps
    assert "relion_reconstruct" in Path(f"{prefix}_iter0_reconstruct_half1.txt").read_text()
    builtin = pd.read_csv(builtin_run + "_summary.csv")
    final_relion = summary["resolution_angstrom"].iloc[NUM_ITERS - 1]
    final_builtin = builtin["resolution_angstrom"].iloc[NUM_ITERS - 1]
    print(f"final resolution: relion {final_relion:.3f} Å, built-in {final_builtin:.3f} Å; "
          f"relion {summary['resolution_angstrom'].tolist()}, built-in {builtin['resolution_angstrom'].tolist()}")
    assert abs(final_relion - final_builtin) <= 0.05 * final_builtin


def test_external_reconstruction_with_builtin_postprocess_and_failures(known_truth, unbalanced, tmp_path, capsys):
    arguments = common_arguments(known_truth, unbalanced)
    arguments[arguments.index("--num_iters") + 1] = "1"
    arguments.remove("--balance")
    prefix = str(tmp_path / "mixed")
    assert main([*arguments, "--o", prefix, "--reconstruct_software", "relion_reconstruct", "--no-report"]) == 0
    assert Path(f"{prefix}_postprocess_iter0/iter0.json").is_file()  # built-in post-processing
    # without --balance, _iter0.star is the input as it is, and each half-set keeps round(0.8 n)
    assert Path(f"{prefix}_iter0.star").read_bytes() == unbalanced.read_bytes()
    assert half_set_counts(f"{prefix}_iter1.star") == (800, 720)
    assert Path(f"{prefix}_summary.csv").is_file() and not Path(f"{prefix}_report.html").exists()
    capsys.readouterr()
    # a failing program stops the run with its exit code and names the command and its log
    failing = str(tmp_path / "failing")
    assert main([*arguments, "--o", failing, "--reconstruct_software", "false"]) == 1
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and "'false --i" in message[0] and "failing_iter0_reconstruct_half1.txt" in message[0]
    assert not Path(f"{failing}_iter0_half1.mrc").exists()
    state = json.loads(Path(f"{failing}_state.json").read_text())
    assert state["completed"] == ["prepare"]


def content(path: str) -> bytes:
    """A whole output, byte for byte (outputs carry no time stamps)."""
    return Path(path).read_bytes()


def _wait_for_step(state_path: Path, step: str, process: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        if state_path.is_file():
            try:
                if step in json.loads(state_path.read_text())["completed"]:
                    return
            except ValueError:
                pass
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached")


@pytest.mark.slow
def test_kill_and_continue(builtin_run, known_truth, unbalanced, tmp_path):
    prefix = str(tmp_path / "resumed") + "/"
    state_path = Path(prefix + "_state.json")
    command = [sys.executable, "-m", "cryosieve.cli.pipeline", *common_arguments(known_truth, unbalanced),
               "--o", prefix]

    # kill 1: during the reconstruction of round 1
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_step(state_path, "sieve 0", process)
    time.sleep(1.0)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = json.loads(state_path.read_text())["completed"]
    assert "sieve 0" in done_before and "sieve 2" not in done_before
    finished_files = [Path(prefix + name) for name in (
        "_iter0.star", "_iter0_half1.mrc", "_iter0_half2.mrc", "_iter1.star", "_iter1_sieved.star",
        "_iter1_scores.csv")] + sorted(Path(prefix + "_postprocess_iter0").iterdir())
    times = {path: path.stat().st_mtime_ns for path in finished_files}

    # rerun without --continue: refused, nothing touched
    refused = subprocess.run(command, capture_output=True, text=True)
    assert refused.returncode == 2
    assert "--continue" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    # --continue with a changed argument: refused, naming the option
    changed = [*command, "--continue"]
    changed[changed.index("--retention_ratio") + 1] = "0.7"
    refused = subprocess.run(changed, capture_output=True, text=True)
    assert refused.returncode == 2 and "--retention_ratio" in refused.stderr
    assert json.loads(state_path.read_text())["completed"] == done_before

    # kill 2: during the sieve of round 1
    process = subprocess.Popen([*command, "--continue"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_step(state_path, "postprocess 1", process)
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait()

    finished = subprocess.run([*command, "--continue"], capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    completed = json.loads(state_path.read_text())["completed"]
    assert len(completed) == len(set(completed)) == 1 + 3 * NUM_ITERS
    for path, mtime in times.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was rewritten"
    assert "already done" in Path(prefix + "_pipeline.log").read_text()

    # identical to the uninterrupted run
    reference = builtin_run
    for iteration in range(NUM_ITERS + 1):
        names = [f"_iter{iteration}.star"]
        if iteration > 0:
            names += [f"_iter{iteration}_sieved.star", f"_iter{iteration}_scores.csv"]
        for name in names:
            assert content(prefix + name) == content(reference + name), name
    for iteration in range(NUM_ITERS):
        for subset in (1, 2):
            name = f"_iter{iteration}_half{subset}.mrc"
            assert content(prefix + name) == content(reference + name), name
        for name in sorted(path.name for path in Path(reference + f"_postprocess_iter{iteration}").iterdir()):
            assert content(prefix + f"_postprocess_iter{iteration}/{name}") == \
                content(reference + f"_postprocess_iter{iteration}/{name}"), name
    for name in ("_summary.csv", "_fsc.png", "_resolution.png", "_scores.png"):
        assert content(prefix + name) == content(reference + name), name
    # the state differs only by the command that started the run (its output prefix is another one here)
    state, reference_state = json.loads(state_path.read_text()), json.loads(Path(reference + "_state.json").read_text())
    assert shlex.split(state.pop("command")) == ["cryosieve", *command[3:]]
    assert "--continue" not in state and reference_state.pop("command").startswith("cryosieve ")
    assert state == reference_state
    leftovers = [path.name for path in Path(prefix).iterdir() if "partial" in path.name or ".tmp" in path.name]
    assert not leftovers

    # --continue on a finished run recomputes nothing
    outputs = {path: path.stat().st_mtime_ns for path in Path(prefix).glob("_iter*")}
    again = subprocess.run([*command, "--continue"], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert {path: path.stat().st_mtime_ns for path in Path(prefix).glob("_iter*")} == outputs


@pytest.mark.parametrize("change, expected", [
    ({"--i": "missing.star"}, "missing.star"),
    ({"--mask": "missing_mask.mrc"}, "missing_mask.mrc"),
    ({"--retention_ratio": "0"}, "--retention_ratio"),
    ({"--retention_ratio": "1.5"}, "--retention_ratio"),
    ({"--num_iters": "0"}, "--num_iters"),
    ({"--frequency_start": "-5"}, "--frequency_start"),
    ({"--frequency_end": "3"}, "Nyquist"),
    ({"--sym": "X7"}, "--sym"),
    ({"--angpix": "1.0"}, "--angpix"),
    ({"--reconstruct_software": "no_such_reconstruct_program"}, "no_such_reconstruct_program"),
])
def test_bad_input(known_truth, unbalanced, tmp_path, capsys, change, expected):
    arguments = [*common_arguments(known_truth, unbalanced), "--o", str(tmp_path / "out" / "run")]
    for option, value in change.items():
        if option in arguments:
            arguments[arguments.index(option) + 1] = value
        else:
            arguments += [option, value]
    assert main(arguments) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("cryosieve: error:") and expected in error[0], error
    assert not (tmp_path / "out").exists()


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in command and "pytest" not in command:
            found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_kill_during_external_reconstruction(relion_run, known_truth, unbalanced, tmp_path):
    """SIGKILL while relion_reconstruct runs: no orphaned program, and --continue gives RELION's result."""
    prefix = str(tmp_path / "external")
    arguments = common_arguments(known_truth, unbalanced)
    arguments[arguments.index("--num_iters") + 1] = "1"  # round 0 has the same 40 Å cut-off as the 3-round run
    command = [sys.executable, "-m", "cryosieve.cli.pipeline", *arguments, "--o", prefix,
               "--reconstruct_software", "relion_reconstruct", "--postprocess_software", "relion_postprocess"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log_path = Path(f"{prefix}_iter0_reconstruct_half2.txt")
    deadline = time.monotonic() + 120
    while not log_path.exists() and time.monotonic() < deadline:
        assert process.poll() is None
        time.sleep(0.02)
    time.sleep(0.2)
    assert process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()
    time.sleep(0.5)
    assert not _processes_mentioning(prefix), "relion_reconstruct outlived the killed run"
    assert not Path(f"{prefix}_iter0_half1.mrc").exists()
    finished = subprocess.run([*command, "--continue"], capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    for name in ("_iter0_half1.mrc", "_iter0_half2.mrc"):
        np.testing.assert_array_equal(mrcfile.read(prefix + name), mrcfile.read(relion_run + name))
    for name in ("iter0.json", "iter0_fsc.csv"):
        assert content(f"{prefix}_postprocess_iter0/{name}") == content(f"{relion_run}_postprocess_iter0/{name}")
    for name in ("_iter1.star", "_iter1_sieved.star", "_iter1_scores.csv"):
        assert content(prefix + name) == content(relion_run + name), name
    assert not [path for path in tmp_path.iterdir() if "partial" in path.name]


@pytest.mark.slow
def test_validate_fixed_with_rh(builtin_run, known_truth, unbalanced, tmp_path):
    """--validate fixed: every set, the last one included, is measured again with its given poses, so the
    re-estimated resolution of the reconstructed sets is exactly the pipeline's own; --validate_rh adds both
    RH B-factors; the report says which validation ran."""
    prefix = str(tmp_path / "out") + "/"
    assert main([*common_arguments(known_truth, unbalanced), "--o", prefix, "--validate", "fixed",
                 "--validate_rh"]) == 0
    summary = pd.read_csv(prefix + "_summary.csv")
    assert len(summary) == NUM_ITERS + 1
    assert np.isfinite(summary["validated_resolution_angstrom"]).all()
    np.testing.assert_array_equal(summary["validated_resolution_angstrom"][:NUM_ITERS],
                                  summary["resolution_angstrom"][:NUM_ITERS])
    np.testing.assert_array_equal(summary["resolution_angstrom"],
                                  pd.read_csv(builtin_run + "_summary.csv")["resolution_angstrom"])
    assert (summary["rh_bfactor"] < 0).all() and (summary["rh_bfactor_classical"] > 0).all()
    report = Path(prefix + "_report.html").read_text()
    assert "Poses re-estimated (<code>--validate</code>): <b>fixed poses" in report
    assert "Best resolution with poses re-estimated" in report
    jobs = sorted(path.name for path in Path(prefix + "_validate").iterdir() if path.is_dir())
    assert jobs == [f"set{i}_half{level}" for i in range(NUM_ITERS + 1) for level in range(5)]


def test_validate_relion_failure_names_the_refinement_log(known_truth, unbalanced, tmp_path, capsys):
    """--validate relion runs relion_refine_mpi under the given launcher from the particle directory; a failing
    refinement stops the run with RELION's exit code and the path of its output, and is not recorded as done."""
    program = tmp_path / "relion_refine_mpi"
    program.write_text("#!/bin/sh\necho \"called in $(pwd) with: $*\"\necho 'ERROR: no memory' >&2\nexit 4\n")
    launcher = tmp_path / "mpirun"
    launcher.write_text('#!/bin/sh\nshift 2\nexec "$@"\n')  # "mpirun -n 3 PROGRAM ARGS" runs PROGRAM ARGS
    for path in (program, launcher):
        path.chmod(0o755)
    arguments = common_arguments(known_truth, unbalanced)
    arguments[arguments.index("--num_iters") + 1] = "1"
    prefix = str(tmp_path / "out") + "/"
    code = main([*arguments, "--o", prefix, "--validate", "relion", "--relion_refine", f"{launcher} -n 3 {program}",
                 "--j", "2"])
    message = capsys.readouterr().err.strip().splitlines()
    assert code == 4, message
    log = Path(prefix + "_validate") / "set0_half0.program.txt"
    assert len(message) == 1 and str(log) in message[0]
    text = log.read_text()
    assert f"called in {known_truth.folder}" in text and "ERROR: no memory" in text
    assert "--auto_refine --split_random_halves" in text and "--j 2" in text and "--firstiter_cc" in text
    state = json.loads(Path(prefix + "_state.json").read_text())
    assert "validate 0" not in state["completed"]
