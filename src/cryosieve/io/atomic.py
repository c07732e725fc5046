"""Atomic output: every file and folder is written under a temporary name beside its target,
then renamed onto it.

One naming scheme for every temporary this package makes, files and folders alike::

    DIR/.NAME.PID-TOKEN.partial[.EXT]

(``NAME`` the target's name, ``PID`` the writing process, ``TOKEN`` random, ``.EXT`` the
target's suffix again, so that writers which choose a format by extension still do). A
process killed with SIGKILL cannot remove its temporaries; :func:`remove_stale_temporaries`
finds them by this pattern and removes those whose process is gone, so the next run of the
same command cleans up after it.

Folders that a write had to create are removed again when the write fails, so a failed
command leaves the output location as it found it.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

#: Marker of every temporary name (see the module docstring).
PARTIAL = ".partial"
_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.partial(?:\.[^.]*)?$")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temporary_name(target: str | os.PathLike[str]) -> Path:
    """A fresh temporary path beside ``target`` in the scheme of this module (nothing is created)."""
    target = Path(target)
    return target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}{PARTIAL}{target.suffix}")


def temporary_target(path: str | os.PathLike[str]) -> tuple[str, int] | None:
    """``(target name, process id)`` of a temporary name of this scheme, else ``None``."""
    match = _TEMPORARY.match(Path(path).name)
    if match is None:
        return None
    return match.group("target"), int(match.group("pid"))


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_stale_temporaries(folder: str | os.PathLike[str], accept: Callable[[str], bool],
                             *, any_owner: bool = False) -> list[Path]:
    """Remove temporaries in ``folder`` left by killed processes; returns what was removed.

    Only names of this module's scheme whose target name satisfies ``accept`` are
    considered, and only those whose process is gone (``any_owner``: whoever made them,
    for a caller that holds the lock of its output location).
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        parsed = temporary_target(entry)
        if parsed is None or not accept(parsed[0]):
            continue
        if not any_owner and (parsed[1] == os.getpid() or process_alive(parsed[1])):
            continue
        _remove(entry)
        removed.append(entry)
    return removed


def remove_stale_temporaries_of(targets: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Remove the stale temporaries (of dead processes) of these output paths."""
    by_folder: dict[Path, set[str]] = {}
    for target in targets:
        target = Path(target)
        by_folder.setdefault(target.parent, set()).add(target.name)
    removed: list[Path] = []
    for folder, names in by_folder.items():
        removed += remove_stale_temporaries(folder, names.__contains__)
    return removed


def make_folders(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders that were created, outermost first."""
    missing = []
    current = folder.absolute()
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    folder.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


def remove_folders(created: Iterable[Path]) -> None:
    """Remove folders made by :func:`make_folders` again, innermost first, where empty."""
    for folder in reversed(list(created)):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _publish(temporary: Path, target: Path) -> None:
    """Give the file the permissions a plain ``open`` would, then rename it onto ``target``."""
    if temporary.is_file():
        os.chmod(temporary, 0o666 & ~_current_umask())
    elif temporary.is_dir():
        os.chmod(temporary, 0o777 & ~_current_umask())
    if temporary.is_dir() and target.is_dir() and not target.is_symlink():
        # A folder cannot be renamed onto a non-empty one: move the old one aside first.
        retired = temporary_name(target)
        os.replace(target, retired)
        os.replace(temporary, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(temporary, target)


class OutputGroup:
    """Several outputs (files or folders) that appear together or not at all.

    :meth:`path_for` gives a temporary path to write instead of each target (for a folder,
    :meth:`folder_for` creates it); :meth:`commit` renames them all. If anything fails
    before the commit, every temporary and every folder created for them is removed.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []
        self._created: list[Path] = []

    def path_for(self, path: str | os.PathLike[str]) -> Path:
        """A temporary path to write instead of ``path`` (its folder is made if missing)."""
        target = Path(path)
        self._created += make_folders(target.parent)
        temporary = temporary_name(target)
        self._pending.append((temporary, target))
        return temporary

    def folder_for(self, path: str | os.PathLike[str]) -> Path:
        """An empty temporary folder to fill instead of the folder ``path``."""
        temporary = self.path_for(path)
        temporary.mkdir()
        return temporary

    def commit(self) -> None:
        """Rename every temporary onto its target.

        Should a rename fail, the targets this commit had already created are removed again
        (targets that existed before keep their new content: the old one is gone).
        """
        published: list[Path] = []
        try:
            for temporary, target in self._pending:
                existed = os.path.lexists(target)
                _publish(temporary, target)
                if not existed:
                    published.append(target)
        except BaseException:
            for target in published:
                _remove(target)
            raise
        self._pending.clear()
        self._created.clear()

    def discard(self) -> None:
        """Remove every temporary written so far and the folders made for them."""
        for temporary, _ in self._pending:
            _remove(temporary)
        self._pending.clear()
        remove_folders(self._created)
        self._created.clear()

    def __enter__(self) -> OutputGroup:
        return self

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException as error:
                self._name_target(error)
                self.discard()
                raise
        else:
            self._name_target(exc)
            self.discard()

    def _name_target(self, error: object) -> None:
        """Make an OSError name the output, not its temporary (nor nothing, as some writers do)."""
        if not isinstance(error, OSError) or not self._pending:
            return
        if error.filename is None:
            error.filename = str(self._pending[-1][1])
            return
        for temporary, target in self._pending:
            if str(error.filename) == str(temporary) or Path(str(error.filename)).is_relative_to(temporary):
                error.filename = str(target)
                return


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    with OutputGroup() as group:
        yield group.path_for(path)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path``.

    On an exception the temporary folder is removed and ``path`` is left as it was.
    """
    with OutputGroup() as group:
        yield group.folder_for(path)


def write_atomic(path: str | os.PathLike[str], writer: Callable[[Path], object]) -> None:
    """Call ``writer(temporary_path)`` and rename the result onto ``path``."""
    with atomic_path(path) as temporary:
        writer(temporary)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    write_atomic(path, lambda temporary: temporary.write_text(text))
