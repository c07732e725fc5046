"""Atomic output: write to a temporary file in the same folder, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(temporary: Path, target: Path) -> None:
    """Give the file the permissions a plain ``open`` would, then rename it onto ``target``."""
    if temporary.exists():
        os.chmod(temporary, 0o666 & ~_current_umask())
    os.replace(temporary, target)


def _temporary_beside(target: Path) -> Path:
    """Create an empty hidden temporary file in ``target``'s folder (made if missing)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".tmp" + target.suffix, dir=target.parent
    )
    os.close(handle)
    return Path(temporary_name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    target = Path(path)
    temporary = _temporary_beside(target)
    try:
        yield temporary
        _publish(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty folder beside ``path`` (``.NAME.PID.partial``); on success it replaces ``path``.

    On an exception the partial folder is removed and ``path`` is left as it was.
    """
    target = Path(path)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        yield partial
        if target.exists():
            shutil.rmtree(target)
        os.replace(partial, target)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)


def write_atomic(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    """Call ``writer(temporary_path)`` and rename the result onto ``path``."""
    with atomic_path(path) as temporary:
        writer(temporary)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    write_atomic(path, lambda temporary: temporary.write_text(text))


class OutputGroup:
    """Several outputs that appear together or not at all.

    Files are first written to temporary paths; :meth:`commit` renames them all.
    If anything fails before the commit, every temporary file is removed.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []

    def path_for(self, path: str | os.PathLike[str]) -> Path:
        """Return a temporary path to write instead of ``path``."""
        target = Path(path)
        temporary = _temporary_beside(target)
        self._pending.append((temporary, target))
        return temporary

    def commit(self) -> None:
        """Rename every temporary file onto its target."""
        for temporary, target in self._pending:
            _publish(temporary, target)
        self._pending.clear()

    def discard(self) -> None:
        """Remove every temporary file written so far."""
        for temporary, _ in self._pending:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
        self._pending.clear()

    def __enter__(self) -> "OutputGroup":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:  # type: ignore[no-untyped-def]
        if exc_type is None:
            self.commit()
        else:
            self.discard()
