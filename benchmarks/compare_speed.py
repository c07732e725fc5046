"""Hot paths of two versions of the code side by side: scoring, insertion (reconstruction) and
``--retention_ratio auto``, each through its command (so any two versions compare, whatever their
library's layout), alternating between the versions on the same data.

    python benchmarks/compare_speed.py --before /path/to/old/src --after src --rounds 3

For each command and version: wall seconds and CPU seconds (user + system of the command's
process and its children) of every run, and the best. The command's start-up (Python, numpy,
numba, torch imports) is included, as a user sees it. Writes a Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_score import make_data


def commands(folder: Path, out: Path) -> dict[str, list[str]]:
    """The timed commands on the data in ``folder``, writing under ``out``."""
    core = ["-m", "cryosieve.cli.core", "--i", "particles.star", "--directory", str(folder), "--volume",
            str(folder / "half1.mrc"), "--volume", str(folder / "half2.mrc"), "--frequency", "10", "--device", "cpu",
            "--quiet"]
    return {
        "scoring (cryosieve-core, ratio 0.8)": [*core, "--o", str(out / "fixed" / "kept.star"),
                                                "--retention_ratio", "0.8"],
        "scoring + auto retention (cryosieve-core, auto)": [*core, "--o", str(out / "auto" / "kept.star"),
                                                            "--retention_ratio", "auto"],
        "insertion (cryosieve-reconstruct, one half-set)": [
            "-m", "cryosieve.cli.reconstruct", "--i", "particles.star", "--o", str(out / "map" / "half1.mrc"),
            "--directory", str(folder), "--ctf", "true", "--subset", "1", "--device", "cpu", "--quiet"],
    }


def run(source: str, arguments: list[str], cwd: Path) -> tuple[float, float]:
    """Wall and CPU seconds of ``python arguments`` with ``PYTHONPATH=source``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([sys.executable, *arguments], check=True, cwd=cwd,
                   env={**os.environ, "PYTHONPATH": str(Path(source).resolve())})
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="src folder of the earlier code")
    parser.add_argument("--after", required=True, help="src folder of the later code")
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--particles", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3, help="alternations (before, after) per command")
    parser.add_argument("--only", default="", help="time only the commands whose label contains this text")
    args = parser.parse_args()
    chosen = [label for label in commands(Path("."), Path(".")) if args.only in label]
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary) / "data"
        folder.mkdir()
        make_data(folder, args.box, args.particles)
        for name, side in (("before", args.before), ("after", args.after)):  # numba caches, imports: warm both
            run(side, commands(folder, Path(temporary) / f"warm-{name}")["scoring (cryosieve-core, ratio 0.8)"],
                folder)
        for index in range(args.rounds):
            for name, side in (("before", args.before), ("after", args.after))[:: 1 if index % 2 == 0 else -1]:
                out = Path(temporary) / f"{name}-{index}"
                for label, arguments in commands(folder, out).items():
                    if label not in chosen:
                        continue
                    results.setdefault((label, name), []).append(run(side, arguments, folder))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.particles} particles at box "
          f"{args.box}, {args.rounds} alternations\n")
    print("| command | before: wall s (best; all) | after: wall s (best; all) | before: CPU s (best) | "
          "after: CPU s (best) |")
    print("|---|---|---|---|---|")
    for label in chosen:
        row = [label]
        for name in ("before", "after"):
            walls = [wall for wall, _ in results[(label, name)]]
            row.append(f"**{min(walls):.1f}**; " + ", ".join(f"{wall:.1f}" for wall in walls))
        for name in ("before", "after"):
            row.append(f"{min(cpu for _, cpu in results[(label, name)]):.2f}")
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
