"""Accuracy against the known truth: ``cryosieve-reconstruct`` against ``relion_reconstruct``.

Both programs reconstruct the two half maps (``--subset 1`` and ``2``, ``--ctf``) of a
particle set whose true map is known: one simulated here with ``cryosieve-simulate``
(no junk), or an existing folder holding ``particles.star``, its stacks and ``truth.mrc``
(``--data``, for example the demo data). Each half map is compared with the truth by its
Fourier shell correlation (shells one Fourier voxel wide, ``round(|k|)``, computed here with
numpy). The table gives, per shell, both programs' FSC with the truth (the mean of the two
halves) and their difference, then the mean and the worst difference over quarters of the
shells up to Nyquist (or up to where RELION's FSC with the truth falls below 0.1), and
the resolutions where the FSC with the truth crosses 0.5 and the half-map FSC crosses 0.143.

Run it with ``PYTHONPATH`` pointing at another checkout's ``src`` to measure that code.

Examples::

    python benchmarks/bench_reconstruct_fsc.py                      # box 128, 3,000 particles
    python benchmarks/bench_reconstruct_fsc.py --box 96 --count 3000 --angpix 2.5
    python benchmarks/bench_reconstruct_fsc.py --data demo_data      # the demo data (box 112)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np
import starfile


def fsc(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """FSC of two ``(n, n, n)`` maps in shells ``round(|k|)`` (``k`` in cycles per box): ``(n // 2 + 1,)``."""
    size = first.shape[0]
    a, b = np.fft.rfftn(first.astype(np.float64)), np.fft.rfftn(second.astype(np.float64))
    k = np.fft.fftfreq(size, 1.0 / size)
    kx = np.fft.rfftfreq(size, 1.0 / size)
    shell = np.rint(np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)).astype(int)
    count = size // 2 + 1
    cross = np.bincount(shell.ravel(), (a * b.conj()).real.ravel(), count)[:count]
    power_a = np.bincount(shell.ravel(), (np.abs(a) ** 2).ravel(), count)[:count]
    power_b = np.bincount(shell.ravel(), (np.abs(b) ** 2).ravel(), count)[:count]
    return cross / np.sqrt(power_a * power_b)


def crossing(curve: np.ndarray, threshold: float, size: int, pixel: float) -> float:
    """Resolution (Å) where ``curve`` first falls below ``threshold`` (linear between shells)."""
    below = np.flatnonzero(curve[1:] < threshold)
    if below.size == 0:
        return 2 * pixel
    shell = int(below[0]) + 1
    fraction = (curve[shell - 1] - threshold) / (curve[shell - 1] - curve[shell])
    return size * pixel / (shell - 1 + fraction)


def prepare(args: argparse.Namespace, folder: Path) -> float:
    """The particle set in ``folder`` (simulated, or linked from ``--data``); returns its pixel size."""
    if args.data:
        source = Path(args.data).resolve()
        for path in source.glob("*.mrcs"):  # the stacks
            (folder / path.name).symlink_to(path)
        shutil.copy(source / "particles.star", folder / "particles.star")
        shutil.copy(source / "truth.mrc", folder / "truth.mrc")
    else:
        subprocess.run([sys.executable, "-m", "cryosieve.cli.simulate", "--o", str(folder), "--num_particles",
                        str(args.count), "--box", str(args.box), "--angpix", str(args.angpix), "--junk_fraction",
                        "0", "--snr", str(args.snr), "--seed", str(args.seed), "--no_half_maps", "--device", "cpu",
                        "--force", "--quiet"], check=True)
    optics = starfile.read(folder / "particles.star")["optics"]
    return float(optics["rlnImagePixelSize"].iloc[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--box", type=int, default=128, help="box of the simulated set (128)")
    parser.add_argument("--count", type=int, default=3000, help="simulated particles (3,000)")
    parser.add_argument("--angpix", type=float, default=2.0, help="pixel size of the simulated set in Å (2.0)")
    parser.add_argument("--snr", type=float, default=0.05, help="signal-to-noise ratio of the simulated set (0.05)")
    parser.add_argument("--seed", type=int, default=2, help="seed of the simulated set (2)")
    parser.add_argument("--data", default=None, help="folder with particles.star, its stacks and truth.mrc "
                        "(instead of simulating)")
    parser.add_argument("--shells", type=int, nargs="*", default=None, help="shells listed in the table "
                        "(default: eight spread to Nyquist)")
    parser.add_argument("--relion", default="relion_reconstruct", help="RELION's program (relion_reconstruct)")
    parser.add_argument("--workdir", default=None, help="folder for the data and maps (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the data and maps")
    parser.add_argument("--json", default=None, help="also write the curves to this JSON file")
    args = parser.parse_args()
    if shutil.which(args.relion) is None:
        parser.error(f"{args.relion} not found (install RELION)")
    folder = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_reconstruct_fsc_"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        pixel = prepare(args, folder)
        seconds: dict[str, float] = {"ours": 0.0, "relion": 0.0}
        for subset in (1, 2):
            commands = {
                "ours": [sys.executable, "-m", "cryosieve.cli.reconstruct", "--i", "particles.star", "--o",
                         f"ours_half{subset}.mrc", "--subset", str(subset), "--ctf", "true", "--device", "cpu",
                         "--quiet"],
                "relion": [args.relion, "--i", "particles.star", "--o", f"relion_half{subset}.mrc", "--subset",
                           str(subset), "--ctf", "--angpix", str(pixel)],
            }
            for name, command in commands.items():
                started = time.perf_counter()
                subprocess.run(command, cwd=folder, check=True, stdout=subprocess.DEVNULL)
                seconds[name] += time.perf_counter() - started
        truth = mrcfile.read(folder / "truth.mrc").astype(np.float64)
        size = truth.shape[0]
        curves, half_maps = {}, {}
        for name in ("ours", "relion"):
            maps = [mrcfile.read(folder / f"{name}_half{subset}.mrc").astype(np.float64) for subset in (1, 2)]
            curves[name] = (fsc(maps[0], truth) + fsc(maps[1], truth)) / 2
            half_maps[name] = fsc(maps[0], maps[1])
        last = size // 2
        weak = np.flatnonzero(curves["relion"][1:] < 0.1)
        top = min(last, int(weak[0])) if weak.size else last  # the last shell with FSC >= 0.1
        difference = curves["ours"] - curves["relion"]
        shells = args.shells or sorted({max(1, round(last * f)) for f in (0.125, 0.25, 0.375, 0.5, 0.625, 0.75,
                                                                            0.875)} | {top})
        print(f"# box {size}, {pixel:g} Å/px, folder {folder}; FSC with the truth, mean of the two half maps")
        print("| shell | resolution (Å) | relion_reconstruct | cryosieve-reconstruct | difference |")
        print("|---:|---:|---:|---:|---:|")
        for shell in shells:
            print(f"| {shell} | {size * pixel / shell:.2f} | {curves['relion'][shell]:.4f} | "
                  f"{curves['ours'][shell]:.4f} | {difference[shell]:+.4f} |")
        print("\n| shells | mean difference | worst difference (shell) |")
        print("|---|---:|---:|")
        quarter = max(1, top // 4)
        for start in range(1, top + 1, quarter):
            stop = min(top, start + quarter - 1)
            part = difference[start:stop + 1]
            worst = int(np.argmin(part)) + start
            print(f"| {start}–{stop} | {part.mean():+.4f} | {difference[worst]:+.4f} ({worst}) |")
        for name in ("relion", "ours"):
            print(f"{name}: FSC with the truth 0.5 at {crossing(curves[name], 0.5, size, pixel):.3f} Å, half maps "
                  f"0.143 at {crossing(half_maps[name], 0.143, size, pixel):.3f} Å, both halves in "
                  f"{seconds[name]:.1f} s")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "box": size, "pixel": pixel, "top_shell": top, "seconds": seconds,
                "fsc_truth": {name: curve.tolist() for name, curve in curves.items()},
                "fsc_halves": {name: curve.tolist() for name, curve in half_maps.items()},
            }, indent=1))
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
