"""Wall time and peak memory: ``cryosieve-reconstruct`` against ``relion_reconstruct``.

Both programs reconstruct the same CTF-corrected map from the same STAR file and stack,
one after the other on the same machine, each as a separate process started from the
command line (so start-up, reading and writing count for both). ``relion_reconstruct``
runs with its defaults (it has no thread option: one thread); ours uses every core
numba and torch see. The images are Gaussian noise (the work of both programs does
not depend on the pixel values); poses are uniform, origins, defoci and astigmatism
random, as in a refined data set.

Peak memory is the maximum resident set size of each process (``wait4``). Ours reads the
stack memory-mapped, so the pages of the stack it has read count in its resident set.

Examples::

    python benchmarks/bench_reconstruct.py                      # box 128 and 256, 5,000 particles
    python benchmarks/bench_reconstruct.py --boxes 128 --counts 5000 20000 --repeats 3
    python benchmarks/bench_reconstruct.py --boxes 64 --counts 500  # a quick check
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile


def cpu_model() -> str:
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        return platform.processor() or "unknown"
    for line in output.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def make_data(folder: Path, box: int, count: int, pixel: float, seed: int = 0) -> Path:
    """A RELION 3.1 STAR file and a noise stack of ``count`` images of ``box`` pixels."""
    rng = np.random.default_rng(seed)
    stack = folder / f"box{box}_n{count}.mrcs"
    with mrcfile.new_mmap(str(stack), shape=(count, box, box), mrc_mode=2, overwrite=True) as handle:
        for start in range(0, count, 1000):
            stop = min(count, start + 1000)
            handle.data[start:stop] = rng.normal(size=(stop - start, box, box)).astype(np.float32)
        handle.voxel_size = pixel
    defocus_u = rng.uniform(8000, 25000, count)
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@{stack.name}" for i in range(count)],
        "rlnAngleRot": rng.uniform(-180, 180, count),
        "rlnAngleTilt": np.degrees(np.arccos(rng.uniform(-1, 1, count))),
        "rlnAnglePsi": rng.uniform(-180, 180, count),
        "rlnOriginXAngst": rng.uniform(-5, 5, count),
        "rlnOriginYAngst": rng.uniform(-5, 5, count),
        "rlnDefocusU": defocus_u,
        "rlnDefocusV": defocus_u - rng.uniform(0, 2000, count),
        "rlnDefocusAngle": rng.uniform(-180, 180, count),
        "rlnOpticsGroup": 1,
        "rlnRandomSubset": np.arange(count) % 2 + 1,
    })
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnVoltage": [300.0],
        "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1], "rlnImagePixelSize": [pixel],
        "rlnImageSize": [box], "rlnImageDimensionality": [2],
    })
    star = folder / f"box{box}_n{count}.star"
    starfile.write({"optics": optics, "particles": particles}, star, overwrite=True)
    return star


def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as handle:
        while handle.read(1 << 24):
            pass


def anonymous_mib(pid: int) -> float | None:
    """Private anonymous memory of a running process (MiB), from /proc (Linux)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Anonymous:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def run_measured(command: list[str], cwd: Path, sample_memory: bool = False) -> tuple[float, float, float | None]:
    """(wall seconds, peak resident set MiB, peak anonymous memory MiB or None) of one process.

    The resident set counts the pages of memory-mapped files the process has read; the
    anonymous memory (sampled every 0.05 s when ``sample_memory``) does not. Sampling reads
    ``/proc/PID/smaps_rollup``, which walks the process's page tables under its memory-map
    lock and slows it down (by about 0.8 s in 3 s at box 128): timed runs do not sample.
    """
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_anonymous: float | None = None
    if sample_memory:
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid != 0:
                break
            sample = anonymous_mib(process.pid)
            if sample is not None:
                peak_anonymous = sample if peak_anonymous is None else max(peak_anonymous, sample)
            time.sleep(0.05)
    else:
        pid, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    error = process.stderr.read().decode(errors="replace") if process.stderr else ""
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{error[-2000:]}")
    return wall, usage.ru_maxrss / 1024.0, peak_anonymous


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boxes", type=int, nargs="+", default=[128, 256], help="box sizes (pixels)")
    parser.add_argument("--counts", type=int, nargs="+", default=[5000], help="numbers of particles")
    parser.add_argument("--pixel", type=float, default=1.0, help="pixel size in Å (1.0)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each program per case (median kept)")
    parser.add_argument("--workdir", default=None, help="folder for the data (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    parser.add_argument("--relion", default="relion_reconstruct", help="RELION's program (relion_reconstruct)")
    parser.add_argument("--skip_relion", action="store_true", help="time only cryosieve-reconstruct")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--sample_memory", action="store_true",
                        help="one extra untimed run of each program sampling its private (anonymous) memory")
    args = parser.parse_args()

    if not args.skip_relion and shutil.which(args.relion) is None:
        parser.error(f"{args.relion} not found (install RELION or pass --skip_relion)")
    folder = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_reconstruct_"))
    folder.mkdir(parents=True, exist_ok=True)
    machine = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    print(f"# {machine['date']}  {machine['cpu']}, {machine['cores']} cores", flush=True)
    results = []
    try:
        for box in args.boxes:
            for count in args.counts:
                star = make_data(folder, box, count, args.pixel)
                stack = star.with_suffix(".mrcs")
                ours_command = [sys.executable, "-m", "cryosieve.cli.reconstruct", "--i", star.name, "--o",
                                "ours.mrc", "--ctf", "true", "--angpix", str(args.pixel), "--device", "cpu",
                                "--quiet"]
                relion_command = [args.relion, "--i", star.name, "--o", "relion.mrc", "--ctf", "--angpix",
                                  str(args.pixel)]
                timings: dict[str, list[tuple[float, float, float | None]]] = {"ours": [], "relion": []}
                anonymous_peaks: dict[str, float] = {}
                programs = [("ours", ours_command)] + ([] if args.skip_relion else [("relion", relion_command)])
                for _ in range(args.repeats):
                    for name, command in programs:
                        warm_page_cache(stack)
                        load = os.getloadavg()[0]
                        wall, memory, _ = run_measured(command, folder)
                        timings[name].append((wall, memory, None))
                        print(f"box {box:4d}  {count:6d} particles  {name:6s}  {wall:8.2f} s  RSS {memory:7.0f} MiB"
                              f"  (load average before: {load:.2f})", flush=True)
                if args.sample_memory:
                    for name, command in programs:
                        warm_page_cache(stack)
                        _, _, anonymous = run_measured(command, folder, sample_memory=True)
                        anonymous_peaks[name] = anonymous if anonymous is not None else float("nan")
                        print(f"box {box:4d}  {count:6d} particles  {name:6s}  peak anonymous memory "
                              f"{anonymous_peaks[name]:7.0f} MiB (extra untimed run)", flush=True)
                row = {"box": box, "particles": count}
                for name, values in timings.items():
                    if values:
                        row[f"{name}_seconds"] = statistics.median(v[0] for v in values)
                        row[f"{name}_all_seconds"] = [v[0] for v in values]
                        row[f"{name}_peak_mib"] = max(v[1] for v in values)
                        row[f"{name}_anonymous_mib"] = anonymous_peaks.get(name, float("nan"))
                if "relion_seconds" in row:
                    row["speedup"] = row["relion_seconds"] / row["ours_seconds"]
                results.append(row)
                if not args.keep:
                    star.unlink()
                    stack.unlink()
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(folder, ignore_errors=True)
    print()
    print("| box | particles | cryosieve-reconstruct (s) | relion_reconstruct (s) | speed-up "
          "| peak RSS ours / RELION (MiB) | peak anonymous ours / RELION (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    nan = float("nan")
    for row in results:
        print(f"| {row['box']} | {row['particles']:,} | {row['ours_seconds']:.1f} | "
              f"{row.get('relion_seconds', nan):.1f} | {row.get('speedup', nan):.1f}x | "
              f"{row['ours_peak_mib']:.0f} / {row.get('relion_peak_mib', nan):.0f} | "
              f"{row['ours_anonymous_mib']:.0f} / {row.get('relion_anonymous_mib', nan):.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
