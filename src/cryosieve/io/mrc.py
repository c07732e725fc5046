"""MRC volumes: reading with checks, atomic writing with the voxel size set."""

from __future__ import annotations

import os
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


def read_volume(path: str | os.PathLike[str], *, cubic: bool = True) -> Volume:
    """Read an MRC map; a missing, unreadable, non-cubic or non-finite map is an input error."""
    path = str(path)
    if not os.path.isfile(path):
        raise CryoSieveInputError(f"{path}: file not found")
    try:
        with mrcfile.open(path, permissive=True, mode="r") as handle:
            if handle.data is None:
                raise CryoSieveInputError(f"{path}: not a readable MRC file")
            data = np.asarray(handle.data, dtype=np.float32).copy()
            voxel = float(handle.voxel_size.x)
    except CryoSieveInputError:
        raise
    except Exception as error:  # mrcfile raises several types for corrupt files
        raise CryoSieveInputError(f"{path}: not a readable MRC file ({error})") from None
    if data.ndim != 3 or (cubic and len(set(data.shape)) != 1):
        raise CryoSieveInputError(f"{path}: expected a cubic 3D map, got shape {data.shape}")
    if not np.all(np.isfinite(data)):
        raise CryoSieveInputError(f"{path}: map contains NaN or infinite values")
    return Volume(data=data, voxel_size=voxel if voxel > 0 else None, path=path)


def write_volume(path: str | os.PathLike[str], data: np.ndarray, voxel_size: float) -> None:
    """Write a float32 MRC map atomically with the voxel size (Å) in the header."""
    with atomic_path(path) as temporary:
        write_volume_to(temporary, data, voxel_size)


def write_volume_to(path: str | os.PathLike[str], data: np.ndarray, voxel_size: float) -> None:
    """Write a float32 MRC map to ``path`` directly (callers handle atomicity)."""
    with mrcfile.new(str(path), overwrite=True) as handle:
        handle.set_data(np.ascontiguousarray(data, dtype=np.float32))
        handle.voxel_size = float(voxel_size)
        handle.update_header_stats()
        # A fixed label instead of mrcfile's time stamp: the same map gives the same bytes.
        handle.header.label[:] = b""
        handle.header.label[0] = b"cryosieve"
        handle.header.nlabl = 1


def resolve_path(name: str, directory: str | os.PathLike[str] | None) -> Path:
    """Resolve a file name from a STAR file against ``directory`` (default: current)."""
    path = Path(name)
    if path.is_absolute() or not directory:
        return path
    return Path(directory) / path
