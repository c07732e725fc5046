"""``--retention_ratio auto`` (:mod:`cryosieve.retention`): nested half maps, the map information, and the
fraction chosen on realistic known-truth data with 0 %, 10 % and 40 % bad particles."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import torch

from cryosieve.cli.core import main as core_main
from cryosieve.errors import CryoSieveInputError
from cryosieve.fsc import fourier_shell_correlation
from cryosieve.io.stack import StackReader
from cryosieve.io.star import read_particles
from cryosieve.reconstruct.api import nested_subset_maps, reconstruct_subsets
from cryosieve.retention import CANDIDATES, candidate_steps, choose_retention, map_information
from cryosieve.simulate import SimulationSettings, simulate_particles


def full_transform_shell_counts(box: int) -> np.ndarray:
    """Components of the full 3D transform of an ``n`` box per shell ``round(|k|)``, 0 .. n/2 (counted here
    directly, not with the package's shell helpers)."""
    k = np.fft.fftfreq(box, d=1.0 / box)
    radius = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    shells = np.round(radius).astype(int).ravel()
    return np.bincount(shells[shells <= box // 2], minlength=box // 2 + 1).astype(float)


def test_map_information_is_the_shell_sum_of_log_one_plus_ssnr() -> None:
    box = 32
    counts = full_transform_shell_counts(box)
    fsc = np.linspace(0.95, -0.2, box // 2 + 1)
    clipped = np.clip(fsc, 0.0, 0.999)
    expected = float(np.sum(counts[1:] * np.log1p(2 * clipped[1:] / (1 - clipped[1:]))))
    assert map_information(fsc, box) == pytest.approx(expected, rel=1e-12)
    assert map_information(np.zeros(box // 2 + 1), box) == 0.0


def test_candidate_steps_add_up_to_each_fixed_ratio() -> None:
    rng = np.random.default_rng(3)
    scores = rng.normal(size=301)
    scores[10] = scores[11]  # a tie: input order decides, as the fixed ratio does
    half = rng.integers(1, 3, size=301)
    fractions = [0.1, 0.35, 0.8, 1.0]
    steps = candidate_steps(scores, half, fractions)
    union = np.zeros(0, dtype=np.int64)
    for fraction, step in zip(fractions, steps, strict=True):
        assert np.all(np.diff(step) > 0) and not np.intersect1d(union, step).size
        union = np.union1d(union, step)
        expected = []
        for subset in (1, 2):
            members = np.flatnonzero(half == subset)
            expected += members[np.argsort(scores[members], kind="stable")][:round(fraction * members.size)].tolist()
        assert union.tolist() == sorted(expected)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("nested") / "data"
    simulate_particles(folder, SimulationSettings(num_particles=240, box=32, pixel_size=5.0, junk_fraction=0.1,
                                                  seed=5, half_maps=False))
    return folder


@pytest.mark.parametrize("engine", ["numba", "torch"])
def test_nested_maps_are_the_maps_of_each_union(small_set: Path, engine: str) -> None:
    table = read_particles(str(small_set / "particles.star"))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(table))
    steps = [np.sort(order[:60]), np.sort(order[60:170]), np.sort(order[170:])]
    with StackReader(table, str(small_set)) as reader:
        nested = list(nested_subset_maps(table, reader, steps, engine=engine))
        assert len(nested) == 3
        for index, maps in enumerate(nested):
            rows = np.sort(np.concatenate(steps[:index + 1]))
            direct = reconstruct_subsets(table, reader, rows=rows, engine=engine)
            for subset in (1, 2):
                scale = float(np.abs(direct[subset]).max())
                np.testing.assert_allclose(maps[subset], direct[subset], rtol=0, atol=1e-5 * scale)


def realistic_set(folder: Path, bad: float, seed: int) -> Path:
    """3,000 realistic particles at box 64; ``bad`` of them junk, empty, misaligned or off-centre."""
    base = SimulationSettings(num_particles=3000, box=64, pixel_size=2.5, seed=seed).realistic()
    settings = replace(base, junk_fraction=0.4 * bad, empty_fraction=0.2 * bad, misaligned_fraction=0.3 * bad,
                       wrong_origin_fraction=0.1 * bad)
    simulate_particles(folder, settings)
    return folder


def mutual_information_with_truth(first: np.ndarray, second: np.ndarray, truth: torch.Tensor, mask: torch.Tensor,
                                  counts: np.ndarray) -> float:
    """``-1/2 sum_s N_s ln(1 - rho_s^2)``: the information the full map shares with the true map (nats)."""
    rho = fourier_shell_correlation((torch.from_numpy(first) + torch.from_numpy(second)) * mask,
                                    truth * mask).numpy()
    rho = np.clip(rho[1:], 0.0, 0.999)
    return float(-0.5 * np.sum(counts[1:] * np.log1p(-rho ** 2)))


@pytest.mark.parametrize(("bad", "seed"), [(0.0, 31), (0.1, 32), (0.4, 33)])
def test_auto_lands_near_the_true_good_fraction(tmp_path: Path, bad: float, seed: int) -> None:
    data = realistic_set(tmp_path / "data", bad, seed)
    out = tmp_path / "out" / "auto.star"
    assert core_main(["--i", str(data / "particles.star"), "--directory", str(data), "--o", str(out),
                      "--volume", str(data / "half1.mrc"), "--volume", str(data / "half2.mrc"),
                      "--mask", str(data / "mask.mrc"), "--frequency", "20", "--retention_ratio", "auto",
                      "--quiet"]) == 0
    curve = pd.read_csv(tmp_path / "out" / "auto_retention.csv")
    assert curve["fraction"].tolist() == list(CANDIDATES) and curve["chosen"].sum() == 1
    assert curve["above_noise"].any()  # a realistic set: the choice is not said to be arbitrary
    chosen = float(curve.loc[curve["chosen"] == 1, "fraction"].iloc[0])
    assert chosen == curve["fraction"][curve["information"].idxmax()]
    truth_table = pd.read_csv(data / "truth.csv")
    is_bad = truth_table["is_bad"].to_numpy()
    good = 1.0 - is_bad.mean()
    scored = pd.read_csv(tmp_path / "out" / "auto_scores.csv")
    kept = scored["kept"].to_numpy().astype(bool)
    for subset in (1, 2):  # each half-set keeps round(chosen n) of its own
        members = scored["half_set"].to_numpy() == subset
        assert kept[members].sum() == round(chosen * members.sum())
    # Near the true good fraction: within 0.10 (two candidate steps; docs/benchmarks.md has the spread).
    assert abs(chosen - good) <= 0.10 + 1e-9
    if bad == 0.0:
        return
    # Against the truth: the map of the chosen set shares as much information with the true map as the best
    # fixed ratio's, within 1 %, and the chosen set removes most of the bad particles.
    table = read_particles(str(data / "particles.star"))
    scores, half = scored["score"].to_numpy(), scored["half_set"].to_numpy()
    truth = torch.from_numpy(mrcfile.read(data / "truth.mrc").astype(np.float32))
    mask = torch.from_numpy(mrcfile.read(data / "mask.mrc").astype(np.float32))
    counts = full_transform_shell_counts(64)
    with StackReader(table, str(data)) as reader:
        against_truth = [mutual_information_with_truth(maps[1], maps[2], truth, mask, counts)
                         for maps in nested_subset_maps(table, reader, candidate_steps(scores, half, CANDIDATES))]
    best = int(np.argmax(against_truth))
    assert against_truth[CANDIDATES.index(chosen)] >= 0.99 * against_truth[best]
    removed = (~kept & is_bad).sum() / is_bad.sum()
    assert removed >= 0.8


def test_auto_needs_two_half_sets(tmp_path: Path, small_set: Path) -> None:
    table = read_particles(str(small_set / "particles.star"))
    with StackReader(table, str(small_set)) as reader, pytest.raises(CryoSieveInputError, match="two half-sets"):
        choose_retention(table, reader, np.zeros(len(table)), np.ones(len(table), dtype=np.int64), None)


@pytest.mark.slow
def test_pipeline_chooses_each_round_and_reports_it(tmp_path: Path) -> None:
    from cryosieve.cli.pipeline import main as pipeline_main

    data = realistic_set(tmp_path / "data", 0.3, 34)
    prefix = tmp_path / "run" / "a"
    args = ["--i", str(data / "particles.star"), "--directory", str(data), "--o", str(prefix),
            "--mask", str(data / "mask.mrc"), "--num_iters", "2", "--frequency_start", "20", "--frequency_end", "12",
            "--retention_ratio", "auto", "--quiet"]
    assert pipeline_main(args) == 0
    summary = pd.read_csv(f"{prefix}_summary.csv")
    first = pd.read_csv(f"{prefix}_iter1_retention.csv")
    chosen = float(first.loc[first["chosen"] == 1, "fraction"].iloc[0])
    assert summary["retention_ratio"].iloc[0] == chosen
    assert summary["particles_half1"].iloc[1] == round(chosen * summary["particles_half1"].iloc[0])
    is_bad = pd.read_csv(data / "truth.csv")["is_bad"].to_numpy()
    assert abs(chosen - (1 - is_bad.mean())) <= 0.10 + 1e-9
    second = pd.read_csv(f"{prefix}_iter2_retention.csv")  # the cleaned set: most of it is kept
    assert float(second.loc[second["chosen"] == 1, "fraction"].iloc[0]) >= 0.85
    assert Path(f"{prefix}_retention.png").stat().st_size > 0
    page = Path(f"{prefix}_report.html").read_text()
    assert "Retention ratio chosen" in page and "(auto)" in page
    # resuming recomputes nothing and keeps the choice; a fixed ratio on the same prefix is a different run
    assert pipeline_main([*args, "--continue"]) == 0
    assert pd.read_csv(f"{prefix}_summary.csv").equals(summary)
    assert pipeline_main([*args[:-3], "--retention_ratio", "0.8", "--quiet", "--continue"]) == 2


def test_auto_without_half_sets_is_refused_before_any_output(tmp_path: Path, small_set: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import starfile

    star = starfile.read(small_set / "particles.star")
    star["particles"] = star["particles"].drop(columns=["rlnRandomSubset"])
    single = tmp_path / "single.star"
    starfile.write(star, single)
    out = tmp_path / "out" / "k.star"
    code = core_main(["--i", str(single), "--directory", str(small_set), "--o", str(out),
                      "--volume", str(small_set / "truth.mrc"), "--frequency", "20", "--retention_ratio", "auto",
                      "--quiet"])
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--retention_ratio auto" in error[0] and "Traceback" not in error[0]
    assert not out.parent.exists() or not any(out.parent.iterdir())


# --------------------------------------------------------------------------- is any candidate above noise?


def soft_sphere(box: int, radius: float, edge: float) -> np.ndarray:
    """A raised-cosine sphere ``(n, n, n)`` (made here, not with the package's masks)."""
    grid = np.arange(box) - box // 2
    r = np.sqrt(grid[:, None, None] ** 2 + grid[None, :, None] ** 2 + grid[None, None, :] ** 2)
    return np.where(r <= radius, 1.0, np.where(r >= radius + edge, 0.0,
                                               0.5 + 0.5 * np.cos(np.pi * (r - radius) / edge))).astype(np.float32)


def shell_fsc(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """FSC per shell ``round(|k|)``, 0 .. n/2, of two ``(n, n, n)`` maps (numpy, written here)."""
    box = first.shape[0]
    k = np.fft.fftfreq(box, d=1.0 / box)
    shells = np.round(np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)).astype(int)
    inside = shells <= box // 2
    a, b = np.fft.fftn(first)[inside], np.fft.fftn(second)[inside]
    index, length = shells[inside], box // 2 + 1
    cross = np.bincount(index, (a * np.conj(b)).real, length)
    return cross / np.sqrt(np.bincount(index, np.abs(a) ** 2, length) * np.bincount(index, np.abs(b) ** 2, length))


def test_information_z_is_a_standard_normal_for_maps_that_share_nothing() -> None:
    """Pairs of independent noise maps, masked or not: z has mean 0 and standard deviation 1 (the mask's fraction
    of independent components corrects the spread); a shared signal gives a large z."""
    from cryosieve.retention import information_z, mask_fraction

    box = 32
    rng = np.random.default_rng(7)
    for mask in (None, soft_sphere(box, 8, 4)):
        weights = np.ones((box,) * 3) if mask is None else mask
        fraction = mask_fraction(mask)
        z = [information_z(shell_fsc(rng.normal(size=(box,) * 3) * weights, rng.normal(size=(box,) * 3) * weights),
                           box, fraction) for _ in range(300)]
        assert abs(np.mean(z)) < 0.2 and 0.85 < np.std(z) < 1.15, (mask is None, np.mean(z), np.std(z))
    sharp = (soft_sphere(box, 8, 0.001) > 0.5).astype(np.float32)
    assert mask_fraction(None) == 1.0 and mask_fraction(sharp) == pytest.approx(float(np.mean(sharp)))
    signal = rng.normal(size=(box,) * 3)
    shared = [signal + rng.normal(size=(box,) * 3) * 3 for _ in range(2)]  # FSC about 0.1 in every shell
    assert information_z(shell_fsc(*shared), box) > 8


@pytest.fixture(scope="module")
def signal_and_noise(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """400 realistic particles at box 32 (with half maps), and the same particles as pure noise."""
    import shutil

    root = tmp_path_factory.mktemp("signal_noise")
    simulate_particles(root / "signal", SimulationSettings(num_particles=400, box=32, pixel_size=5.0,
                                                           seed=8).realistic())
    shutil.copytree(root / "signal", root / "noise")
    with mrcfile.open(root / "noise" / "particles.mrcs", mode="r+") as handle:
        handle.data[...] = np.random.default_rng(9).normal(size=handle.data.shape).astype(np.float32)
    return root / "signal", root / "noise"


def test_pure_noise_is_said_to_hold_no_information_and_a_realistic_set_is_not(
        signal_and_noise: tuple[Path, Path]) -> None:
    signal, noise = signal_and_noise
    mask = mrcfile.read(signal / "mask.mrc").astype(np.float32)
    found = {}
    for folder in (signal, noise):
        table = read_particles(str(folder / "particles.star"))
        scores = np.random.default_rng(10).normal(size=len(table))
        with StackReader(table, str(folder)) as reader:
            found[folder] = choose_retention(table, reader, scores, table.random_subset, mask,
                                             fractions=(0.5, 0.75, 1.0))
    assert found[signal].above_noise and found[signal].z.max() > 10, found[signal].z
    assert not found[noise].above_noise and np.all(np.abs(found[noise].z) < 4), found[noise].z


def test_auto_on_pure_noise_warns_and_flags_the_table(signal_and_noise: tuple[Path, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The run completes with one warning line; every candidate of ``_retention.csv`` is below noise (it picked an
    arbitrary fraction without a word)."""
    signal, noise = signal_and_noise
    out = tmp_path / "out" / "k.star"
    code = core_main(["--i", str(noise / "particles.star"), "--directory", str(noise), "--o", str(out),
                      "--volume", str(signal / "half1.mrc"), "--volume", str(signal / "half2.mrc"),
                      "--mask", str(signal / "mask.mrc"), "--frequency", "30", "--retention_ratio", "auto",
                      "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 0
    warned = [line for line in err if "no candidate's half maps share information beyond noise" in line]
    assert len(warned) == 1 and "is arbitrary" in warned[0], err
    curve = pd.read_csv(tmp_path / "out" / "k_retention.csv")
    assert list(curve.columns) == ["fraction", "information", "chosen", "z", "above_noise"]
    assert curve["above_noise"].sum() == 0 and curve["chosen"].sum() == 1 and (curve["z"] < 5).all()
