"""Accuracy of ``--retention_ratio auto`` against the known truth, over bad fractions, sizes and seeds.

For each realistic simulation (``cryosieve-simulate`` defects: junk 40 %, empty images 20 %,
misaligned poses 30 % and wrong origins 10 % of the bad fraction), one sieve at ``--frequency``
scores every particle against the simulation's half maps; then

* ``auto``: the fraction :func:`cryosieve.retention.choose_retention` picks from the half maps;
* ``best fixed``: the fixed ratio (same candidates, 0.10 ... 1.00) whose full map shares the most
  information with the true map, ``-1/2 sum_s N_s ln(1 - rho_s^2)`` (``rho_s``: FSC with the truth
  in the simulation's mask, computed here with numpy);

and the table gives the true good fraction, both fractions, the bad particles each removes and
the auto set's information with the truth relative to the best fixed ratio's.

Examples::

    python benchmarks/bench_retention.py                        # 3,000 particles, 0 / 10 / 25 / 40 % bad, 3 seeds
    python benchmarks/bench_retention.py --count 20000 --seeds 1 --bad 0.25 0.4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd

from cryosieve.io.mrc import read_volume
from cryosieve.io.stack import StackReader
from cryosieve.io.star import read_particles
from cryosieve.reconstruct.api import nested_subset_maps
from cryosieve.retention import CANDIDATES, candidate_steps, choose_retention
from cryosieve.selection import select_lowest
from cryosieve.settings import SieveSettings
from cryosieve.sieve import load_inputs, sieve
from cryosieve.simulate import SimulationSettings, simulate_particles


def shell_counts(box: int) -> np.ndarray:
    k = np.fft.fftfreq(box, d=1.0 / box)
    radius = np.round(np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)).astype(int)
    return np.bincount(radius.ravel()[radius.ravel() <= box // 2], minlength=box // 2 + 1).astype(float)


def fsc(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    size = first.shape[0]
    a, b = np.fft.fftn(first), np.fft.fftn(second)
    k = np.fft.fftfreq(size, d=1.0 / size)
    shells = np.round(np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)).astype(int)
    keep = shells <= size // 2
    index = shells[keep]
    cross = np.bincount(index, (a * np.conj(b)).real[keep], minlength=size // 2 + 1)
    power = np.bincount(index, (np.abs(a) ** 2)[keep], minlength=size // 2 + 1) * \
        np.bincount(index, (np.abs(b) ** 2)[keep], minlength=size // 2 + 1)
    return np.where(power > 0, cross / np.sqrt(np.maximum(power, 1e-300)), 0.0)


def one_case(folder: Path, count: int, bad: float, seed: int, frequency: float) -> dict[str, float]:
    base = SimulationSettings(num_particles=count, box=64, pixel_size=2.5, seed=seed).realistic()
    simulate_particles(folder, replace(base, junk_fraction=0.4 * bad, empty_fraction=0.2 * bad,
                                       misaligned_fraction=0.3 * bad, wrong_origin_fraction=0.1 * bad))
    table = read_particles(str(folder / "particles.star"))
    settings = SieveSettings(retention_ratio=1.0, highpass_angstrom=frequency)
    with StackReader(table, str(folder)) as reader:
        reader, volumes, mask, half = load_inputs(table, str(folder), [str(folder / "half1.mrc"),
                                                                       str(folder / "half2.mrc")],
                                                  str(folder / "mask.mrc"), settings, reader)
        scores = sieve(table, reader, volumes, mask, half, settings).scores
        started = time.perf_counter()
        choice = choose_retention(table, reader, scores, half, mask.data if mask is not None else None)
        seconds = time.perf_counter() - started
        truth = mrcfile.read(folder / "truth.mrc").astype(np.float64)
        weights = read_volume(str(folder / "mask.mrc")).data.astype(np.float64)
        counts = shell_counts(64)
        information = []
        for maps in nested_subset_maps(table, reader, candidate_steps(scores, half, CANDIDATES)):
            rho = np.clip(fsc((maps[1] + maps[2]) * weights, truth * weights)[1:], 0.0, 0.999)
            information.append(float(-0.5 * np.sum(counts[1:] * np.log1p(-rho ** 2))))
    is_bad = pd.read_csv(folder / "truth.csv")["is_bad"].to_numpy()
    best = CANDIDATES[int(np.argmax(information))]

    def removed(fraction: float) -> float:
        kept = select_lowest(scores, half, fraction)
        return float((~kept & is_bad).sum() / is_bad.sum()) if is_bad.any() else float("nan")

    return {"count": count, "bad": bad, "seed": seed, "true_good": float(1 - is_bad.mean()), "auto": choice.chosen,
            "best_fixed": best, "removed_auto": removed(choice.chosen), "removed_best": removed(best),
            "information_vs_best": information[CANDIDATES.index(choice.chosen)] / max(information),
            "choose_seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--bad", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.4])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--frequency", type=float, default=20.0)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    print("| particles | bad | seed | true good | auto | best fixed | bad removed: auto | best fixed |"
          " information vs best |")
    print("|---|---|---|---|---|---|---|---|---|")
    for bad in args.bad:
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as temporary:
                row = one_case(Path(temporary) / "data", args.count, bad, 100 + seed, args.frequency)
            rows.append(row)
            print(f"| {row['count']} | {bad:.0%} | {seed} | {row['true_good']:.3f} | {row['auto']:.2f} | "
                  f"{row['best_fixed']:.2f} | {row['removed_auto']:.3f} | {row['removed_best']:.3f} | "
                  f"{row['information_vs_best']:.4f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
