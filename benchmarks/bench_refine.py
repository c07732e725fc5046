"""Wall time and accuracy of ``cryosieve-refine`` and ``cryosieve-rhbfactor`` with both back-ends.

Known-truth sets are simulated (``cryosieve-simulate``'s library, the bundled PDB 1BD2), then
each command runs as a separate process from the command line, one after the other:

1. a clean set (no junk, envelope B-factors uniform in [0, 50] Å²):
   ``cryosieve-refine --backend relion`` (global searches from the set's own reference) and
   ``--backend fixed``: wall time, resolution, and for RELION the refined poses' median angular
   error against the truth (after the common rotation of the frame, which should be ~0);
2. a set with 10 % junk and envelope B-factors uniform in [0, 300] Å², sieved once by
   ``cryosieve-core`` (``--retention_ratio 0.6``): ``cryosieve-rhbfactor --halves H`` on the full
   and the kept set with RELION's local refinement (``--local``) and with fixed poses: wall time
   and both RH B-factors.

RELION runs as ``mpirun --oversubscribe -n 3 relion_refine_mpi --j 1`` (three ranks on any
number of cores; ``OMPI_ALLOW_RUN_AS_ROOT`` is set for it).

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
    # a map turned by Q is seen at poses Q R_i (scipy's active rotations of RELION's Euler angles)
    relative = rotations(found) * rotations(true_table).inv()
    frame = relative.mean()
    return float(np.median(np.degrees((relative * frame.inv()).magnitude()))), float(np.degrees(frame.magnitude()))


def simulate(folder: Path, args: argparse.Namespace, count: int, junk: float, bfactor_max: float,
             half_maps: bool) -> Path:
    settings = SimulationSettings(num_particles=count, box=args.box, pixel_size=args.angpix, junk_fraction=junk,
                                  snr=args.snr, bfactor_min=0.0, bfactor_max=bfactor_max, seed=3, half_maps=half_maps)
    simulate_particles(folder, settings)
    return folder / "particles.star"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=400, help="particles of the clean set (the mixed set: twice)")
    parser.add_argument("--box", type=int, default=40)
    parser.add_argument("--angpix", type=float, default=4.0)
    parser.add_argument("--snr", type=float, default=0.3)
    parser.add_argument("--halves", type=int, default=2)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        star = simulate(folder / "clean", args, args.count, 0.0, 50.0, half_maps=False)
        for backend in ("relion", "fixed"):
            out = folder / f"refine_{backend}" / "summary.csv"
            out.parent.mkdir()
            seconds = run([sys.executable, "-m", "cryosieve.cli.refine", "--i", str(star), "--directory",
                           str(star.parent), "--quiet", "--o", str(out), "--backend", backend, "--relion_refine",
                           RELION], folder / f"refine_{backend}.log")
            row = pd.read_csv(out).iloc[0]
            error = (f"{pose_error(star, Path(row['alignment3D']))[0]:.1f} (frame "
                     f"{pose_error(star, Path(row['alignment3D']))[1]:.1f})") if backend == "relion" else ""
            rows.append(f"| clean set, `cryosieve-refine --backend {backend}` | {row['number of particles']} | "
                        f"{seconds:,.0f} | {row['resolution (A)']:.2f} | {error} | |")
        mixed = simulate(folder / "mixed", args, 2 * args.count, 0.1, 300.0, half_maps=True)
        kept = folder / "sieve" / "kept.star"
        kept.parent.mkdir()
        run([sys.executable, "-m", "cryosieve.cli.core", "--i", str(mixed), "--o", str(kept), "--directory",
             str(mixed.parent), "--volume", str(mixed.parent / "half1.mrc"), "--volume",
             str(mixed.parent / "half2.mrc"), "--mask", str(mixed.parent / "mask.mrc"), "--retention_ratio", "0.6",
             "--frequency", f"{2.5 * args.angpix:g}", "--quiet"], folder / "sieve.log")
        for name, source in (("full", mixed), ("kept", kept)):
            for backend, extra in (("relion", ["--local"]), ("fixed", [])):
                out = folder / f"rh_{name}_{backend}" / "rh.csv"
                out.parent.mkdir()
                seconds = run([sys.executable, "-m", "cryosieve.cli.rhbfactor", "--i", str(source), "--directory",
                               str(mixed.parent), "--quiet", "--o", str(out), "--backend", backend, "--relion_refine",
                               RELION, "--halves", str(args.halves), *extra], folder / f"rh_{name}_{backend}.log")
                row = pd.read_csv(out).iloc[0]
                count = len(starfile.read(source)["particles"])
                label = "RELION local" if backend == "relion" else "fixed poses"
                rows.append(f"| {name} mixed set, `cryosieve-rhbfactor --halves {args.halves}`, {label} | {count} | "
                            f"{seconds:,.0f} | {row['resolution (A)']:.2f} | | {row['RH-b-factor (A^2)']:.0f} / "
                            f"{row['classical RH-b-factor (A^2)']:.0f} |")
    print(f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} cores; box {args.box}, {args.angpix:g} Å/px, "
          f"SNR {args.snr:g}")
    print("| run | particles | wall time (s) | resolution (Å) | median pose error (°) | RH B: published / straight "
          "line (Å²) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
