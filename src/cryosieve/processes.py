"""Child processes that never outlive their command: each in a process group of its own
(stopping it reaches everything it started, e.g. the ranks under ``mpirun``, and Ctrl-C in a
terminal reaches only the parent, which decides), killed by the kernel if the parent dies
(Linux), and stopped with SIGTERM, then SIGKILL after a grace period."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Any


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
