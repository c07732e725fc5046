"""The demo's rounds held against the truth the simulation knows: for each set of a cryosieve run, its
particles, how many bad particles (empty, junk, misaligned, wrong origin) are left, its resolution as reported
(gold-standard half maps, given poses) and the resolution of its map against the true map (FSC 0.5 of the
average of the half maps with the masked truth).

    python3 scripts/demo_truth.py demo_data demo_output/
"""

from __future__ import annotations

import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile
import torch

from cryosieve.fsc import fourier_shell_correlation, resolution_at_threshold


def main(data: Path, prefix: str) -> None:
    truth = pd.read_csv(data / "truth.csv").set_index("rlnImageName")
    mask = mrcfile.read(data / "mask.mrc").astype(np.float64)
    true_map = torch.from_numpy(mrcfile.read(data / "truth.mrc").astype(np.float64) * mask)
    voxel = float(mrcfile.open(data / "truth.mrc", permissive=True).voxel_size.x)
    summary = pd.read_csv(prefix + "_summary.csv")
    print(f"{'set':>4} {'particles':>9} {'bad left':>14} {'resolution':>11} {'vs truth':>9}")
    for row in summary.itertuples():
        star = Path(f"{prefix}_iter{row.iteration}.star")
        if not star.exists():
            continue
        names = starfile.read(star, always_dict=True)["particles"]["rlnImageName"]
        bad = int(truth.loc[names, "is_bad"].sum())
        against = ""
        halves = [Path(f"{prefix}_iter{row.iteration}_half{subset}.mrc") for subset in (1, 2)]
        if all(path.exists() for path in halves):
            average = sum(mrcfile.read(path).astype(np.float64) for path in halves) / 2 * mask
            fsc = fourier_shell_correlation(torch.from_numpy(average), true_map)
            against = f"{resolution_at_threshold(fsc, average.shape[0], voxel, 0.5):.2f} Å"
        resolution = "" if np.isnan(row.resolution_angstrom) else f"{row.resolution_angstrom:.2f} Å"
        marker = "  <- best" if row.best else ""
        print(f"{row.iteration:>4} {len(names):>9} {bad:>6} ({100 * bad / len(names):4.1f} %) {resolution:>11} "
              f"{against:>9}{marker}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
