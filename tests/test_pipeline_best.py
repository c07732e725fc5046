"""The pipeline's best round and stopping rule (``--patience``), ``PREFIX_best.star``, the angular plots and
``--keep_orientations``, on realistic known-truth data (``cryosieve-simulate --realistic``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryosieve.backends import PostprocessJob
from cryosieve.backends.builtin import BuiltinPostProcessor
from cryosieve.cli.pipeline import main as pipeline_main
from cryosieve.pipeline import PipelineSettings, run_pipeline
from cryosieve.postprocess import PostprocessReport
from cryosieve.settings import SieveSettings
from cryosieve.simulate import SimulationSettings, simulate_particles


@pytest.fixture(scope="module")
def realistic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,600 particles at box 64 with every realistic defect, 15 % junk, low SNR."""
    folder = tmp_path_factory.mktemp("realistic") / "data"
    settings = replace(SimulationSettings(num_particles=1600, box=64, pixel_size=2.5, junk_fraction=0.15, snr=0.02,
                                          bfactor_min=50.0, bfactor_max=300.0, seed=11).realistic(),
                       preferred_fraction=0.5)
    simulate_particles(folder, settings)
    return folder


@dataclass(frozen=True)
class ScriptedPostProcessor:
    """The built-in post-processing, with the resolution of round ``i`` replaced by ``resolutions[i]`` (Å)."""

    resolutions: tuple[float, ...]

    def describe(self) -> str:
        return f"scripted {self.resolutions}"

    def postprocess(self, job: PostprocessJob) -> PostprocessReport:
        report = BuiltinPostProcessor().postprocess(job)
        iteration = int(job.root_name.removeprefix("iter"))
        report.summary["final_resolution_angstrom"] = self.resolutions[iteration]
        return report


def settings_for(data: Path, prefix: Path, *, keep_orientations: float | None = None, **changes: object
                 ) -> PipelineSettings:
    sieve = SieveSettings(retention_ratio=0.8, highpass_angstrom=30.0, keep_orientations=keep_orientations)
    values: dict[str, object] = {"input_star": str(data / "particles.star"), "output_prefix": str(prefix),
                                 "mask": str(data / "mask.mrc"), "sieve": sieve, "directory": str(data),
                                 "num_iters": 5, "frequency_start": 30.0, "frequency_end": 10.0, "report": True}
    values.update(changes)
    return PipelineSettings(**values)  # type: ignore[arg-type]


def test_patience_stops_at_the_first_stall_and_marks_the_best(realistic: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "run" / "p"
    scripted = ScriptedPostProcessor((10.0, 8.0, 8.5, 9.0, 7.0))
    result = run_pipeline(settings_for(realistic, prefix, postprocessor=scripted, patience=2))
    summary = pd.read_csv(f"{prefix}_summary.csv")
    # rounds 0-3 measured; round 3 stalled the run, so its set is the last and was not sieved
    assert summary["iteration"].tolist() == [0, 1, 2, 3]
    assert summary["resolution_angstrom"].tolist() == [10.0, 8.0, 8.5, 9.0]
    assert summary["best"].tolist() == [False, True, False, False]
    assert math.isnan(summary["cutoff_angstrom"].iloc[3])
    assert "reconstruct 3" in result.computed_steps and "sieve 3" not in result.computed_steps
    assert not Path(f"{prefix}_iter4.star").exists() and not Path(f"{prefix}_iter4_scores.csv").exists()
    assert Path(f"{prefix}_best.star").read_bytes() == Path(f"{prefix}_iter1.star").read_bytes()
    page = Path(f"{prefix}_report.html").read_text()
    assert "Stopped at round 3 by --patience 2" in page and "Best set: iteration 1" in page
    for name in ("_angles.png", "_resolution.png", "_fsc.png", "_scores.png"):
        assert Path(f"{prefix}{name}").stat().st_size > 0
    again = run_pipeline(settings_for(realistic, prefix, postprocessor=scripted, patience=2), resume=True)
    assert again.computed_steps == [] and pd.read_csv(f"{prefix}_summary.csv").equals(summary)


def test_without_patience_every_round_runs_and_the_best_is_marked(realistic: Path, tmp_path: Path) -> None:
    prefix = tmp_path / "fixed" / "f"
    scripted = ScriptedPostProcessor((10.0, 8.0, 8.5, 9.0, 7.0))
    run_pipeline(settings_for(realistic, prefix, postprocessor=scripted, report=False))
    summary = pd.read_csv(f"{prefix}_summary.csv")
    assert len(summary) == 6 and summary["best"].tolist() == [False] * 4 + [True, False]
    assert Path(f"{prefix}_best.star").read_bytes() == Path(f"{prefix}_iter4.star").read_bytes()
    assert "every one of the 5 rounds asked for" in Path(f"{prefix}_pipeline.log").read_text()


def fsc_to_truth(first: np.ndarray, second: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """FSC per integer shell (numpy, independent of the package) of the half maps' average against the truth."""
    average = np.fft.fftn((first + second) / 2)
    reference = np.fft.fftn(truth)
    box = truth.shape[0]
    k = np.fft.fftfreq(box) * box
    shell = np.round(np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)).astype(int)
    values = []
    for index in range(1, box // 2):
        inside = shell == index
        cross = np.sum(average[inside] * np.conj(reference[inside])).real
        values.append(cross / np.sqrt(np.sum(np.abs(average[inside]) ** 2) * np.sum(np.abs(reference[inside]) ** 2)))
    return np.array(values)


def test_the_chosen_round_is_as_good_against_the_truth_as_every_later_round(realistic: Path,
                                                                              tmp_path: Path) -> None:
    prefix = tmp_path / "truth" / "t"
    run_pipeline(settings_for(realistic, prefix, num_iters=5, report=False))
    summary = pd.read_csv(f"{prefix}_summary.csv")
    chosen = int(summary.loc[summary["best"], "iteration"].iloc[0])
    truth = mrcfile.read(realistic / "truth.mrc").astype(np.float64)
    mask = mrcfile.read(realistic / "mask.mrc").astype(np.float64)

    def quality(iteration: int) -> float:
        """Mean FSC against the truth over shells 4 to 20 (20 to 8 Å), of the masked half maps."""
        halves = [mrcfile.read(f"{prefix}_iter{iteration}_half{subset}.mrc").astype(np.float64) * mask
                  for subset in (1, 2)]
        return float(np.mean(fsc_to_truth(halves[0], halves[1], truth * mask)[3:20]))

    chosen_quality = quality(chosen)
    for later in range(chosen + 1, 5):
        assert chosen_quality >= quality(later) - 0.01, later


def test_keep_orientations_leaves_no_view_depleted_and_still_removes_junk(realistic: Path, tmp_path: Path) -> None:
    truth = pd.read_csv(realistic / "truth.csv")
    bad = set(truth.loc[truth["is_bad"], "rlnImageName"])
    removed = {}
    for flag in ("plain", "floor"):
        prefix = tmp_path / flag / "k"
        args = ["--i", str(realistic / "particles.star"), "--directory", str(realistic), "--o", str(prefix),
                "--mask", str(realistic / "mask.mrc"), "--num_iters", "2", "--frequency_start", "20",
                "--frequency_end", "12", "--retention_ratio", "0.7", "--quiet", "--no-report"]
        assert pipeline_main([*args, "--keep_orientations"] if flag == "floor" else args) == 0
        summary = pd.read_csv(f"{prefix}_summary.csv")
        if flag == "floor":
            assert (summary["depleted_views"].dropna() == 0).all()
        final = set(starfile.read(f"{prefix}_iter2.star")["particles"]["rlnImageName"])
        removed[flag] = len(bad - final) / len(bad)
    assert removed["floor"] >= removed["plain"] - 0.05 and removed["floor"] > 0.6
