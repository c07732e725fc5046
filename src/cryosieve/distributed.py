"""Scoring in several processes, one per GPU (or CPU processes), on disjoint shards.

Each worker scores the batches ``j`` with ``j % world_size == rank``; the scores are
summed over workers with ``torch.distributed`` (gloo on CPU, which also serves CUDA
workers since the gathered tensor lives in host memory).
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cryosieve.io.stack import StackReader
from cryosieve.io.star import ParticleTable


def _free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return int(handle.getsockname()[1])


def _worker(rank: int, world_size: int, port: int, table: ParticleTable, directory, references,
            half_set, settings, voxel, fsc, result_path: str) -> None:
    from dataclasses import replace

    from cryosieve.sieve import score_rows

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        device = torch.device(settings.device)
        if device.type == "cuda":
            device = torch.device("cuda", rank % max(torch.cuda.device_count(), 1))
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        local = replace(settings, device=device, num_processes=1)
        reader = StackReader(table, directory)
        scores = score_rows(table, reader, references, half_set, local, rank=rank, world_size=world_size,
                            volume_pixel_size=voxel, reference_fsc=fsc)
        total = torch.from_numpy(scores)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        if rank == 0:
            np.save(result_path, total.numpy())
        reader.close()
    finally:
        dist.destroy_process_group()


def score_in_processes(table: ParticleTable, directory, references: Sequence[np.ndarray], half_set: np.ndarray,
                       settings, voxel: float | None, fsc: np.ndarray | None) -> np.ndarray:
    """Scores of every particle computed by ``settings.num_processes`` worker processes."""
    world_size = settings.num_processes
    with tempfile.TemporaryDirectory() as folder:
        result_path = os.path.join(folder, "scores.npy")
        mp.spawn(_worker, args=(world_size, _free_port(), table, directory, list(references), half_set,
                                settings, voxel, fsc, result_path), nprocs=world_size, join=True)
        return np.load(result_path)
