"""Reading particle stacks: a throttled path (NFS-like) and a stack larger than the page cache.

Two parts (``--parts``):

* ``throttled``: the stack is served through a FUSE pass-through file system that lets
  ``--bandwidth`` MB/s through (a token bucket in its ``read``) and counts what is asked of it:
  ``open`` calls and bytes read. ``cryosieve-core`` scores the stack from that mount (fresh
  mount, so nothing is cached), as one process and as a ``torchrun`` job of 2 ranks. The table
  gives the wall time, the throughput, the bytes read through the mount against the stack's
  size (1.00: every image read once, none twice) and the opens (one per process).
  Needs ``fusepy`` and the FUSE 2 library (``pip install fusepy``; Debian: ``fuse3 libfuse2``).
* ``large``: a stack of ``--large_gib`` GiB (more than the machine's memory, so more than its
  page cache can hold) is scored by ``cryosieve-core`` and reconstructed by
  ``cryosieve-reconstruct``; the table gives the wall time, the throughput, and the peak
  private (anonymous) memory of the process, sampled from ``/proc`` every 0.2 s, which stays
  bounded by the batch and the maps (the stack is memory-mapped; its pages are the kernel's).

Examples::

    python benchmarks/bench_reading.py --parts throttled --bandwidth 200 --throttled_gib 2
    python benchmarks/bench_reading.py --parts large --large_gib 28 --work /var/tmp
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mrcfile
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_reconstruct import anonymous_mib, cpu_model, make_data

FUSE_SERVER = r'''
import errno, json, os, sys, threading, time
from fuse import FUSE, Operations

class Throttled(Operations):
    """Read-only pass-through of ROOT, reads limited to BANDWIDTH bytes/s, counted."""

    def __init__(self, root, bandwidth, counts):
        self.root, self.bandwidth, self.counts = root, bandwidth, counts
        self.lock = threading.Lock()
        self.allowance, self.last = 0.0, time.monotonic()
        self.stats = {"opens": {}, "bytes": {}, "reads": 0}

    def _path(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    def getattr(self, path, fh=None):
        st = os.lstat(self._path(path))
        return {key: getattr(st, key) for key in ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime",
                                                   "st_nlink", "st_size", "st_uid")}

    def readdir(self, path, fh):
        return [".", "..", *os.listdir(self._path(path))]

    def open(self, path, flags):
        with self.lock:
            self.stats["opens"][path] = self.stats["opens"].get(path, 0) + 1
            self._save()
        return os.open(self._path(path), os.O_RDONLY)

    def read(self, path, size, offset, fh):
        with self.lock:  # token bucket: wait until the bytes are allowed
            now = time.monotonic()
            self.allowance = min(self.bandwidth, self.allowance + (now - self.last) * self.bandwidth)
            self.last = now
            self.allowance -= size
            wait = -self.allowance / self.bandwidth if self.allowance < 0 else 0.0
            self.stats["bytes"][path] = self.stats["bytes"].get(path, 0) + size
            self.stats["reads"] += 1
        if wait > 0:
            time.sleep(wait)
        data = os.pread(fh, size, offset)
        with self.lock:
            self._save()
        return data

    def _save(self):
        if self.stats["reads"] % 64 == 0:
            with open(self.counts, "w") as handle:
                json.dump(self.stats, handle)

    def release(self, path, fh):
        os.close(fh)
        with self.lock:
            with open(self.counts, "w") as handle:
                json.dump(self.stats, handle)

    def destroy(self, path):
        with open(self.counts, "w") as handle:
            json.dump(self.stats, handle)

root, mount, bandwidth, counts = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
FUSE(Throttled(root, bandwidth, counts), mount, foreground=True, ro=True, nothreads=False)
'''


def mount_throttled(source: Path, mount: Path, bandwidth: float, counts: Path) -> subprocess.Popen[bytes]:
    mount.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen([sys.executable, "-c", FUSE_SERVER, str(source), str(mount), str(bandwidth),
                               str(counts)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not os.path.ismount(mount):
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"FUSE mount failed: {server.stderr.read().decode() if server.stderr else ''}")
        time.sleep(0.1)
    return server


def unmount(mount: Path, server: subprocess.Popen[bytes]) -> None:
    subprocess.run(["fusermount", "-u", str(mount)], check=False)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()


def write_maps(folder: Path, box: int, pixel: float) -> None:
    rng = np.random.default_rng(7)
    for subset in (1, 2):
        with mrcfile.new(folder / f"half{subset}.mrc", overwrite=True) as handle:
            handle.set_data(rng.normal(size=(box, box, box)).astype(np.float32))
            handle.voxel_size = pixel


def measured(command: list[str], cwd: Path, environment: dict[str, str] | None = None) -> dict[str, float]:
    """Wall seconds and peak anonymous memory (MiB, summed over the process and its children) of a command."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0.0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.2):
            pids = [process.pid]
            listing = subprocess.run(["ps", "-eo", "pid,ppid"], capture_output=True, text=True).stdout.split()
            pairs = list(zip(listing[2::2], listing[3::2], strict=False))
            for _ in range(3):  # children and grandchildren (torchrun's workers)
                pids += [int(pid) for pid, parent in pairs if int(parent) in pids and int(pid) not in pids]
            total = sum(value for pid in pids if (value := anonymous_mib(pid)) is not None)
            peak = max(peak, total)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, error = process.communicate()
    stop.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{error.decode(errors='replace')[-3000:]}")
    return {"wall_s": time.perf_counter() - started, "peak_anonymous_mib": peak}


def part_throttled(work: Path, gib: float, box: int, bandwidth_mb: float) -> list[dict[str, object]]:
    count = int(gib * 2**30 / (box * box * 4))
    source = work / "source"
    source.mkdir()
    star = make_data(source, box, count, pixel=256 / box)
    write_maps(source, box, 256 / box)
    size = (source / f"box{box}_n{count}.mrcs").stat().st_size
    rows = []
    print(f"| stack through a {bandwidth_mb:.0f} MB/s mount ({count:,} particles, box {box}, {size / 1e9:.2f} GB) "
          "| wall (s) | MB/s | bytes read / stack | opens of the stack |")
    print("|---|---|---|---|---|")
    args = ["--i", star.name, "--o", str(work / "cached" / "k.star"), "--volume", "half1.mrc", "--volume",
            "half2.mrc", "--frequency", "10", "--quiet"]
    with open(source / f"box{box}_n{count}.mrcs", "rb") as handle:  # the page cache, for comparison
        while handle.read(1 << 24):
            pass
    cached = measured(["cryosieve-core", *args], source)
    rows.append({"ranks": 1, "cached": True, **cached})
    print(f"| cryosieve-core, 1 process, the stack in the page cache (no mount) | {cached['wall_s']:.1f} | "
          f"{size / 1e6 / cached['wall_s']:.0f} | | |", flush=True)
    for ranks in (1, 2):
        mount, counts = work / f"mount{ranks}", work / f"counts{ranks}.json"
        server = mount_throttled(source, mount, bandwidth_mb * 1e6, counts)
        try:
            args = ["--i", star.name, "--o", str(work / f"out{ranks}" / "k.star"), "--volume", "half1.mrc",
                    "--volume", "half2.mrc", "--frequency", "10", "--quiet"]
            command = ["cryosieve-core", *args] if ranks == 1 else \
                ["torchrun", "--standalone", "--nproc_per_node", str(ranks), "--no-python", "cryosieve-core", *args]
            result = measured(command, mount)
        finally:
            unmount(mount, server)
        stats = json.loads(counts.read_text())
        name = f"/box{box}_n{count}.mrcs"
        read, opens = stats["bytes"].get(name, 0), stats["opens"].get(name, 0)
        row = {"ranks": ranks, **result, "bytes_read": read, "stack_bytes": size, "stack_opens": opens,
               "all": stats}
        rows.append(row)
        print(f"| cryosieve-core, {ranks} process{'es' if ranks > 1 else ''} | {result['wall_s']:.1f} | "
              f"{size / 1e6 / result['wall_s']:.0f} | {read / size:.3f} | {opens} |", flush=True)
    return rows


def part_large(work: Path, gib: float, box: int) -> list[dict[str, object]]:
    count = int(gib * 2**30 / (box * box * 4))
    star = make_data(work, box, count, pixel=256 / box)
    write_maps(work, box, 256 / box)
    size = (work / f"box{box}_n{count}.mrcs").stat().st_size
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rows = []
    print(f"| {count:,} particles, box {box}: a {size / 2**30:.1f} GiB stack, {memory / 2**30:.1f} GiB of memory "
          "| wall (s) | MB/s | peak private memory (MiB) |")
    print("|---|---|---|---|")
    for name, command in (
            ("cryosieve-core (scoring)", ["cryosieve-core", "--i", star.name, "--o", "out/k.star", "--volume",
                                          "half1.mrc", "--volume", "half2.mrc", "--frequency", "10", "--quiet"]),
            ("cryosieve-reconstruct (one map)", ["cryosieve-reconstruct", "--i", star.name, "--o", "out/map.mrc",
                                                 "--ctf", "--quiet"])):
        result = measured(command, work)
        rows.append({"command": name, **result, "stack_bytes": size, "memory_bytes": memory})
        print(f"| {name} | {result['wall_s']:.0f} | {size / 1e6 / result['wall_s']:.0f} | "
              f"{result['peak_anonymous_mib']:.0f} |", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["throttled", "large"], choices=["throttled", "large"])
    parser.add_argument("--box", type=int, default=256)
    parser.add_argument("--bandwidth", type=float, default=200.0, help="MB/s through the throttled mount")
    parser.add_argument("--throttled_gib", type=float, default=2.0)
    parser.add_argument("--large_gib", type=float, default=28.0)
    parser.add_argument("--work", default=None, help="folder for the data (a temporary one by default)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    print(f"{cpu_model()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
    results: dict[str, object] = {}
    if "throttled" in args.parts:
        with tempfile.TemporaryDirectory(dir=args.work) as name:
            results["throttled"] = part_throttled(Path(name), args.throttled_gib, args.box, args.bandwidth)
    if "large" in args.parts:
        with tempfile.TemporaryDirectory(dir=args.work) as name:
            results["large"] = part_large(Path(name), args.large_gib, args.box)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
