"""Child processes that never outlive their command: each in a process group of its own
(stopping it reaches everything it started, e.g. the ranks under ``mpirun``, and Ctrl-C in a
terminal reaches only the parent, which decides), killed by the kernel if the parent dies
(Linux), and stopped with SIGTERM, then SIGKILL after a grace period."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import Any

#: The signals that stop a command: Ctrl-C and a polite kill (workload managers send SIGTERM).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: have the kernel send SIGKILL to this process when its parent dies."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def start(command: Sequence[str], **options: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(command, **options)`` in a new process group that dies with this process."""
    if os.name == "posix":
        options.setdefault("start_new_session", True)
        options.setdefault("preexec_fn", _die_with_parent)
    return subprocess.Popen(list(command), **options)


def _signal_group(process: subprocess.Popen[bytes], number: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.name == "posix":
            os.killpg(process.pid, number)
        else:  # pragma: no cover
            process.send_signal(number)


def stop(processes: Sequence[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM to the process group of every process still running, SIGKILL to what is left
    after ``grace`` seconds; returns when all have ended."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(max(0.0, deadline - time.monotonic()))
    for process in running:
        if process.poll() is None:
            _signal_group(process, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def handling_stop_signals(handler: Callable[[int, FrameType | None], Any]) -> Iterator[None]:
    """Call ``handler(number, frame)`` for :data:`STOP_SIGNALS` while the block runs, then restore the
    previous handlers. Python handles signals in the main thread only: elsewhere nothing changes."""
    if os.name != "posix" or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, handler) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def forget_caught_interrupts() -> None:
    """Make the process end with its exit code after a KeyboardInterrupt it caught (call on the way out).

    CPython (3.11 to 3.13 at least) marks a KeyboardInterrupt raised inside ``exec`` of a string as
    unhandled even when it is caught; ``dataclasses`` and ``namedtuple`` build their methods so, e.g. while
    torch is imported. A ``python -m`` run (local ranks, and ``torchrun -m``) then ends by SIGINT instead of
    with its exit code. Each ``exec`` of a string clears that mark first, so one that finishes clears it.
    """
    exec("pass")  # a constant string: see the docstring


@contextlib.contextmanager
def stop_signals_deferred() -> Iterator[None]:
    """Hold :data:`STOP_SIGNALS` back while the block runs (e.g. while a child process is being
    started: one half made would escape the clean-up), then deliver the first one received."""
    received: list[int] = []
    with handling_stop_signals(lambda number, _frame: received.append(number)):
        yield
    if received:
        signal.raise_signal(received[0])
