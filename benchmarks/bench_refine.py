"""Wall time and accuracy of ``cryosieve-refine`` and ``cryosieve-rhbfactor`` with both back-ends.

A known-truth set is simulated (``cryosieve-simulate``'s library: the bundled PDB 1BD2, no
junk, envelope B-factors uniform in [0, 50] Å²), then each command runs as a separate process
from the command line, one after the other:

* ``cryosieve-refine --backend relion`` (global searches from the set's own reference) and
  ``--backend fixed``: wall time, resolution, and for RELION the refined poses' angular error
  against the truth (after the common rotation of the frame, which is ~0 here);
* ``cryosieve-rhbfactor --halves H`` with both back-ends: wall time and both RH B-factors.

RELION runs as ``mpirun --oversubscribe -n 3 relion_refine_mpi --j 1`` (three ranks on any
number of cores; as root, ``OMPI_ALLOW_RUN_AS_ROOT`` is set for it).

Example::

    python benchmarks/bench_refine.py --count 400 --box 40 --angpix 4 --snr 0.3 --halves 2
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import starfile
from scipy.spatial.transform import Rotation

from cryosieve.simulate import SimulationSettings, simulate_particles

RELION = "mpirun --oversubscribe -n 3 relion_refine_mpi"


def run(command: list[str], log: Path) -> float:
    """Run ``command`` with its output in ``log``; its wall time in seconds."""
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    start = time.perf_counter()
    with open(log, "wb") as handle:
        subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, check=True)
    return time.perf_counter() - start


def pose_error(truth: Path, refined: Path) -> tuple[float, float]:
    """Median angular error (degrees) of the refined poses after the common frame rotation, and that
    rotation's angle."""
    def rotations(table: pd.DataFrame) -> Rotation:
        return Rotation.from_euler("ZYZ", table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(),
                                   degrees=True)

    true_table = starfile.read(truth)["particles"]
    found = starfile.read(refined)["particles"].set_index("rlnImageName").loc[true_table["rlnImageName"]]
    relative = rotations(found).inv() * rotations(true_table)
    frame = relative.mean()
    return float(np.median(np.degrees((relative * frame.inv()).magnitude()))), float(np.degrees(frame.magnitude()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--box", type=int, default=40)
    parser.add_argument("--angpix", type=float, default=4.0)
    parser.add_argument("--snr", type=float, default=0.3)
    parser.add_argument("--halves", type=int, default=2)
    parser.add_argument("--skip_rh_relion", action="store_true", help="no cryosieve-rhbfactor with RELION.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        settings = SimulationSettings(num_particles=args.count, box=args.box, pixel_size=args.angpix,
                                      junk_fraction=0.0, snr=args.snr, bfactor_min=0.0, bfactor_max=50.0, seed=3,
                                      half_maps=False)
        simulate_particles(folder / "data", settings)
        star = folder / "data" / "particles.star"
        common = ["--i", str(star), "--directory", str(folder / "data"), "--quiet"]
        rows = []
        for backend in ("relion", "fixed"):
            out = folder / f"refine_{backend}" / "summary.csv"
            out.parent.mkdir()
            seconds = run([sys.executable, "-m", "cryosieve.cli.refine", *common, "--o", str(out), "--backend",
                           backend, "--relion_refine", RELION], folder / f"refine_{backend}.log")
            row = pd.read_csv(out).iloc[0]
            error = pose_error(star, Path(row["alignment3D"])) if backend == "relion" else (0.0, 0.0)
            rows.append(f"| `cryosieve-refine --backend {backend}` | {seconds:,.0f} | {row['resolution (A)']:.2f} | "
                        f"{error[0]:.1f} (frame {error[1]:.1f}) | |")
        for backend in ("relion", "fixed"):
            if backend == "relion" and args.skip_rh_relion:
                continue
            out = folder / f"rh_{backend}" / "rh.csv"
            out.parent.mkdir()
            seconds = run([sys.executable, "-m", "cryosieve.cli.rhbfactor", *common, "--o", str(out), "--backend",
                           backend, "--relion_refine", RELION, "--halves", str(args.halves)],
                          folder / f"rh_{backend}.log")
            row = pd.read_csv(out).iloc[0]
            rows.append(f"| `cryosieve-rhbfactor --backend {backend} --halves {args.halves}` | {seconds:,.0f} | "
                        f"{row['resolution (A)']:.2f} | | {row['RH-b-factor (A^2)']:.0f} / "
                        f"{row['classical RH-b-factor (A^2)']:.0f} |")
    print(f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} cores; {args.count} particles, box "
          f"{args.box}, {args.angpix:g} Å/px, SNR {args.snr:g}")
    print("| command | wall time (s) | resolution (Å) | median pose error (°) | RH B: published / straight line (Å²) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
