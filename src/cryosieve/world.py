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

Failures stop the whole job, never hang it, and are said in one line:

* an exception on any rank inside a task (a bad image in its share, say) reaches every rank at the
  task's next :meth:`World.check`, and rank 0 raises it as if it were its own (one line, exit 2 for
  bad input);
* a watchdog (:class:`_Watchdog`) runs in every rank from before the rendezvous to the end: each rank
  beats in the job's key-value store every :data:`HEARTBEAT_SECONDS` and watches the others' beats. A
  rank that freezes at any moment (start-up included), dies, or never joins is noticed (within
  ``CRYOSIEVE_RANK_TIMEOUT`` seconds, :data:`RANK_TIMEOUT`; a rank that never starts, or ranks that
  cannot connect, within ``CRYOSIEVE_RENDEZVOUS_TIMEOUT``, :data:`RENDEZVOUS_TIMEOUT`); the first rank
  to notice says which rank, on which host, in one line; every rank exits 1, and a lost rank on the
  noticing rank's machine is killed (SIGKILL also ends a stopped process), so ``torchrun`` ends the job
  with an error and nothing is left behind. Rank 0 writes nothing after that: its outputs appear
  whole or not at all, as in one process.
"""

from __future__ import annotations

import _thread
import contextlib
import datetime
import logging
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from cryosieve.errors import CryoSieveInputError, JobEnded, JobError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("cryosieve")

#: Seconds between heartbeats.
HEARTBEAT_SECONDS = 1.0
#: Seconds without a heartbeat after which a rank counts as dead (``CRYOSIEVE_RANK_TIMEOUT``); also how
#: long a rank may be seen stopped (SIGSTOP) before its first beat, and how long the store may be silent.
RANK_TIMEOUT = 60.0
#: Seconds within which every rank must have started beating and the ranks must have connected
#: (``CRYOSIEVE_RENDEZVOUS_TIMEOUT``); also the limit on reaching the job's key-value store.
RENDEZVOUS_TIMEOUT = 300.0
#: Seconds the main thread has to unwind once the job ends before the process exits anyway.
GRACE_SECONDS = 5.0
#: The exit code of a rank that stops because the job lost a rank.
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
    communication library's failure (a peer that closed its connection: a rank that died) ends the job
    (:meth:`_Watchdog.lost_connection`: one line, said once)."""
    started = time.perf_counter()
    try:
        yield
    except RuntimeError as error:  # torch.distributed.DistBackendError and its kin
        if isinstance(error, (JobError, TaskError)):
            raise
        if world._watchdog is None:
            raise JobError(f"another rank of the job stopped ({_short(error)})") from None
        raise world._watchdog.lost_connection(error) from None
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
_last_watchdog: _Watchdog | None = None


def current() -> World:
    """The world of this process (a single process unless :func:`joined` is active)."""
    return _current


def interrupted(error: KeyboardInterrupt) -> BaseException:
    """What an interrupt that reached the caller of :func:`joined` stands for: :class:`JobEnded` when this
    process's job ended for a reason already said (the watchdog interrupts the main thread then), else
    ``error`` itself (a stop signal of this process's own, for the command to say)."""
    return error if _last_watchdog is None else _last_watchdog.outcome(error)


def launched_by_torchrun(environ: dict[str, str] | None = None) -> bool:
    """Whether the environment is that of a ``torchrun`` (or torch elastic) process with more than one rank."""
    environ = dict(os.environ) if environ is None else environ
    return int(environ.get("WORLD_SIZE", "1") or 1) > 1 and "RANK" in environ and "MASTER_ADDR" in environ


def _seconds(name: str, default: float) -> float:
    """A number of seconds > 0 from the environment variable ``name`` (``default`` when unset)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise CryoSieveInputError(f"{name}={text!r}: expected a number of seconds above 0")
    return value


def _short(error: BaseException) -> str:
    """The first line of an error from torch's C++ side, without its source location."""
    text = " ".join(str(error).split("\n", 1)[0].split())
    if "] " in text and text.startswith("["):
        text = text.split("] ", 1)[1]  # drop the source location gloo puts first
    return text[:160] or type(error).__name__


def _job_store(rank: int, size: int, seconds: float, client: bool = False) -> Any:
    """A connection to the job's key-value store (at ``MASTER_ADDR:MASTER_PORT``): ``torchrun``'s agent serves it,
    or, in a job started otherwise, rank 0 (unless ``client``); reached within ``seconds`` or a
    :class:`~cryosieve.errors.JobError`."""
    from torch.distributed import TCPStore  # type: ignore[attr-defined]

    address, port = os.environ["MASTER_ADDR"], int(os.environ.get("MASTER_PORT", "0") or 0)
    serve_it = rank == 0 and not client and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    try:
        return TCPStore(address, port, size if serve_it else None, is_master=serve_it,
                        timeout=datetime.timedelta(seconds=seconds), wait_for_workers=False, multi_tenant=True)
    except (RuntimeError, ValueError, OSError) as error:  # torch.distributed.DistNetworkError and its kin
        why = "" if "timed out" in str(error) else f" ({_short(error)})"
        raise JobError(f"rank {rank}: could not reach the job's rendezvous at {address}:{port} within "
                       f"{seconds:.0f} s{why}") from None


@contextlib.contextmanager
def joined(device: str = "cpu", program: str = "cryosieve") -> Iterator[World]:
    """Join the job ``torchrun`` started (its environment) under a watchdog, and make it :func:`current`.

    ``device``: ``"cuda"`` uses ``nccl`` (one GPU per local rank), anything else ``gloo``. The watchdog
    (:class:`_Watchdog`) starts before the rendezvous. On leaving, rank 0 tells the others to stop
    (:func:`serve`) and waits until each has; every rank leaves the process group. When the job ends
    otherwise (a rank lost, a stop signal), the block ends with :class:`~cryosieve.errors.JobEnded` once
    the reason has been said, or with rank 0's own error.
    """
    global _current, _last_watchdog
    import torch
    import torch.distributed as dist

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    timeout = _seconds("CRYOSIEVE_RANK_TIMEOUT", RANK_TIMEOUT)
    meeting = _seconds("CRYOSIEVE_RENDEZVOUS_TIMEOUT", RENDEZVOUS_TIMEOUT)
    backend = "nccl" if device == "cuda" and torch.cuda.is_available() else "gloo"
    store = _job_store(rank, size, meeting)
    watchdog = _Watchdog(rank, size, program, _job_store(rank, size, meeting, client=True), timeout, meeting)
    world = World(rank=rank, size=size, local_rank=local_rank, backend=backend, _watchdog=watchdog)
    _last_watchdog = watchdog
    watchdog.start()
    previous = _current
    outcome: BaseException | None = None
    started = time.perf_counter()
    try:
        try:
            if backend == "nccl":
                torch.cuda.set_device(local_rank % torch.cuda.device_count())
            # liveness comes from the watchdog: collectives may wait as long as the work takes
            dist.init_process_group(backend, store=dist.PrefixStore(  # type: ignore[attr-defined]
                                    "default_pg", store), rank=rank,
                                    world_size=size, timeout=datetime.timedelta(days=7))
        except RuntimeError as error:
            raise watchdog.not_met(error) from None
        watchdog.met()
        if backend == "gloo":  # the node's cores shared among its ranks
            threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
            torch.set_num_threads(threads)
            with contextlib.suppress(ImportError, ValueError):
                import numba

                numba.set_num_threads(min(threads, int(getattr(numba.config, "NUMBA_NUM_THREADS", threads))))
        _current = world
        yield world
    except BaseException as error:
        outcome = watchdog.outcome(error)
    _current = previous
    try:
        _leave(world, watchdog, outcome, time.perf_counter() - started)
    except BaseException as error:
        outcome = outcome if outcome is not None else watchdog.outcome(error)
    finally:
        watchdog.left()
    if outcome is not None:
        raise outcome


def _leave(world: World, watchdog: _Watchdog, outcome: BaseException | None, seconds: float) -> None:
    """This rank leaves the job. After a normal end, or an error of rank 0's own (the others are fine): rank 0
    tells the others to stop and waits until each has (a rank that freezes now is still noticed), and the
    process group closes. After a lost rank or a stop signal, nothing waits for the others."""
    import torch.distributed as dist

    intact = outcome is None or (world.is_root and not isinstance(outcome, (JobEnded, KeyboardInterrupt)))
    if not intact:
        watchdog.say_done()
        watchdog.stop()
        return
    if world.is_root:
        with _collective(world):
            dist.broadcast_object_list([_Stop()], src=0)
        watchdog.wait_for_the_others()
    watchdog.say_done()
    watchdog.stop()
    _write_timings(world, seconds)
    with contextlib.suppress(Exception):
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


# --------------------------------------------------------------------------- the processes of this machine


def _job_marks(environ: Mapping[str, str]) -> dict[str, str]:
    """What tells this job's processes from others' in their start environment."""
    return {name: environ.get(name, "") for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE",
                                                     "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")}


def _start_time(pid: int) -> tuple[str, int] | None:
    """``(state, start time)`` of a process on this machine (Linux ``/proc``), ``None`` when it is gone.
    State ``T`` (or ``t``) is stopped, ``Z`` ended but not yet collected by its parent."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0].decode(), int(fields[19])


def _ranks_on_this_machine(marks: Mapping[str, str], wanted: Iterable[int]) -> dict[int, tuple[int, int]]:
    """``rank: (pid, start time)`` of the ranks in ``wanted`` that run on this machine: processes of this
    user whose start environment has this job's ``marks`` (empty where ``/proc`` is not); of a rank and the
    processes it started, which inherit its environment, the first to start."""
    wanted = set(wanted)
    found: dict[int, tuple[int, int]] = {}
    if not wanted or not os.path.isdir("/proc"):
        return found
    uid = os.getuid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            with open(f"/proc/{entry.name}/environ", "rb") as handle:
                words = handle.read().split(b"\0")
        except OSError:
            continue
        environ = dict(word.decode(errors="replace").split("=", 1) for word in words if b"=" in word)
        if _job_marks(environ) != marks or not environ.get("RANK", "").isdigit():
            continue
        rank = int(environ["RANK"])
        status = _start_time(int(entry.name))
        if rank in wanted and status is not None and (rank not in found or status[1] < found[rank][1]):
            found[rank] = (int(entry.name), status[1])
    return found


# --------------------------------------------------------------------------- the watchdog


def _has_left(value: bytes | None) -> bool:
    """Whether a rank's beat says it has left the job on purpose (done, or stopped by a signal)."""
    return value is not None and (value == b"done" or value.startswith(b"stopped:"))


class _Silent(Exception):
    """The job's key-value store did not answer in time."""


class _Asker:
    """Calls on the job's key-value store made one after another in a thread of their own, so that a store
    that stops answering (its host frozen) costs the caller a time limit, never a hang."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.requests: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], threading.Event, list[Any]]]
        self.requests = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="cryosieve-store", daemon=True).start()

    def __call__(self, seconds: float, method: str, *args: Any) -> Any:
        """``store.method(*args)``; raises :class:`_Silent` after ``seconds`` without an answer, and the error
        the call raised."""
        done = threading.Event()
        answer: list[Any] = []
        self.requests.put((getattr(self.store, method), args, done, answer))
        if not done.wait(seconds):
            raise _Silent
        if isinstance(answer[0], BaseException):
            raise answer[0]
        return answer[1]

    def _serve(self) -> None:
        while True:
            call, args, done, answer = self.requests.get()
            try:
                answer[:] = [None, call(*args)]
            except BaseException as error:
                answer[:] = [error]
            done.set()


class _Watchdog:
    """The heartbeat of one rank and its watch over the others, from before the rendezvous to the end.

    Each :data:`HEARTBEAT_SECONDS` this rank beats in the job's key-value store (``alive/RANK``: a count,
    ``done`` once it leaves on purpose) and reads the others' beats. The job ends (:meth:`end`: one line by
    the first rank to claim it in the store, every rank exits 1, a lost rank on this machine is killed with
    SIGKILL, which also ends a stopped process) when

    * a rank's beat stands still for ``timeout`` seconds: frozen (SIGSTOP), deadlocked, or dead;
    * a rank has not beaten yet and its process, on this machine, has been stopped for ``timeout`` seconds
      (frozen during start-up: importing, connecting), or ``meeting`` seconds have passed (it never started,
      or is stuck on another machine), or the ranks have not connected within ``meeting`` seconds;
    * the store has not answered for ``timeout`` seconds (its host, ``torchrun`` on the first node, is gone);
    * a stop signal (``torchrun`` sends SIGTERM to all when one of its ranks ends) finds a rank of this
      machine gone without having said so: it ended unexpectedly (killed, crashed).

    A stop signal that finds no lost rank is a stop: rank 0 says ``interrupted`` or ``terminated``. Signals are
    seen in this thread at once (``signal.set_wakeup_fd``), even while the main thread waits in a collective,
    which would not run Python's handler until it returns. The main thread is interrupted to unwind (its
    temporaries removed); a process that has not ended :data:`GRACE_SECONDS` later exits anyway.
    """

    def __init__(self, rank: int, size: int, program: str, store: Any, timeout: float, meeting: float) -> None:
        self.rank, self.size, self.program = rank, size, program
        self.timeout, self.meeting = timeout, meeting
        self.ask = _Asker(store)
        self.prefix = f"cryosieve/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self.host = socket.gethostname()
        self.address = f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"
        self.marks = _job_marks(os.environ)
        self.others = [other for other in range(size) if other != rank]
        self.decide = threading.RLock()  # one decision at a time: why the job ends
        self.exit_lock = threading.Lock()
        self.beating = threading.Lock()  # a beat or the word this rank leaves with, one at a time
        self.leaving = threading.Event()  # the main thread has left the job
        self.stopped = threading.Event()  # no more watching
        #: The exit code once the job's end has been decided and said; ``None`` while it goes on.
        self.ending: int | None = None
        #: The stop signal received, when it was a plain stop.
        self.signal_number: int | None = None
        self.propagated = False  # the stop signal was received by another rank
        self.stop_said = False
        self.left_as: str | None = None  # what this rank said when it left (say_done)
        self.connected = False
        self.started = time.monotonic()
        self.beats = 0
        self.seen: dict[int, tuple[bytes, float]] = {}
        self.stopped_since: dict[int, float] = {}
        self.local: dict[int, tuple[int, int]] = {}
        self.hosts: dict[int, str] = {}
        self.wakeup: int | None = None
        self.previous_wakeup = -1
        self.thread = threading.Thread(target=self._loop, name="cryosieve-heartbeat", daemon=True)

    def key(self, kind: str, rank: int | None = None) -> str:
        return f"{self.prefix}{kind}" + ("" if rank is None else f"/{rank}")

    # ---- the main thread

    def start(self) -> None:
        """Say where this rank runs, beat once, watch for stop signals, and start watching (main thread)."""
        try:
            self._ask("set", self.key("host", self.rank), self.host)
            self._beat()
        except (_Silent, RuntimeError) as error:
            raise JobError(f"rank {self.rank}: the job's key-value store at {self.address} did not answer "
                           f"({_short(error) if str(error) else 'no answer'})") from None
        self.local = _ranks_on_this_machine(self.marks, self.others)
        self._publish_hosts()
        if threading.current_thread() is threading.main_thread():
            read, write = os.pipe()
            os.set_blocking(read, False)
            os.set_blocking(write, False)
            self.previous_wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
            self.wakeup, self.wakeup_write = read, write
        self.thread.start()

    def met(self) -> None:
        """The process group has connected."""
        self.connected = True

    def not_met(self, error: BaseException) -> BaseException:
        """What to raise when the process group could not connect (``error``)."""
        with self.decide:
            ended = self._already(error)
            if ended is not None:
                return ended
            missing = [rank for rank in self.others if not self.connected and rank not in self.seen]
            if missing:
                self.end(f"rank {missing[0]} ({self._where(missing[0])}) has not joined the job", missing[0])
            else:
                self.end(f"the job's ranks did not connect ({_short(error)}); check that every node reaches the "
                         "others (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME)")
            return JobEnded(EXIT_LOST_RANK)

    def lost_connection(self, error: BaseException) -> BaseException:
        """What to raise when a collective failed (``error``: a peer closed its connection): after the rank that
        saw why has had a moment to say it, this rank ends quietly; otherwise it says what it knows."""
        deadline = time.monotonic() + min(GRACE_SECONDS, self.timeout)
        while True:
            with self.decide:
                ended = self._already(KeyboardInterrupt())
                if ended is not None:
                    return ended
                try:
                    said = bool(int(self._ask("add", self.key("said"), 0)))
                    values = list(self._read().values())
                except Exception:
                    said, values = False, []
                stops = [int(value[8:]) for value in values if value is not None and value.startswith(b"stopped:")]
                if stops and not said:  # another rank was stopped by a signal: so is the job
                    self._stopped_by(stops[0], propagated=True)
                    continue
                if said or b"done" in values:  # the job ends for a reason said by another rank, or by one that left
                    self.ending = EXIT_LOST_RANK
                    self.say_done()
                    return JobEnded(EXIT_LOST_RANK)
                lost = self._lost_here()
                if lost is not None:
                    self.end(f"rank {lost} ({self._where(lost)}) ended unexpectedly (killed, or it crashed); "
                             "stopping the job", lost)
                    return JobEnded(EXIT_LOST_RANK)
                if time.monotonic() > deadline:
                    self.end(f"rank {self.rank} lost its connection to another rank ({_short(error)}); "
                             "stopping the job")
                    return JobEnded(EXIT_LOST_RANK)
            time.sleep(0.2)

    def outcome(self, error: BaseException) -> BaseException:
        """What the block of :func:`joined` ends with after ``error``: :class:`JobEnded` when the job's end has
        been said (or, on a rank other than 0, by a stop signal), else ``error`` itself."""
        with self.decide:
            ended = self._already(error)
        return error if ended is None else ended

    def say_done(self, value: str = "done") -> None:
        """This rank leaves the job on purpose (``done``, or ``stopped:N`` by signal N): the others need not
        watch it any more."""
        with self.beating:
            if self.left_as is not None:  # said already: the first word stands
                return
            self.left_as = value
            with contextlib.suppress(Exception):
                self._ask("set", self.key("alive", self.rank), value)

    def wait_for_the_others(self) -> None:
        """Rank 0 at the end: wait until every other rank has left (a frozen one ends the job meanwhile)."""
        while True:
            with self.decide:
                if self.ending is not None:
                    raise JobEnded(self.ending)
            if all(_has_left(value) for value in self._read().values()):
                return
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop watching (an exit already decided still follows)."""
        self.stopped.set()

    def left(self) -> None:
        """The main thread has left the job (it exits on its own from here)."""
        with self.exit_lock:
            self.leaving.set()
        if self.wakeup is not None:
            with contextlib.suppress(ValueError):
                signal.set_wakeup_fd(self.previous_wakeup)

    # ---- deciding

    def _already(self, error: BaseException) -> BaseException | None:
        """:class:`JobEnded` when the job's end has been decided, or this rank was stopped by a signal and is
        not rank 0 (rank 0 says it); a KeyboardInterrupt on rank 0 after a plain stop; else ``None``."""
        self._check_signals()
        if isinstance(error, JobEnded):
            return error
        if self.ending is not None:
            return JobEnded(self.ending)
        if self.signal_number is None:
            return None
        if self.rank == 0 and not self.propagated:
            return KeyboardInterrupt()  # said by the command, which knows the signal
        if self.rank == 0:
            self._say_stop()
        return JobEnded(128 + self.signal_number)

    def _stopped_by(self, number: int, propagated: bool) -> None:
        """The job stops by signal ``number``, received here or (``propagated``) by another rank."""
        self.signal_number, self.propagated = number, propagated
        self.say_done(f"stopped:{number}")

    def _say_stop(self) -> None:
        """Rank 0's line for a stop by signal (once)."""
        if not self.stop_said:
            self.stop_said = True
            word = "interrupted" if self.signal_number == signal.SIGINT else "terminated"
            print(f"{self.program}: {word}", file=sys.stderr, flush=True)

    def end(self, message: str, culprit: int | None = None, claim: bool = True) -> None:
        """End the job: ``message`` in one line (by the first rank to claim it), the ``culprit`` rank killed when
        it runs on this machine, the main thread interrupted; the exit follows (:meth:`_exit_later`)."""
        with self.decide:  # the main thread learns of the end only once it has been said
            if self.ending is not None:
                return
            self.ending = EXIT_LOST_RANK
            first = True
            if claim:
                with contextlib.suppress(Exception):
                    first = int(self._ask("add", self.key("said"), 1)) == 1
            self.say_done()
            if first:
                print(f"{self.program}: error: {message}", file=sys.stderr, flush=True)
        if culprit is not None:
            self._kill(culprit)
        if threading.current_thread() is not threading.main_thread():
            with self.exit_lock:
                if not self.leaving.is_set():
                    _thread.interrupt_main()

    def _check_signals(self) -> None:
        """Read the stop signals received so far and decide what they mean (see the class text)."""
        if self.wakeup is None:
            return
        with self.decide:
            numbers = b""
            with contextlib.suppress(BlockingIOError, OSError):
                numbers = os.read(self.wakeup, 512)
            stops = [number for number in numbers if number in (signal.SIGINT, signal.SIGTERM)]
            if not stops or self.ending is not None or self.signal_number is not None:
                return
            try:
                said = bool(int(self._ask("add", self.key("said"), 0)))
            except Exception:
                said = False
            if said:  # another rank has said why the job ends: torchrun stops the rest
                self.ending = EXIT_LOST_RANK
                self.say_done()
                return
            lost = self._lost_here()
            if lost is not None:
                self.end(f"rank {lost} ({self._where(lost)}) ended unexpectedly (killed, or it crashed); "
                         "stopping the job", lost)
                return
            self._stopped_by(stops[0], propagated=False)

    def _lost_here(self) -> int | None:
        """A rank of this machine whose process is gone (or ended) though it has not left on purpose."""
        alive = self._read() if self.local else {}
        for rank, (pid, start) in sorted(self.local.items()):
            status = _start_time(pid)
            if (status is None or status[1] != start or status[0] in "ZX") and not _has_left(alive.get(rank)):
                return rank
        return None

    def _kill(self, rank: int) -> None:
        """SIGKILL to ``rank``'s process if it runs on this machine (a stopped process too)."""
        entry = self.local.get(rank) or _ranks_on_this_machine(self.marks, [rank]).get(rank)
        if entry is None:
            return
        status = _start_time(entry[0])
        if status is not None and status[1] == entry[1]:
            with contextlib.suppress(OSError):
                os.kill(entry[0], signal.SIGKILL)

    def _where(self, rank: int) -> str:
        """``on HOST`` for a rank, as far as it is known."""
        if rank not in self.hosts:
            with contextlib.suppress(Exception):
                if self._ask("check", [self.key("host", rank)]):
                    self.hosts[rank] = bytes(self._ask("get", self.key("host", rank))).decode(errors="replace")
        if rank not in self.hosts and rank in self.local:
            self.hosts[rank] = self.host
        return f"on {self.hosts[rank]}" if rank in self.hosts else "host unknown"

    # ---- the heartbeat thread

    def _loop(self) -> None:
        while True:
            if self.ending is not None or self.signal_number is not None:
                self._exit_later()
                return
            if self.stopped.is_set():
                return
            if self.wakeup is not None:
                select.select([self.wakeup], [], [], HEARTBEAT_SECONDS)
            else:
                time.sleep(HEARTBEAT_SECONDS)
            self._check_signals()
            if self.stopped.is_set() or self.ending is not None or self.signal_number is not None:
                continue
            try:
                self._watch()
            except _Silent:
                self.end(f"the job's key-value store at {self.address} has not answered for {self.timeout:.0f} s "
                         "(the first node's torchrun is frozen or gone); stopping the job", claim=False)
            except Exception as error:
                if not self.stopped.is_set():
                    self.end(f"lost the job's key-value store at {self.address} ({_short(error)}); another rank "
                             "or the first node's torchrun has probably died; stopping the job", claim=False)

    def _watch(self) -> None:
        """One beat, and a look at the others."""
        self._beat()
        now = time.monotonic()
        unseen = [rank for rank in self.others if rank not in self.seen and rank not in self.local]
        if unseen:  # start-up: which of the others run here?
            self.local.update(_ranks_on_this_machine(self.marks, unseen))
            self._publish_hosts()
        values = self._read()
        stops = [int(value[8:]) for value in values.values() if value is not None and value.startswith(b"stopped:")]
        if stops:  # another rank was stopped by a signal: so is the job
            with self.decide:
                if self.ending is None and self.signal_number is None:
                    self._stopped_by(stops[0], propagated=True)
                    with self.exit_lock:
                        if not self.leaving.is_set():
                            _thread.interrupt_main()
            return
        for rank, value in values.items():
            if _has_left(value):
                continue
            if value is None:  # not started yet
                status = _start_time(self.local[rank][0]) if rank in self.local else None
                if status is not None and status[0] in "Tt":
                    since = self.stopped_since.setdefault(rank, now)
                    if now - since > self.timeout:
                        self.end(f"rank {rank} ({self._where(rank)}) is stopped (a SIGSTOP or Ctrl-Z) and has not "
                                 f"joined the job for {self.timeout:.0f} s; stopping the job", rank)
                        return
                else:
                    self.stopped_since.pop(rank, None)
                if now - self.started > self.meeting:
                    self.end(f"rank {rank} ({self._where(rank)}) has not joined the job within {self.meeting:.0f} s; "
                             "stopping the job", rank)
                    return
                continue
            last = self.seen.get(rank)
            if last is None or last[0] != value:
                self.seen[rank] = (value, now)
            elif now - last[1] > self.timeout:
                self.end(f"rank {rank} ({self._where(rank)}) stopped responding: no heartbeat for "
                         f"{self.timeout:.0f} s; stopping the job", rank)
                return
        if not self.connected and now - self.started > self.meeting:
            self.end(f"the job's ranks did not connect within {self.meeting:.0f} s; check that every node reaches "
                     "the others (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME)")

    def _exit_later(self) -> None:
        """Give the main thread :data:`GRACE_SECONDS` to leave the job (none before the ranks have connected:
        nothing has been done yet), then exit the process."""
        code = self.ending if self.ending is not None else 128 + (self.signal_number or signal.SIGINT)
        self.leaving.wait(GRACE_SECONDS if self.connected else 0.0)
        with self.exit_lock:
            if self.leaving.is_set():
                return
            if self.ending is None and self.rank == 0:
                self._say_stop()
            os._exit(code)

    # ---- the store

    def _ask(self, method: str, *args: Any) -> Any:
        return self.ask(self.timeout, method, *args)

    def _beat(self) -> None:
        with self.beating:  # never after this rank has said it left
            if self.left_as is None:
                self.beats += 1
                self._ask("set", self.key("alive", self.rank), str(self.beats))

    def _read(self) -> dict[int, bytes | None]:
        """Every other rank's beat (``b"done"`` or ``b"stopped:N"`` once it has left; ``None`` before its first)."""
        keys = [self.key("alive", rank) for rank in self.others]
        if self._ask("check", keys):
            return dict(zip(self.others, (bytes(value) for value in self._ask("multi_get", keys)), strict=True))
        return {rank: bytes(self._ask("get", key)) if self._ask("check", [key]) else None
                for rank, key in zip(self.others, keys, strict=True)}

    def _publish_hosts(self) -> None:
        """Say where the ranks found on this machine run (for the message, should one never start)."""
        for rank in self.local:
            if rank not in self.hosts:
                self.hosts[rank] = self.host
                with contextlib.suppress(Exception):
                    self._ask("compare_set", self.key("host", rank), "", self.host)


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
        watcher = threading.Thread(target=_watch_ranks, args=(ranks, watching, program, _last_watchdog), daemon=True,
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


def _watch_ranks(ranks: list[Any], watching: threading.Event, program: str, before: _Watchdog | None) -> None:
    """Rank 0's watch over the ranks it started: one that ends with an error while the job runs stops the
    job (one line, exit 1), whatever rank 0 is doing (waiting in the rendezvous included)."""
    while watching.is_set():
        for rank, process in enumerate(ranks, start=1):
            code = process.poll()
            if code not in (None, 0) and watching.is_set():
                reason = f"exit code {code}" if code > 0 else f"signal {-code}"
                message = f"rank {rank} of the job ended ({reason}); stopping the job"
                watchdog = _last_watchdog
                if watchdog is not None and watchdog is not before:  # this job's watchdog says it, once
                    watchdog.end(message)
                    return
                print(f"{program}: error: {message}", file=sys.stderr, flush=True)
                os._exit(EXIT_LOST_RANK)
        time.sleep(LOCAL_POLL_SECONDS)


def _rank_main(argv: list[str]) -> int:
    """``python -m cryosieve.world DEVICE PROGRAM``: a rank other than 0 of a local job (:func:`local_job`)."""
    from cryosieve.processes import forget_caught_interrupts

    device, program = argv[0], argv[1]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when to stop
    try:
        with joined(device, program) as world:
            return serve(world)
    except JobEnded as ended:  # the job ended and why has been said
        return ended.exit_code
    except KeyboardInterrupt as error:
        outcome = interrupted(error)
        return outcome.exit_code if isinstance(outcome, JobEnded) else 128 + int(signal.SIGINT)
    except JobError as error:
        print(f"{program}: error: rank {os.environ.get('RANK', '?')}: {error}", file=sys.stderr, flush=True)
        return EXIT_LOST_RANK
    finally:
        forget_caught_interrupts()  # the watchdog's interrupt may have landed in an ``exec``


if __name__ == "__main__":
    # run as the imported module, not as ``__main__``: the tasks rank 0 sends (``_Stop`` included) are classes
    # of ``cryosieve.world``, which ``isinstance`` would not match with this file's second copy of them
    from cryosieve import world as _module

    sys.exit(_module._rank_main(sys.argv[1:]))
