"""Central-slice projectors: ``torch-projectors`` against this package's own kernels, on this machine's device.

Forward: ``B`` central slices of a box-``n`` map, every sample with ``|k| < n/2``, trilinear on a
2x oversampled transform, as the sieve needs them:

* ``torch-projectors`` ``project_3d_to_2d_forw`` (oversampling 2, ``fourier_radius_cutoff`` n/2);
* ours, ``FourierSliceProjector.sample`` (the tensor path of the CUDA scorer; on the CPU the sieve
  uses the fused numba kernel instead, which never materialises the slices).

Backward: ``B`` slices with their CTF^2 weights inserted into a 2x oversampled grid:

* ``torch-projectors`` ``backproject_2d_to_3d_forw`` (with weights, oversampling 2);
* ours, the numba engine's accumulators (:class:`cryosieve.reconstruct.cpu.GridAccumulators`, all
  cores) and the tensor engine's ``insert_slices_torch``.

Times are the best of ``--repeats`` after a warm-up, for the projection or insertion alone (no FFT,
no CTF, no reading). ``torch-projectors`` 0.13.1's wheel does not load with torch 2.13; build it
from source against the installed torch: ``pip install pybind11`` then ``pip install
--no-build-isolation --no-binary torch-projectors torch-projectors==0.13.1``.

Example::

    python benchmarks/bench_projectors.py --boxes 128 256 --batch 512
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_reconstruct import cpu_model
from cryosieve.geometry import euler_to_matrix
from cryosieve.projection import FourierSliceProjector
from cryosieve.reconstruct import cpu
from cryosieve.reconstruct.grid import grid_shape
from cryosieve.reconstruct.samples import SliceSamples
from cryosieve.reconstruct.tensor_path import insert_slices_torch


def best_of(repeats: int, work: Callable[[], object], device: torch.device) -> float:
    work()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return min(times)


def random_rotations(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return euler_to_matrix(rng.uniform(-180, 180, count), np.degrees(np.arccos(rng.uniform(-1, 1, count))),
                           rng.uniform(-180, 180, count))


def one_box(box: int, batch: int, repeats: int, device: torch.device) -> dict[str, float]:
    import torch_projectors as tp

    rotations = random_rotations(batch, box)
    matrices = torch.from_numpy(rotations).to(device=device, dtype=torch.float32)
    volume = torch.randn((box, box, box), dtype=torch.float32, device=device)
    samples = SliceSamples.for_box(box)
    points = samples.frequency_x.size
    results: dict[str, float] = {"box": box, "batch": batch, "points_per_slice": points}

    ours = FourierSliceProjector(volume)
    ky = torch.from_numpy(samples.frequency_y).to(device)
    kx = torch.from_numpy(samples.frequency_x).to(device)
    results["forward_ours_torch"] = batch / best_of(repeats, lambda: ours.sample(matrices, ky, kx), device)

    padded = torch.fft.rfftn(torch.nn.functional.pad(volume, (box // 2,) * 6)).to(torch.complex64)[None]
    their_rotations = matrices[None].contiguous()
    results["forward_torch_projectors"] = batch / best_of(
        repeats, lambda: tp.project_3d_to_2d_forw(padded, their_rotations, output_shape=(box, box), oversampling=2.0,
                                                  fourier_radius_cutoff=box / 2), device)

    slices = torch.randn((1, batch, box, box // 2 + 1), dtype=torch.complex64, device=device)
    weights = torch.rand((1, batch, box, box // 2 + 1), dtype=torch.float32, device=device)
    results["backward_torch_projectors"] = batch / best_of(
        repeats, lambda: tp.backproject_2d_to_3d_forw(slices, their_rotations, weights=weights, oversampling=2.0,
                                                      fourier_radius_cutoff=box / 2), device)

    values = torch.randn((batch, points, 3), dtype=torch.float64, device=device)
    grid = torch.zeros(grid_shape(box, 2), dtype=torch.float64, device=device)
    results["backward_ours_torch"] = batch / best_of(
        repeats, lambda: insert_slices_torch(grid, matrices.double(), ky, kx, values, 2), device)
    if device.type == "cpu" and cpu.AVAILABLE:
        import numba

        accumulators = cpu.GridAccumulators(grid_shape(box, 2), [1], numba.get_num_threads(), cpu.ACCUMULATION_MEMORY,
                                            batch, points)
        host_values = values.cpu().numpy()
        labels = np.ones(batch, dtype=np.int64)
        results["backward_ours_numba"] = batch / best_of(
            repeats, lambda: accumulators.insert(rotations, samples.frequency_y, samples.frequency_x, host_values,
                                                 labels, 2), device)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, device {device}, "
          f"{time.strftime('%Y-%m-%d')}")
    print("| box | forward: ours (tensor) | forward: torch-projectors | backward: ours (numba) | backward: ours "
          "(tensor) | backward: torch-projectors |")
    print("|---|---|---|---|---|---|")
    for box in args.boxes:
        row = one_box(box, args.batch, args.repeats, device)
        numba_rate = row.get("backward_ours_numba")
        print(f"| {box} | {row['forward_ours_torch']:,.0f} | {row['forward_torch_projectors']:,.0f} | "
              f"{'' if numba_rate is None else f'{numba_rate:,.0f}'} | {row['backward_ours_torch']:,.0f} | "
              f"{row['backward_torch_projectors']:,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
