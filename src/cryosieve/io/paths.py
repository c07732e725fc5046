"""Output safety: no output ever lands on an input, and every output location is writable.

Every command lists, before it reads or computes anything expensive, each file it will
write (derived names included) and each file it reads (STAR file, every referenced stack,
maps, mask, models), and calls :func:`check_outputs`. A clash is found by resolved path
(symbolic links followed) and by identity (same device and inode, so hard links count);
an input inside an output folder that will be replaced counts too.
"""

from __future__ import annotations

import filecmp
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryosieve.errors import CryoSieveInputError


@dataclass(frozen=True)
class InputFile:
    """A file a command reads: its path and what it is (for messages, e.g. ``"particle stack"``)."""

    path: Path
    role: str


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def _resolved(path: Path) -> Path:
    try:
        return Path(os.path.realpath(path))
    except (OSError, ValueError):
        return Path(os.path.abspath(path))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_no_clash(outputs: Iterable[str | os.PathLike[str]], inputs: Iterable[InputFile],
                   folders: Iterable[str | os.PathLike[str]] = ()) -> None:
    """Refuse outputs that would overwrite an input.

    Parameters
    ----------
    outputs:
        Files the command writes (renamed onto these names).
    inputs:
        Files it reads.
    folders:
        Output folders it replaces as a whole: no input may lie inside one.

    Raises :class:`CryoSieveInputError` naming the output and the input.
    """
    by_path: dict[Path, InputFile] = {}
    by_identity: dict[tuple[int, int], InputFile] = {}
    for item in inputs:
        by_path.setdefault(_resolved(item.path), item)
        identity = _identity(item.path)
        if identity is not None:
            by_identity.setdefault(identity, item)
    for output in outputs:
        output = Path(output)
        clash = by_path.get(_resolved(output))
        if clash is None:
            identity = _identity(output)
            clash = by_identity.get(identity) if identity is not None else None
        if clash is not None:
            raise CryoSieveInputError(
                f"{output}: this output would overwrite the input {clash.path} ({clash.role}); "
                "choose another output name")
    for folder in folders:
        folder = Path(folder)
        resolved_folder = _resolved(folder)
        for resolved, item in by_path.items():
            if _inside(resolved, resolved_folder):
                raise CryoSieveInputError(
                    f"{folder}: this output folder would replace the input {item.path} ({item.role}) inside it; "
                    "choose another output name")


def check_writable(folder: str | os.PathLike[str], output: str | os.PathLike[str] | None = None) -> None:
    """Check that files can be created in ``folder`` (made if missing) without making anything.

    The nearest existing folder on the way must be a folder in which a file can be created
    (tried with a hidden file, removed at once). Raises :class:`CryoSieveInputError` naming
    ``output`` (or the folder) and the reason.
    """
    name = Path(output) if output is not None else Path(folder)
    current = Path(os.path.abspath(folder))
    while not os.path.lexists(current) and current != current.parent:
        current = current.parent
    if not current.is_dir():
        raise CryoSieveInputError(f"{name}: cannot be written, {current} is not a folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=".cryosieve-write-test.", dir=current)
    except OSError as error:
        reason = error.strerror or str(error)
        raise CryoSieveInputError(f"{name}: cannot be written in {current} ({reason})") from None
    os.close(handle)
    os.unlink(probe)


def check_outputs(outputs: Sequence[str | os.PathLike[str]], inputs: Iterable[InputFile],
                  folders: Sequence[str | os.PathLike[str]] = ()) -> None:
    """:func:`check_no_clash`, then: no output file is taken by a folder (nor an output
    folder by a file), and every output location is writable."""
    check_no_clash(outputs, inputs, folders)
    for output in outputs:
        path = Path(output)
        if path.is_dir():
            raise CryoSieveInputError(f"{path}: this output name is taken by a folder")
        if str(output).endswith(os.sep):
            raise CryoSieveInputError(f"{path}: an output file name cannot end in {os.sep}")
    for folder in folders:
        path = Path(folder)
        if os.path.lexists(path) and not path.is_dir():
            raise CryoSieveInputError(f"{path}: this output folder name is taken by a file")
    checked: set[Path] = set()
    for output in [*outputs, *folders]:
        parent = Path(os.path.abspath(output)).parent
        if parent not in checked:
            checked.add(parent)
            check_writable(parent, output)


def same_file_or_content(first: str | os.PathLike[str], second: str | os.PathLike[str]) -> str | None:
    """``"file"`` when the two paths name one file (resolved path, or device and inode: links count),
    ``"content"`` when two files hold identical bytes, else ``None``."""
    first, second = Path(first), Path(second)
    if _resolved(first) == _resolved(second):
        return "file"
    identity = _identity(first)
    if identity is not None and identity == _identity(second):
        return "file"
    try:
        if os.path.getsize(first) == os.path.getsize(second) and filecmp.cmp(first, second, shallow=False):
            return "content"
    except OSError:  # a missing file is reported by its reader
        return None
    return None


def check_distinct_inputs(inputs: Sequence[InputFile]) -> None:
    """Refuse inputs that must be different maps (two half maps, a half map and a mask) but are one file
    or identical bytes: an input error naming both and their roles."""
    for index, later in enumerate(inputs):
        for earlier in inputs[:index]:
            same = same_file_or_content(earlier.path, later.path)
            if same is not None:
                how = "is the same file as" if same == "file" else "holds the same bytes as"
                raise CryoSieveInputError(
                    f"{later.path} ({later.role}) {how} {earlier.path} ({earlier.role}); they must be different maps")


#: A file system with less free space than this (bytes) counts as full (:func:`disk_full`).
FULL_DISK_BYTES = 1 << 20


def disk_full(path: str | os.PathLike[str]) -> bool:
    """Whether the file system holding ``path`` (or its nearest existing folder) has less than
    :data:`FULL_DISK_BYTES` left for this process: asked after a program failed whose output
    there could not say why (its log is on the same full disk)."""
    current = Path(os.path.abspath(path))
    while not current.exists() and current != current.parent:
        current = current.parent
    try:
        status = os.statvfs(current)
    except (OSError, AttributeError):  # pragma: no cover - no statvfs
        return False
    blocks = status.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else status.f_bavail
    return blocks * status.f_frsize < FULL_DISK_BYTES


def no_space_error(path: str | os.PathLike[str], detail: str = "") -> OSError:
    """The ``OSError`` (``ENOSPC``) of a full disk at ``path``, ``detail`` added to its message."""
    import errno

    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + (f" ({detail})" if detail else ""), str(path))
