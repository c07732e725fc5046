"""Scoring in several processes, one per GPU (or CPU processes), on disjoint shards.

Each worker scores the batches ``j`` with ``j % world_size == rank``; the scores are
summed over workers with ``torch.distributed`` (gloo on CPU, which also serves CUDA
workers since the gathered tensor lives in host memory).

The parent process watches its workers the whole time: a worker that fails (its error is
passed back and raised again here, so bad input stays a one-line input error), an
interrupt (Ctrl-C, SIGTERM) or any other exception in the parent terminates every worker
within seconds, at any moment, rendezvous included. Workers ignore SIGINT (the parent
decides) and die with the parent on Linux, so none is ever left behind.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import socket
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from cryosieve.errors import CryoSieveInputError
from cryosieve.io.star import ParticleTable

#: How long a worker waits for the others to join before it gives up (seconds).
RENDEZVOUS_TIMEOUT = 120.0
#: How long terminated workers get to exit before they are killed (seconds).
TERMINATE_GRACE = 2.0


def _free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return int(handle.getsockname()[1])


def _die_with_parent() -> None:
    """Linux: have the kernel send SIGKILL to this process when its parent dies."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _worker(rank: int, world_size: int, port: int, arguments: tuple[Any, ...], result_path: str,
            errors: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    try:
        _score_shard(rank, world_size, port, *arguments, result_path=result_path)
    except BaseException as error:  # passed to the parent, which raises it again
        try:
            errors.put((rank, error))
        except Exception:  # an exception that does not pickle
            errors.put((rank, RuntimeError(f"{type(error).__name__}: {error}")))
        raise SystemExit(1) from None


def _score_shard(rank: int, world_size: int, port: int, table: ParticleTable, directory: Any,
                 references: Sequence[np.ndarray], half_set: np.ndarray, settings: Any, voxel: float | None,
                 fsc: np.ndarray | None, *, result_path: str) -> None:
    from dataclasses import replace

    import torch
    import torch.distributed as dist

    from cryosieve.io.stack import StackReader
    from cryosieve.sieve import score_rows

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT))
    try:
        device = torch.device(settings.device)
        if device.type == "cuda":
            device = torch.device("cuda", rank % max(torch.cuda.device_count(), 1))
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        local = replace(settings, device=device, num_processes=1)
        with StackReader(table, directory) as reader:
            scores = score_rows(table, reader, references, half_set, local, rank=rank, world_size=world_size,
                                volume_pixel_size=voxel, reference_fsc=fsc)
        total = torch.from_numpy(scores)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        if rank == 0:
            np.save(result_path, total.numpy())
    finally:
        dist.destroy_process_group()


def _stop(processes: Sequence[multiprocessing.process.BaseProcess]) -> None:
    """Terminate every live worker, then kill those still alive after the grace period."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(TERMINATE_GRACE)
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()


def _worst_error(errors: Any) -> BaseException | None:
    """The error to report from those the workers passed back: a worker's bad input (e.g. a
    NaN image in its shard) before the connection errors it caused in the others."""
    reported: list[BaseException] = []
    try:
        reported.append(errors.get(timeout=1.0)[1])
        while True:
            reported.append(errors.get(timeout=0.2)[1])
    except queue.Empty:
        pass
    for kind in (CryoSieveInputError, OSError, MemoryError):
        for error in reported:
            if isinstance(error, kind):
                return error
    return reported[0] if reported else None


def score_in_processes(table: ParticleTable, directory: Any, references: Sequence[np.ndarray], half_set: np.ndarray,
                       settings: Any, voxel: float | None, fsc: np.ndarray | None) -> np.ndarray:
    """Scores of every particle computed by ``settings.num_processes`` worker processes.

    Returns ``(n,)`` float64, equal bit for bit to one process's scores. A worker's
    exception is raised again here; any failure stops every worker.
    """
    world_size = int(settings.num_processes)
    context = multiprocessing.get_context("spawn")
    errors = context.Queue()
    with tempfile.TemporaryDirectory(prefix="cryosieve-scores-") as folder:
        result_path = os.path.join(folder, "scores.npy")
        port = _free_port()
        arguments = (table, directory, list(references), half_set, settings, voxel, fsc)
        processes = [context.Process(target=_worker, args=(rank, world_size, port, arguments, result_path, errors),
                                     daemon=True, name=f"cryosieve-scorer-{rank}")
                     for rank in range(world_size)]
        try:
            for process in processes:
                process.start()
            pending = list(processes)
            failed = None
            while pending and failed is None:
                multiprocessing.connection.wait([process.sentinel for process in pending], timeout=0.5)
                for process in list(pending):
                    if process.exitcode is not None:
                        pending.remove(process)
                        if process.exitcode != 0 and failed is None:
                            failed = process
            if failed is not None:
                _stop(processes)
                reported = _worst_error(errors)
                if reported is not None:
                    raise reported
                raise RuntimeError(f"scoring process {processes.index(failed)} ended with exit code {failed.exitcode}")
        finally:
            _stop(processes)
            errors.close()
            errors.cancel_join_thread()
        return np.load(result_path)
