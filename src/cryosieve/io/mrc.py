"""MRC volumes: reading with checks, atomic writing with the voxel size set."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np

from cryosieve.errors import CryoSieveInputError
from cryosieve.io.atomic import atomic_path


@dataclass(frozen=True)
class Volume:
    """A cubic map.

    Attributes
    ----------
    data:
        ``(n, n, n)`` float32 array indexed ``[z, y, x]``.
    voxel_size:
        Å per voxel from the header, or ``None`` when the header holds no size.
    path:
        Where it was read from (for messages).
    """

    data: np.ndarray
    voxel_size: float | None
    path: str


#: MRC modes read as real pixels: int8, int16, float32, uint16, float16.
REAL_MODES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}
_COMPLEX_MODES = {3: "complex int16", 4: "complex float32"}
HEADER_BYTES = 1024


@contextlib.contextmanager
def quiet_mrcfile() -> Iterator[None]:
    """Silence ``mrcfile``'s warnings: every problem they would hint at is checked here and
    reported as one error instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def check_mrc_file(path: str | os.PathLike[str], what: str = "MRC file") -> tuple[int, int, int]:
    """Check an MRC file's header against its size before its data are used.

    Returns ``(nx, ny, nz)``. A mode other than real pixels (:data:`REAL_MODES`), a header
    without a size, a file shorter than its header says (truncated) or longer (a mode that
    does not match the data, e.g. float32 data under an int16 header) is an input error
    giving the expected and the actual byte size.
    """
    path = str(path)
    try:
        with quiet_mrcfile(), mrcfile.open(path, mode="r", permissive=True, header_only=True) as handle:
            header = handle.header
            mode, size = int(header.mode), (int(header.nx), int(header.ny), int(header.nz))
            extended = int(header.nsymbt)
    except Exception as error:  # mrcfile raises several types for corrupt files
        raise CryoSieveInputError(f"{path}: not a readable {what} ({error})") from None
    if mode in _COMPLEX_MODES:
        raise CryoSieveInputError(
            f"{path}: complex-valued data (MRC mode {mode}, {_COMPLEX_MODES[mode]}) cannot be used as a {what}")
    if mode not in REAL_MODES:
        raise CryoSieveInputError(f"{path}: MRC mode {mode} is not supported (real modes: "
                                  + ", ".join(f"{key} {name}" for key, name in REAL_MODES.items()) + ")")
    if min(size) <= 0 or extended < 0:
        raise CryoSieveInputError(f"{path}: header gives no data size (nx, ny, nz = {size}, nsymbt = {extended})")
    itemsize = np.dtype(REAL_MODES[mode]).itemsize
    expected = HEADER_BYTES + extended + size[0] * size[1] * size[2] * itemsize
    actual = os.path.getsize(path)
    layout = f"{size[0]} x {size[1]} x {size[2]} {REAL_MODES[mode]} (mode {mode})"
    if actual < expected:
        raise CryoSieveInputError(
            f"{path}: truncated: expected {expected} bytes for {layout}, found {actual}")
    if actual > expected:
        raise CryoSieveInputError(
            f"{path}: size does not match its header: expected {expected} bytes for {layout}, found {actual} "
            "(wrong mode or dimensions in the header?)")
    return size


def read_volume(path: str | os.PathLike[str], *, cubic: bool = True, what: str = "map") -> Volume:
    """Read an MRC map; a missing, unreadable, non-cubic or non-finite map is an input error."""
    path = str(path)
    if not os.path.isfile(path):
        raise CryoSieveInputError(f"{path}: file not found")
    check_mrc_file(path, what)
    try:
        with quiet_mrcfile(), mrcfile.open(path, permissive=True, mode="r") as handle:
            if handle.data is None:
                raise CryoSieveInputError(f"{path}: not a readable MRC file")
            data = np.asarray(handle.data, dtype=np.float32).copy()
            voxel = float(handle.voxel_size.x)
    except CryoSieveInputError:
        raise
    except Exception as error:  # mrcfile raises several types for corrupt files
        raise CryoSieveInputError(f"{path}: not a readable MRC file ({error})") from None
    if data.ndim != 3 or (cubic and len(set(data.shape)) != 1):
        raise CryoSieveInputError(f"{path}: expected a cubic 3D {what}, got shape {data.shape}")
    if not np.all(np.isfinite(data)):
        raise CryoSieveInputError(f"{path}: {what} contains NaN or infinite values")
    return Volume(data=data, voxel_size=voxel if voxel > 0 else None, path=path)


#: Header label of every MRC file this package writes unless a caller names another.
MRC_LABEL = "cryosieve"


def set_fixed_label(header: np.recarray, label: str = MRC_LABEL) -> None:
    """Give an MRC header one fixed label, ``label``, instead of ``mrcfile``'s time stamp.

    The same data then always give the same bytes. ``label``: at most 80 ASCII characters
    (the size of one MRC label), else :class:`CryoSieveInputError`.
    """
    if not label.isascii() or len(label) > 80:
        raise CryoSieveInputError(f"MRC header label {label!r}: must be at most 80 ASCII characters")
    header.label[:] = b""
    header.label[0] = label.encode("ascii")
    header.nlabl = 1


def write_volume(path: str | os.PathLike[str], data: np.ndarray, voxel_size: float, *,
                 label: str = MRC_LABEL) -> None:
    """Write a float32 MRC map atomically with the voxel size (Å) in the header
    (see :func:`write_volume_to`)."""
    with atomic_path(path) as temporary:
        write_volume_to(temporary, data, voxel_size, label=label)


def write_volume_to(path: str | os.PathLike[str], data: np.ndarray, voxel_size: float, *,
                    label: str = MRC_LABEL) -> None:
    """Write a float32 MRC map to ``path`` directly (callers handle atomicity).

    ``data``: ``(nz, ny, nx)`` array indexed ``[z, y, x]``, written as float32;
    ``voxel_size``: Å per voxel; the header carries the data's statistics and the one
    fixed ``label`` (:func:`set_fixed_label`), so the same map gives the same bytes.
    """
    with mrcfile.new(str(path), overwrite=True) as handle:
        handle.set_data(np.ascontiguousarray(data, dtype=np.float32))
        handle.voxel_size = float(voxel_size)
        handle.update_header_stats()
        set_fixed_label(handle.header, label)


def resolve_path(name: str, directory: str | os.PathLike[str] | None) -> Path:
    """Resolve a file name from a STAR file against ``directory`` (default: current)."""
    path = Path(name)
    if path.is_absolute() or not directory:
        return path
    return Path(directory) / path
