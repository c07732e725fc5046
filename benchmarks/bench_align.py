"""Wall time and accuracy of the built-in gold-standard local refinement, beside RELION's local searches.

A known-truth set is simulated once (``cryosieve-simulate``'s library, the bundled PDB 1BD2, no junk, envelope
B-factors uniform in [0, 100] Å², SNR 0.05), and ``--misaligned`` of its particles have their STAR poses turned
by 5-15 degrees and their origins moved by 3-5 pixels (``tests/align_data.py``, seeded). Then, each as a
process of its own from the command line, one after the other:

1. ``cryosieve-refine --backend builtin --iterations N`` on the whole set (``--count`` particles): wall time,
   the load of the machine before and after, the resolution, and the pose and origin errors against the truth;
2. with ``--relion_count M``, the first ``M`` particles (both half-sets) refined twice: by the same built-in
   command, and by ``mpirun --oversubscribe -n 3 relion_refine_mpi`` with local searches from the same start
   (the map of the given poses, low-passed to ``--ini_high``, 10 Å): ``--sigma_ang search_range / 3`` (RELION
   searches to 3 standard deviations), ``--offset_range`` the shift range, ``--healpix_order 4
   --auto_local_healpix_order 4``, ``--offset_step 1``, ``--particle_diameter`` the box (the particle fills
   it), ``--j 1`` and the rest of ``cryosieve-refine --backend relion``'s line: wall times, resolutions (both
   post-processed by the built-in post-processing with the simulation's mask) and errors.

Example (the figures of docs/benchmarks.md)::

    python3 benchmarks/bench_align.py --count 10000 --box 128 --angpix 1.25 --iterations 3 --relion_count 1000
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from align_data import misalign, simulate
from cryosieve.align import angle_between
from cryosieve.geometry import euler_to_matrix
from cryosieve.io.star import read_particles


def load() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


#: CPU seconds (user + system) of the commands run so far, by :func:`run`.
CPU_SECONDS: list[float] = []


def children_cpu() -> float:
    """CPU seconds (user + system) of every finished child process so far."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(command: list[str], log: Path, cwd: Path | None = None) -> float:
    """Run ``command`` with its output in ``log``; its wall time in seconds (its CPU time is appended to
    :data:`CPU_SECONDS`)."""
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    start, cpu = time.perf_counter(), children_cpu()
    with open(log, "wb") as handle:
        handle.write(("$ " + shlex.join(command) + "\n").encode())
        handle.flush()
        subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, check=True, cwd=cwd)
    CPU_SECONDS.append(children_cpu() - cpu)
    return time.perf_counter() - start


def errors(refined: Path, truth: np.ndarray, origin: np.ndarray, rows: np.ndarray, turned: np.ndarray
           ) -> dict[str, float]:
    """Median angle (degrees) and origin (pixels) from the truth, of the misaligned and of the other particles."""
    table = read_particles(refined)
    angle = angle_between(euler_to_matrix(table.rot, table.tilt, table.psi), truth[rows])
    shift = np.hypot(table.origin_x - origin[rows, 0], table.origin_y - origin[rows, 1])
    return {"misaligned angle error (deg)": float(np.median(angle[turned[rows]])),
            "misaligned origin error (px)": float(np.median(shift[turned[rows]])),
            "other angle error (deg)": float(np.median(angle[~turned[rows]])),
            "other origin error (px)": float(np.median(shift[~turned[rows]]))}


def builtin(star: Path, folder: Path, out: Path, args: argparse.Namespace) -> tuple[float, Path]:
    """``cryosieve-refine --backend builtin``: wall time and the refined STAR file."""
    command = [sys.executable, "-m", "cryosieve.cli.refine", "--i", str(star), "--o", str(out / "summary.csv"),
               "--directory", str(folder), "--backend", "builtin", "--iterations", str(args.iterations),
               "--mask", str(folder / "mask.mrc"), "--quiet"]
    seconds = run(command, out / "builtin.log")
    summary = pd.read_csv(out / "summary.csv")
    return seconds, Path(summary["alignment3D"].iloc[0])


def relion(star: Path, folder: Path, out: Path, args: argparse.Namespace) -> tuple[float, float, Path]:
    """RELION's gold-standard auto-refinement with local searches from the map of the given poses: wall time (its
    reference included), the resolution of its half maps by the built-in post-processing, its STAR file."""
    from cryosieve.backends import RefinementJob
    from cryosieve.backends.builtin import measure_half_maps
    from cryosieve.backends.relion import RelionRefiner
    from cryosieve.io.mrc import write_volume
    from cryosieve.io.stack import StackReader
    from cryosieve.reconstruct import reconstruct

    table = read_particles(star)
    box, pixel = int(args.box), float(args.angpix)
    job = RefinementJob(particles_star=star, folder=out, directory=folder, symmetry="C1", pixel_size=pixel, box=box,
                        reference=out / "reference.mrc", ini_high=args.ini_high, mask=folder / "mask.mrc",
                        particle_diameter=box * pixel, local=True, seed=1, log=out / "relion.log")
    refiner = RelionRefiner.from_command_line("mpirun --oversubscribe --allow-run-as-root -n 3 relion_refine_mpi", 1)
    command = refiner.command(job, out / "reference.mrc")
    replace = {"--sigma_ang": f"{args.search_range / 3:g}", "--offset_range": f"{args.shift_range:g}"}
    for flag, value in replace.items():
        command[command.index(flag) + 1] = value
    start = time.perf_counter()
    with StackReader(table, folder) as reader:
        write_volume(out / "reference.mrc", reconstruct(table, reader), pixel)
    seconds = time.perf_counter() - start + run(command, out / "relion.log", cwd=folder)
    halves = (out / "run_half1_class001_unfil.mrc", out / "run_half2_class001_unfil.mrc")
    report = measure_half_maps(halves, job)
    return seconds, float(report.summary["final_resolution_angstrom"]), out / "run_data.star"  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--angpix", type=float, default=1.25)
    parser.add_argument("--snr", type=float, default=0.05)
    parser.add_argument("--misaligned", type=float, default=0.3)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--search_range", type=float, default=15.0)
    parser.add_argument("--shift_range", type=float, default=5.0)
    parser.add_argument("--ini_high", type=float, default=10.0, help="RELION's --ini_high (Å), 10 by default")
    parser.add_argument("--relion_count", type=int, default=0, help="particles of the RELION comparison (0: none)")
    parser.add_argument("--skip_relion", action="store_true", help="with --relion_count, the built-in run only")
    parser.add_argument("--skip_full", action="store_true", help="not the run on the whole set")
    parser.add_argument("--work", default="/tmp/cryosieve-bench-align", help="folder of the data and the runs")
    args = parser.parse_args()
    work = Path(args.work)
    folder = work / f"data_{args.count}_{args.box}"
    if not (folder / "particles.star").is_file():
        simulate(folder, args.count, args.box, args.angpix, args.snr, bfactor=(0.0, 100.0))
    data = misalign(folder / "particles.star", folder / "misaligned.star", args.misaligned)
    rows = np.arange(args.count)
    print(f"# {datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}")
    results: list[dict[str, object]] = []

    def record(name: str, particles: int, seconds: float, before: float, refined: Path, resolution: float,
               chosen: np.ndarray) -> None:
        row = {"run": name, "particles": particles, "wall (s)": round(seconds, 1),
               "CPU of the command (s)": round(CPU_SECONDS[-1], 1),
               "load before/after": f"{before:.1f}/{load():.1f}", "resolution (A)": round(resolution, 2),
               **{key: round(value, 3) for key, value in errors(refined, data.truth, data.origin, chosen,
                                                                  data.turned).items()}}
        results.append(row)
        print(json.dumps(row), flush=True)

    if not args.skip_full:
        out = work / f"builtin_{args.count}"
        out.mkdir(parents=True, exist_ok=True)
        before = load()
        seconds, refined = builtin(data.star, folder, out, args)
        resolution = float(pd.read_csv(out / "summary.csv")["resolution (A)"].iloc[0])
        record(f"cryosieve-refine --backend builtin --iterations {args.iterations}", args.count, seconds, before,
               refined, resolution, rows)
    if args.relion_count:
        subset = np.arange(args.relion_count)
        table = read_particles(data.star).subset(subset)
        star = folder / f"misaligned_{args.relion_count}.star"
        table.write(star)
        out = work / f"builtin_{args.relion_count}"
        out.mkdir(parents=True, exist_ok=True)
        before = load()
        seconds, refined = builtin(star, folder, out, args)
        resolution = float(pd.read_csv(out / "summary.csv")["resolution (A)"].iloc[0])
        record(f"cryosieve-refine --backend builtin --iterations {args.iterations}", args.relion_count, seconds,
               before, refined, resolution, subset)
    if args.relion_count and not args.skip_relion:
        subset = np.arange(args.relion_count)
        star = folder / f"misaligned_{args.relion_count}.star"
        out = work / f"relion_{args.relion_count}"
        out.mkdir(parents=True, exist_ok=True)
        before = load()
        seconds, resolution, refined = relion(star, folder, out, args)
        record("mpirun -n 3 relion_refine_mpi (local searches)", args.relion_count, seconds, before, refined,
               resolution, subset)
    print(pd.DataFrame(results).to_string(index=False))


if __name__ == "__main__":
    main()
