"""Scaling: time against particles and box, against ranks of a ``torchrun`` job, and against RELION's MPI.

Three parts, each optional (``--parts``):

* ``size``: in one process, scoring (:func:`cryosieve.scoring.score_rows`, cut-off 10 Å) and
  reconstruction of both half maps (:func:`cryosieve.reconstruct.reconstruct_subsets`) of noise
  stacks of ``--counts`` particles at each of ``--boxes``, the stack in the page cache; the table
  gives seconds and particles per second, which stay flat when the cost is linear in particles;
* ``ranks``: ``cryosieve-core`` (scoring) and ``cryosieve-reconstruct`` (one map, CTF) of
  ``--rank_count`` particles at ``--rank_box`` as one process and under ``torchrun --standalone``
  with 2 and 3 CPU ranks: wall time of the command (start-up included), speed-up, and each job's
  time in collectives (largest over its ranks; ``CRYOSIEVE_JOB_TIMINGS``);
* ``relion``: the same reconstruction by ``mpirun -n N relion_reconstruct_mpi --ctf`` for
  N = 2 and 3 (RELION's MPI version needs a leader rank and at least one follower; the leader
  reconstructs too) against ours with the same number of ranks.

The images are Gaussian noise with random poses, origins and CTFs (the work does not depend on
the pixel values), made by ``bench_reconstruct.make_data``.

Examples::

    python benchmarks/bench_scaling.py --parts size --boxes 64 128 256 --counts 1000 10000 100000
    python benchmarks/bench_scaling.py --parts ranks relion --rank_box 128 --rank_count 20000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_reconstruct import cpu_model, make_data, warm_page_cache
from cryosieve.io.stack import StackReader
from cryosieve.io.star import read_particles
from cryosieve.reconstruct import reconstruct_subsets
from cryosieve.scoring.loop import score_rows
from cryosieve.settings import SieveSettings


def random_map(box: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(box, box, box)).astype(np.float32)


def time_size(folder: Path, box: int, count: int) -> dict[str, float]:
    star = make_data(folder, box, count, pixel=1.0 * 256 / box)
    warm_page_cache(folder / f"box{box}_n{count}.mrcs")
    table = read_particles(str(star))
    half = table.random_subset.astype(np.int64)
    references = [random_map(box, 1), random_map(box, 2)]
    options = SieveSettings(retention_ratio=0.8, highpass_angstrom=10.0)
    with StackReader(table, str(folder)) as reader:
        warm = np.zeros(len(table), dtype=bool)
        warm[:min(256, len(table))] = True  # compiled kernels and caches warm before timing
        score_rows(table.subset(np.flatnonzero(warm)), reader, references, half[warm], options,
                   volume_pixel_size=float(table.pixel_size[0]))
        reconstruct_subsets(table, reader, rows=warm)
        started = time.perf_counter()
        score_rows(table, reader, references, half, options, volume_pixel_size=float(table.pixel_size[0]))
        scoring = time.perf_counter() - started
        started = time.perf_counter()
        reconstruct_subsets(table, reader)
        reconstruction = time.perf_counter() - started
    for path in folder.glob(f"box{box}_n{count}.*"):
        path.unlink()
    return {"box": box, "particles": count, "scoring_s": scoring, "reconstruction_s": reconstruction}


def part_size(boxes: list[int], counts: list[int], work: Path, max_gib: float) -> list[dict[str, float]]:
    rows = []
    print("| box | particles | scoring (s) | scoring (particles/s) | both half maps (s) | reconstruction "
          "(particles/s) |")
    print("|---|---|---|---|---|---|")
    for box in boxes:
        for count in counts:
            if count * box * box * 4 > max_gib * 2**30:
                continue
            row = time_size(work, box, count)
            rows.append(row)
            print(f"| {box} | {count:,} | {row['scoring_s']:.2f} | {count / row['scoring_s']:,.0f} | "
                  f"{row['reconstruction_s']:.2f} | {count / row['reconstruction_s']:,.0f} |", flush=True)
    return rows


def run_job(command: list[str], cwd: Path, timings: Path | None = None, threads: int | None = None) -> float:
    environment = dict(os.environ)
    if threads is not None:
        environment.update(NUMBA_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    if timings is not None:
        environment["CRYOSIEVE_JOB_TIMINGS"] = str(timings)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def communication(timings: Path) -> tuple[float, float | None]:
    """(largest time in collectives over the ranks, rank 0's time in the job) of a finished job, in seconds."""
    reports = [json.loads(path.read_text()) for path in timings.glob("rank*.json")]
    shutil.rmtree(timings, ignore_errors=True)
    spent = max((report["communication_seconds"] for report in reports), default=0.0)
    inside = next((report["seconds"] for report in reports if report["rank"] == 0), None)
    return spent, inside


def ours(ranks: int, program: str, args: list[str]) -> list[str]:
    if ranks == 1:
        return [program, *args]
    return ["torchrun", "--standalone", "--nproc_per_node", str(ranks), "--no-python", program, *args]


def part_ranks(box: int, count: int, work: Path, relion: bool, only_relion: bool) -> list[dict[str, object]]:
    star = make_data(work, box, count, pixel=1.0 * 256 / box)
    warm_page_cache(work / f"box{box}_n{count}.mrcs")
    for subset in (1, 2):
        import mrcfile

        with mrcfile.new(work / f"half{subset}.mrc", overwrite=True) as handle:
            handle.set_data(random_map(box, subset))
            handle.voxel_size = 256 / box
    core = ["--i", star.name, "--o", "out/k.star", "--volume", "half1.mrc", "--volume", "half2.mrc",
            "--frequency", "10", "--quiet"]
    reconstruct = ["--i", star.name, "--o", "out/map.mrc", "--ctf", "--quiet"]
    rows: list[dict[str, object]] = []
    print(f"| command ({count:,} particles, box {box}) | threads | ranks | wall (s) | speed-up | rank 0 in the job "
          "(s) | in collectives (s) |")
    print("|---|---|---|---|---|---|---|")
    series = [("all cores per process", None), ("one thread per rank", 1)]
    for name, program, args in (("cryosieve-core", "cryosieve-core", core),
                                ("cryosieve-reconstruct", "cryosieve-reconstruct", reconstruct)):
        if only_relion and name == "cryosieve-core":
            continue
        for label, threads in series:
            first = None
            for ranks in (1, 2, 3):
                timings = work / "timings"
                # under torchrun each rank takes its share of the node's cores itself
                wall = run_job(ours(ranks, program, args), work, timings, threads if ranks == 1 else None)
                shutil.rmtree(work / "out", ignore_errors=True)
                spent, inside = communication(timings)
                first = first or wall
                rows.append({"command": name, "threads": label, "ranks": ranks, "wall_s": wall,
                             "communication_s": spent, "rank0_in_job_s": inside})
                print(f"| {name} | {label} | {ranks} | {wall:.1f} | {first / wall:.2f} | "
                      f"{'' if inside is None else f'{inside:.1f}'} | {spent:.2f} |", flush=True)
    if relion and shutil.which("relion_reconstruct_mpi"):
        for ranks in (2, 3):
            command = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(ranks), "relion_reconstruct_mpi",
                       "--i", star.name, "--o", "relion_map.mrc", "--ctf"]
            wall = run_job(command, work)
            rows.append({"command": "relion_reconstruct_mpi", "ranks": ranks, "wall_s": wall})
            print(f"| mpirun -n {ranks} relion_reconstruct_mpi --ctf | {ranks} | {wall:.1f} | | |", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["size", "ranks", "relion"], choices=["size", "ranks", "relion"])
    parser.add_argument("--boxes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--max_gib", type=float, default=8.0,
                        help="skip sizes whose stack is larger (GiB): the stack must stay in the page cache")
    parser.add_argument("--rank_box", type=int, default=128)
    parser.add_argument("--rank_count", type=int, default=20000)
    parser.add_argument("--work", default=None, help="folder for the data (a temporary one by default)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    print(f"{cpu_model()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory(dir=args.work) as name:
        work = Path(name)
        results: dict[str, object] = {}
        if "size" in args.parts:
            results["size"] = part_size(args.boxes, args.counts, work, args.max_gib)
        if "ranks" in args.parts or "relion" in args.parts:
            results["ranks"] = part_ranks(args.rank_box, args.rank_count, work, "relion" in args.parts,
                                          "ranks" not in args.parts)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
