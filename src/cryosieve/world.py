"""One job in several processes: ``torch.distributed``, started by ``torchrun`` (or ``srun torchrun``).

Under ``torchrun`` every process runs the same command. Rank 0 runs it as a single process
would: it reads and checks the inputs, decides, and alone writes outputs. The other ranks
serve it (:func:`serve`): rank 0 hands every rank the same :class:`Task` (a picklable
object, broadcast), each rank works on its share of the particles (:meth:`World.share`:
contiguous runs, so each rank reads its part of every stack sequentially), and the
results meet in collectives (:meth:`World.sum_to_root`, :meth:`World.sum_everywhere`):

* scoring: each rank scores its share; the scores (float64, zero elsewhere) are summed, so
  every particle's score is its one rank's, bit for bit;
* reconstruction: each rank inserts its share into its own grids (data and CTF^2 weight,
  float64); the grids are summed on rank 0, which finishes the maps.

The backend is ``gloo`` on the CPU and ``nccl`` with CUDA; the rendezvous comes from the
environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``).

Failures stop the whole job, never hang it:

* an exception on any rank inside a task (a bad image in its share, say) reaches every rank at the
  task's next :meth:`World.check`, and rank 0 raises it as if it were its own (one line, exit 2 for
  bad input);
* a rank that dies (killed, out of memory, its node lost) stops beating: each rank publishes a
  heartbeat in the job's key-value store every :data:`HEARTBEAT_SECONDS`, and a rank that sees
  another's stand still for ``CRYOSIEVE_RANK_TIMEOUT`` seconds (:data:`RANK_TIMEOUT`), or loses the
  store, prints one line and exits 1, so ``torchrun`` ends the job with an error.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from cryosieve.errors import CryoSieveInputError, JobError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("cryosieve")

#: Seconds between heartbeats.
HEARTBEAT_SECONDS = 1.0
#: Seconds without a heartbeat after which a rank counts as dead (``CRYOSIEVE_RANK_TIMEOUT``).
RANK_TIMEOUT = 60.0
#: The exit code of a rank that stops because another stopped responding.
EXIT_LOST_RANK = 1


class Task(Protocol):
    """Work that every rank does together: ``run`` is called on every rank with the same object."""

    def run(self, world: World) -> Any: ...


@dataclass(frozen=True)
class _Stop:
    """Tells the serving ranks that rank 0 has finished."""

    def run(self, world: World) -> None:
        return None


class TaskError(RuntimeError):
    """Raised on the other ranks when one rank's part of a task failed (rank 0 raises the error itself)."""


@dataclass
class World:
    """The processes of one job: this one's ``rank`` of ``size``. ``size`` 1 is a single process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str = "none"
    #: Seconds this rank spent in collective operations (waiting for the others included).
    communication_seconds: float = 0.0
    #: Seconds a serving rank waited for its next task.
    idle_seconds: float = 0.0
    _watchdog: _Watchdog | None = field(default=None, repr=False)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def share(self, rows: np.ndarray) -> np.ndarray:
        """This rank's contiguous part of ``rows`` ``(n,)``: ``size`` parts of nearly equal length, in order."""
        bounds = np.linspace(0, len(rows), self.size + 1).round().astype(np.int64)
        return rows[bounds[self.rank]:bounds[self.rank + 1]]

    def device(self, device: torch.device | str) -> torch.device | str:
        """``device`` as this rank uses it: in a job, a CUDA device becomes the one of this rank's local rank;
        otherwise ``device`` itself (no torch import: the CPU reconstruction runs without torch)."""
        if not self.distributed:
            return device
        import torch

        chosen = torch.device(device)
        if chosen.type == "cuda":
            return torch.device("cuda", self.local_rank % max(torch.cuda.device_count(), 1))
        return chosen

    def hand_out(self, task: Task) -> None:
        """On rank 0: give ``task`` to every other rank (:func:`serve` runs it there); nothing in one process."""
        if self.distributed:
            assert self.is_root, "only rank 0 hands out tasks"
            import torch.distributed as dist

            with _collective(self):
                dist.broadcast_object_list([task], src=0)

    def run(self, task: Task) -> Any:
        """On rank 0: give ``task`` to every rank and run it here too; returns rank 0's result."""
        self.hand_out(task)
        return task.run(self)

    def check(self, error: BaseException | None) -> None:
        """Every rank says whether its part failed; if one did, every rank raises: rank 0 the error
        itself (bad input before other errors), the others :class:`TaskError`."""
        if not self.distributed:
            if error is not None:
                raise error
            return
        import torch.distributed as dist

        reported: list[Any] = [None] * self.size
        with _collective(self):
            dist.all_gather_object(reported, None if error is None else _portable(error))
        failures = [(rank, item) for rank, item in enumerate(reported) if item is not None]
        if not failures:
            return
        if not self.is_root:
            raise TaskError(f"rank {failures[0][0]} failed")
        for kind in (CryoSieveInputError, OSError, MemoryError):
            for _rank, item in failures:
                if isinstance(item, kind):
                    raise item
        rank, item = failures[0]
        if rank == 0:
            raise item
        raise RuntimeError(f"rank {rank}: {type(item).__name__}: {item}") from None

    def sum_to_root(self, values: np.ndarray | torch.Tensor) -> None:
        """Sum ``values`` over the ranks into rank 0's array, in place (others' are left undefined)."""
        if self.distributed:
            import torch.distributed as dist

            with self._on_backend(values) as tensor, _collective(self):
                dist.reduce(tensor, dst=0, op=dist.ReduceOp.SUM)

    def sum_everywhere(self, values: np.ndarray | torch.Tensor) -> None:
        """Sum ``values`` over the ranks into every rank's array, in place."""
        if self.distributed:
            import torch.distributed as dist

            with self._on_backend(values) as tensor, _collective(self):
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    @contextlib.contextmanager
    def _on_backend(self, values: np.ndarray | torch.Tensor) -> Iterator[torch.Tensor]:
        """``values`` as a tensor the backend takes (a CUDA copy for ``nccl``), copied back afterwards."""
        import torch

        tensor = torch.from_numpy(values) if isinstance(values, np.ndarray) else values
        if self.backend != "nccl" or tensor.device.type == "cuda":
            yield tensor
            return
        moved = tensor.to(self.device("cuda"))
        yield moved
        tensor.copy_(moved.cpu())


def job_progress(progress: Callable[[int], None] | None, world: World, total: int) -> Callable[[int], None] | None:
    """``progress`` for rank 0's part of a task shared by every rank: each count stands for as many on every
    rank (times ``world.size``), and the sum never passes ``total``."""
    if progress is None or not world.distributed:
        return progress
    done = 0

    def update(count: int) -> None:
        nonlocal done
        step = min(count * world.size, total - done)
        if step > 0:
            done += step
            progress(step)

    return update


@contextlib.contextmanager
def _collective(world: World) -> Iterator[None]:
    """A collective operation of ``world`` (its time counted in :attr:`World.communication_seconds`): the
    communication library's failure (a peer that closed its connection: a rank that died) becomes one
    :class:`~cryosieve.errors.JobError` line."""
    started = time.perf_counter()
    try:
        yield
    except RuntimeError as error:  # torch.distributed.DistBackendError and its kin
        if isinstance(error, (JobError, TaskError)):
            raise
        text = " ".join(str(error).split())
        if "] " in text:
            text = text.split("] ", 1)[1]  # drop the source location gloo puts first
        raise JobError(f"another rank of the job stopped ({text[:160]})") from None
    finally:
        world.communication_seconds += time.perf_counter() - started


def _portable(error: BaseException) -> BaseException:
    """``error``, or a plain RuntimeError of its text when it does not pickle."""
    import pickle

    try:
        pickle.dumps(error)
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


_current = World()


def current() -> World:
    """The world of this process (a single process unless :func:`joined` is active)."""
    return _current


def launched_by_torchrun(environ: dict[str, str] | None = None) -> bool:
    """Whether the environment is that of a ``torchrun`` (or torch elastic) process with more than one rank."""
    environ = dict(os.environ) if environ is None else environ
    return int(environ.get("WORLD_SIZE", "1") or 1) > 1 and "RANK" in environ and "MASTER_ADDR" in environ


@contextlib.contextmanager
def joined(device: str = "cpu", program: str = "cryosieve") -> Iterator[World]:
    """Join the job ``torchrun`` started (its environment), start the heartbeat, and make it :func:`current`.

    ``device``: ``"cuda"`` uses ``nccl`` (one GPU per local rank), anything else ``gloo``. On leaving,
    rank 0 tells the others to stop (:func:`serve`) and every rank leaves the process group.
    """
    global _current
    import torch
    import torch.distributed as dist

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device == "cuda" and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(backend, timeout=datetime.timedelta(days=7))  # liveness: the heartbeat
    world = World(rank=rank, size=size, local_rank=local_rank, backend=backend)
    if backend == "gloo":  # the node's cores shared among its ranks
        threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
        torch.set_num_threads(threads)
        with contextlib.suppress(ImportError, ValueError):
            import numba

            numba.set_num_threads(min(threads, int(getattr(numba.config, "NUMBA_NUM_THREADS", threads))))
    world._watchdog = _Watchdog(world, float(os.environ.get("CRYOSIEVE_RANK_TIMEOUT", RANK_TIMEOUT)), program)
    world._watchdog.start()
    previous, _current = _current, world
    finished = False
    started = time.perf_counter()
    try:
        yield world
        finished = True
    finally:
        _current = previous
        if finished or world.is_root:
            with contextlib.suppress(Exception):
                if world.is_root:
                    dist.broadcast_object_list([_Stop()], src=0)
                world._watchdog.finish()
                _write_timings(world, time.perf_counter() - started)
                dist.destroy_process_group()


def _write_timings(world: World, seconds: float) -> None:
    """With ``CRYOSIEVE_JOB_TIMINGS=FOLDER`` (for benchmarks): ``FOLDER/rank{r}.json`` with this rank's wall
    time in the job and in collectives (seconds)."""
    folder = os.environ.get("CRYOSIEVE_JOB_TIMINGS")
    if not folder:
        return
    import json

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"rank{world.rank}.json"), "w") as handle:
        json.dump({"rank": world.rank, "size": world.size, "host": socket.gethostname(), "seconds": seconds,
                   "communication_seconds": world.communication_seconds, "idle_seconds": world.idle_seconds},
                  handle)


def serve(world: World) -> int:
    """The loop of a rank other than 0: run each task rank 0 hands out until it says stop; 0 when it
    does. A failed part is reported to every rank (:meth:`World.check`) and the loop goes on."""
    import torch.distributed as dist

    while True:
        received: list[Any] = [None]
        counted = world.communication_seconds
        with _collective(world):
            dist.broadcast_object_list(received, src=0)
        world.idle_seconds += world.communication_seconds - counted  # waiting for work is not communication
        world.communication_seconds = counted
        task = received[0]
        if isinstance(task, _Stop):
            return 0
        with contextlib.suppress(TaskError):
            task.run(world)


class _Watchdog:
    """The heartbeat of one rank and its watch over the others (see the module's text)."""

    def __init__(self, world: World, timeout: float, program: str) -> None:
        import torch.distributed as dist

        self.world = world
        self.timeout = timeout
        self.store = dist.distributed_c10d._get_default_store()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="cryosieve-heartbeat", daemon=True)
        self.host = socket.gethostname()
        self.program = program

    def start(self) -> None:
        self.store.set(f"cryosieve/host/{self.world.rank}", self.host)
        self.thread.start()

    def finish(self) -> None:
        self.store.set(f"cryosieve/done/{self.world.rank}", "1")
        self.stopped.set()

    def _loop(self) -> None:
        beat = 0
        seen: dict[int, tuple[bytes, float]] = {}
        others = [rank for rank in range(self.world.size) if rank != self.world.rank]
        while not self.stopped.wait(HEARTBEAT_SECONDS):
            try:
                beat += 1
                self.store.set(f"cryosieve/alive/{self.world.rank}", str(beat))
                now = time.monotonic()
                for rank in others:
                    if self.store.check([f"cryosieve/done/{rank}"]):
                        continue
                    key = f"cryosieve/alive/{rank}"
                    value = self.store.get(key) if self.store.check([key]) else b""
                    last = seen.get(rank)
                    if last is None or last[0] != value:
                        seen[rank] = (value, now)
                    elif now - last[1] > self.timeout:
                        host = self.store.get(f"cryosieve/host/{rank}").decode(errors="replace")
                        self._abort(f"rank {rank} (on {host}) stopped responding {self.timeout:.0f} s ago; "
                                    "stopping the job")
            except Exception as error:  # the store is gone: the rank that held it is dead
                if self.stopped.is_set():
                    return
                self._abort(f"lost the job's rendezvous store ({type(error).__name__}); another rank has "
                            "probably died; stopping the job")

    def _abort(self, message: str) -> None:
        print(f"{self.program}: error: rank {self.world.rank}: {message}", file=sys.stderr, flush=True)
        os._exit(EXIT_LOST_RANK)


# --------------------------------------------------------------------------- a job on this machine


#: Seconds the ranks of a local job get to leave after rank 0 is done, before they are stopped.
LOCAL_EXIT_GRACE = 10.0
#: How often rank 0 of a local job looks at the ranks it started (seconds).
LOCAL_POLL_SECONDS = 0.2


def _free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return int(handle.getsockname()[1])


@contextlib.contextmanager
def local_job(size: int, device: str = "cpu", program: str = "cryosieve") -> Iterator[World]:
    """This process as rank 0 of a job of ``size`` processes on this machine (``--num_gpus``), through the
    same code as a ``torchrun`` job (:func:`joined`, :func:`serve`): the other ranks are started here
    (``python -m cryosieve.world``), each in a process group of its own that dies with this process
    (:func:`cryosieve.processes.start`). A rank that ends with an error before the job does stops the job
    with one line; on leaving, every rank that has not ended is stopped."""
    from cryosieve.processes import start, stop, stop_signals_deferred

    job = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(size),
           "LOCAL_WORLD_SIZE": str(size)}
    saved = {name: os.environ.get(name) for name in [*job, "RANK", "LOCAL_RANK"]}
    ranks: list[Any] = []
    watching = threading.Event()
    try:
        for rank in range(1, size):
            environment = dict(os.environ, **job, RANK=str(rank), LOCAL_RANK=str(rank))
            with stop_signals_deferred():
                ranks.append(start([sys.executable, "-m", "cryosieve.world", device, program], env=environment,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
        os.environ.update(job, RANK="0", LOCAL_RANK="0")
        watcher = threading.Thread(target=_watch_ranks, args=(ranks, watching, program), daemon=True,
                                   name="cryosieve-ranks")
        watching.set()
        watcher.start()
        with joined(device, program) as world:
            yield world
        watching.clear()
        deadline = time.monotonic() + LOCAL_EXIT_GRACE
        for process in ranks:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.0, deadline - time.monotonic()))
    finally:
        watching.clear()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        stop(ranks, 2.0)


def _watch_ranks(ranks: list[Any], watching: threading.Event, program: str) -> None:
    """Rank 0's watch over the ranks it started: one that ends with an error while the job runs stops the
    job (one line, exit 1), whatever rank 0 is doing (waiting in the rendezvous included)."""
    while watching.is_set():
        for rank, process in enumerate(ranks, start=1):
            code = process.poll()
            if code not in (None, 0) and watching.is_set():
                reason = f"exit code {code}" if code > 0 else f"signal {-code}"
                print(f"{program}: error: rank {rank} of the job ended ({reason}); stopping the job", file=sys.stderr,
                      flush=True)
                os._exit(EXIT_LOST_RANK)
        time.sleep(LOCAL_POLL_SECONDS)


def _rank_main(argv: list[str]) -> int:
    """``python -m cryosieve.world DEVICE PROGRAM``: a rank other than 0 of a local job (:func:`local_job`)."""
    import signal

    device, program = argv[0], argv[1]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when to stop
    try:
        with joined(device, program) as world:
            return serve(world)
    except JobError as error:
        print(f"{program}: error: rank {os.environ.get('RANK', '?')}: {error}", file=sys.stderr, flush=True)
        return EXIT_LOST_RANK


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1:]))
