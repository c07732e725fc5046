"""Every command's outputs on one fixed data set, to compare two versions of the package.

A change that should not change results (a restructuring, a faster kernel) is checked by
running this script with each version's ``src`` first on ``PYTHONPATH`` over the same data
set, then comparing the two output folders::

    python benchmarks/compare_outputs.py data  --simulate       # once: the data set
    PYTHONPATH=OLD/src python benchmarks/compare_outputs.py data --o before
    PYTHONPATH=NEW/src python benchmarks/compare_outputs.py data --o after
    python benchmarks/compare_outputs.py data --compare before after

The comparison prints, per file, ``identical`` or the largest difference: scores relative to
their spread, maps relative to their maximum, and how many particles changed side.
Thread counts are fixed (``OMP_NUM_THREADS``, ``NUMBA_NUM_THREADS``) so that both runs
do the same arithmetic.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd

THREADS = "2"


def run(program: str, args: list[str], cwd: Path) -> None:
    environment = dict(os.environ, OMP_NUM_THREADS=THREADS, NUMBA_NUM_THREADS=THREADS)
    result = subprocess.run([sys.executable, "-m", f"cryosieve.cli.{program}", *args], cwd=cwd, env=environment,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{program} {' '.join(args)} failed: {result.stderr.strip()}")


def simulate(data: Path) -> None:
    run("simulate", ["--o", str(data), "--num_particles", "3000", "--box", "64", "--angpix", "2.5", "--seed", "3",
                     "--realistic", "--quiet"], Path.cwd())


def outputs(data: Path, out: Path) -> None:
    out = out.resolve()
    out.mkdir(parents=True)
    core = ["--i", "particles.star", "--volume", "half1.mrc", "--volume", "half2.mrc", "--mask", "mask.mrc",
            "--frequency", "12", "--quiet", "--device", "cpu"]
    run("core", [*core, "--o", str(out / "fixed" / "k.star"), "--retention_ratio", "0.7"], data)
    run("core", [*core, "--o", str(out / "auto" / "k.star"), "--retention_ratio", "auto"], data)
    run("core", [*core, "--o", str(out / "two" / "k.star"), "--retention_ratio", "0.7", "--num_gpus", "2"], data)
    run("core", [*core, "--o", str(out / "views" / "k.star"), "--retention_ratio", "0.5", "--keep_orientations"],
        data)
    run("reconstruct", ["--i", "particles.star", "--o", str(out / "map.mrc"), "--ctf", "--quiet", "--device", "cpu",
                        "--subset", "1"], data)
    run("postprocess", ["--i", "half1.mrc", "--i2", "half2.mrc", "--mask", "mask.mrc", "--o",
                        str(out / "post" / "p"), "--auto_bfac", "--quiet"], data)
    run("pipeline", ["--i", "particles.star", "--mask", "mask.mrc", "--o", str(out / "run" / "r_"), "--num_iters",
                     "2", "--frequency_start", "20", "--frequency_end", "10", "--retention_ratio", "0.8", "--quiet",
                     "--device", "cpu", "--no-report"], data)


def _compare_file(first: Path, second: Path) -> str:
    if first.read_bytes() == second.read_bytes():
        return "identical"
    if first.suffix == ".mrc":
        a, b = mrcfile.read(first).astype(np.float64), mrcfile.read(second).astype(np.float64)
        return f"map differs by {np.abs(a - b).max() / np.abs(a).max():.2e} of its maximum"
    if first.name.endswith("_scores.csv"):
        a, b = pd.read_csv(first), pd.read_csv(second)
        spread = float(a["score"].std())
        changed = int((a["kept"] != b["kept"]).sum())
        return (f"scores differ by {np.abs(a['score'] - b['score']).max() / spread:.2e} of their spread; "
                f"{changed} particles changed side")
    if first.suffix == ".csv":
        a, b = pd.read_csv(first), pd.read_csv(second)
        numeric = a.select_dtypes("number").columns
        if list(a.columns) == list(b.columns) and len(a) == len(b):
            difference = (a[numeric] - b[numeric]).abs().max().max()
            return f"table differs (largest numeric difference {difference:.3g})"
    return "differs"


def compare(first: Path, second: Path) -> int:
    names = sorted({path.relative_to(root) for root in (first, second) for path in root.rglob("*")
                    if path.is_file() and path.suffix != ".log"})  # logs carry times
    different = 0
    for name in names:
        if not (first / name).exists() or not (second / name).exists():
            print(f"{name}: only in {'the first' if (first / name).exists() else 'the second'}")
            different += 1
            continue
        verdict = _compare_file(first / name, second / name)
        different += verdict != "identical"
        print(f"{name}: {verdict}")
    return 1 if different else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="the data set's folder")
    parser.add_argument("--simulate", action="store_true", help="make the data set")
    parser.add_argument("--o", type=Path, help="write every output into this new folder")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("FIRST", "SECOND"))
    args = parser.parse_args()
    if args.simulate:
        simulate(args.data)
    if args.o:
        outputs(args.data.resolve(), args.o)
    if args.compare:
        return compare(*args.compare)
    return 0


if __name__ == "__main__":
    sys.exit(main())
