"""An exclusive lock on an output location, so that two runs never write the same outputs.

The lock is an advisory ``flock`` on a small file that also names its holder (process id,
host, start time) for the message the second run gives. The kernel drops the lock when
its process dies, however it dies, so the lock of a killed run is taken over by the next
one without any cleaning. The file is removed when the lock is released.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from cryosieve.errors import CryoSieveInputError


class LockedError(CryoSieveInputError):
    """Another live process holds the lock."""


def _holder(path: Path) -> str:
    try:
        record = json.loads(path.read_text())
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record["started"])))
        return f"process {int(record['pid'])} on {record['host']}, started {started}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike[str], what: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` (created) for the duration of the block.

    Raises :class:`LockedError` naming the holder when another process holds it; ``what``
    names the locked location in that message (e.g. ``"--o out/"``).
    """
    path = Path(path)
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise LockedError(f"{what}: another run is using it ({_holder(path)}; lock file {path}); "
                              "wait for it to finish or choose another output") from None
        except BaseException:
            os.close(descriptor)
            raise
        # The holder before us may have removed the file after we opened it: then we hold
        # a lock on a file nobody else will see, so start again on the current file.
        try:
            same = os.path.samestat(os.fstat(descriptor), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(descriptor)
    try:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(record).encode(), 0)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(descriptor)
