"""Scoring in several processes, one per GPU (or CPU processes), on disjoint shards.

Each worker scores the batches ``j`` with ``j % world_size == rank``; the scores are
summed over workers with ``torch.distributed`` (gloo on CPU, which also serves CUDA
workers since the gathered tensor lives in host memory).

The workers are separate programs (``python -m cryosieve.distributed``) that the parent
process watches the whole time:

* the job (table, maps, scoring options) is written to a file before any worker starts, so no
  worker ever reads half of it;
* each worker runs in a process group of its own, so Ctrl-C in a terminal reaches only the
  parent, which then stops every worker (SIGTERM, then SIGKILL after
  :data:`TERMINATE_GRACE` seconds) at any moment, rendezvous included; workers also die
  with the parent (Linux), so none is ever left behind;
* a worker's exception is passed back in a file and raised again in the parent (bad input
  stays a one-line input error); its other output goes to a log whose last line a crash
  report quotes.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cryosieve.errors import CryoSieveInputError
from cryosieve.particles import ParticleSet
from cryosieve.processes import start, stop, stop_signals_deferred
from cryosieve.scoring import ScoringOptions

#: How long a worker waits for the others to join before it gives up (seconds).
RENDEZVOUS_TIMEOUT = 120.0
#: How long stopped workers get to exit before they are killed (seconds).
TERMINATE_GRACE = 2.0
#: How often the parent looks at its workers (seconds).
POLL_INTERVAL = 0.05


def _free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return int(handle.getsockname()[1])


def _stop(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    stop(processes, TERMINATE_GRACE)


def _worst_error(folder: Path, world_size: int) -> BaseException | None:
    """The error to report from those the workers passed back: a worker's bad input (e.g. a
    NaN image in its shard) before the connection errors it caused in the others."""
    reported: list[BaseException] = []
    for rank in range(world_size):
        path = folder / f"rank{rank}.error"
        with contextlib.suppress(OSError, pickle.UnpicklingError, EOFError, AttributeError):
            reported.append(pickle.loads(path.read_bytes()))
    for kind in (CryoSieveInputError, OSError, MemoryError):
        for error in reported:
            if isinstance(error, kind):
                return error
    return reported[0] if reported else None


def _last_line(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return "no output"


def score_in_processes(table: ParticleSet, directory: Any, references: Sequence[np.ndarray], half_set: np.ndarray,
                       options: ScoringOptions, processes_count: int, voxel: float | None,
                       fsc: np.ndarray | None) -> np.ndarray:
    """Scores of every particle computed by ``processes_count`` worker processes with ``options``
    (:func:`cryosieve.scoring.score_rows` on disjoint shards).

    Returns ``(n,)`` float64, equal bit for bit to one process's scores. A worker's
    exception is raised again here; any failure or interrupt stops every worker.
    """
    world_size = int(processes_count)
    with tempfile.TemporaryDirectory(prefix="cryosieve-scoring-") as name:
        folder = Path(name)
        with open(folder / "job.pkl", "wb") as handle:
            pickle.dump((table, directory, list(references), half_set, options, voxel, fsc), handle,
                        protocol=pickle.HIGHEST_PROTOCOL)
        port = _free_port()
        processes: list[subprocess.Popen[bytes]] = []
        with contextlib.ExitStack() as logs:  # the logs are closed after every worker is stopped
            try:
                for rank in range(world_size):
                    log_file = logs.enter_context(open(folder / f"rank{rank}.log", "wb"))
                    with stop_signals_deferred():
                        processes.append(start(
                            [sys.executable, "-m", "cryosieve.distributed", str(rank), str(world_size), str(port),
                             str(folder)], stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT))
                while any(process.poll() is None for process in processes):
                    failed = [rank for rank, process in enumerate(processes) if process.poll() not in (None, 0)]
                    if failed:
                        break
                    time.sleep(POLL_INTERVAL)
                failed = [rank for rank, process in enumerate(processes) if process.poll() not in (None, 0)]
                if failed:
                    _stop(processes)
                    error = _worst_error(folder, world_size)
                    if error is not None:
                        raise error
                    rank = failed[0]
                    raise RuntimeError(f"scoring process {rank} ended with exit code {processes[rank].returncode} "
                                       f"({_last_line(folder / f'rank{rank}.log')})")
            finally:
                _stop(processes)
        return np.load(folder / "scores.npy")


def _score_shard(rank: int, world_size: int, port: int, folder: Path) -> None:
    from dataclasses import replace

    import torch
    import torch.distributed as dist

    from cryosieve.io.stack import StackReader
    from cryosieve.scoring import score_rows

    with open(folder / "job.pkl", "rb") as handle:
        table, directory, references, half_set, options, voxel, fsc = pickle.load(handle)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT))
    try:
        device = torch.device(options.device)
        if device.type == "cuda":
            device = torch.device("cuda", rank % max(torch.cuda.device_count(), 1))
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        local = replace(options, device=device)
        with StackReader(table, directory) as reader:
            scores = score_rows(table, reader, references, half_set, local, rank=rank, world_size=world_size,
                                volume_pixel_size=voxel, reference_fsc=fsc)
        total = torch.from_numpy(scores)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        if rank == 0:
            partial = folder / "scores.partial.npy"
            np.save(partial, total.numpy())
            os.replace(partial, folder / "scores.npy")
    finally:
        dist.destroy_process_group()


def _worker_main(argv: Sequence[str]) -> int:
    """``python -m cryosieve.distributed RANK WORLD_SIZE PORT FOLDER``: score one shard."""
    rank, world_size, port, folder = int(argv[0]), int(argv[1]), int(argv[2]), Path(argv[3])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    try:
        _score_shard(rank, world_size, port, folder)
    except BaseException as error:  # passed to the parent, which raises it again
        try:
            payload = pickle.dumps(error)
        except Exception:  # an exception that does not pickle
            payload = pickle.dumps(RuntimeError(f"{type(error).__name__}: {error}"))
        (folder / f"rank{rank}.error").write_bytes(payload)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
