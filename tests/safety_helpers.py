"""Helpers of the safety tests: a small data set, file trees with their hashes, damaged files."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cryosieve.simulate import SimulationSettings, simulate_particles

BOX = 64
PIXEL = 2.5


@dataclass(frozen=True)
class SmallData:
    """A simulated 240-particle data set at box 64 (2.5 Å/px) with half maps and a mask."""

    folder: Path

    @property
    def star(self) -> Path:
        return self.folder / "particles.star"

    @property
    def stack(self) -> Path:
        return self.folder / "particles.mrcs"

    @property
    def half1(self) -> Path:
        return self.folder / "half1.mrc"

    @property
    def half2(self) -> Path:
        return self.folder / "half2.mrc"

    @property
    def mask(self) -> Path:
        return self.folder / "mask.mrc"


def make_small_data(folder: Path, count: int = 240, seed: int = 3) -> SmallData:
    settings = SimulationSettings(num_particles=count, box=BOX, pixel_size=PIXEL, junk_fraction=0.1, snr=0.1,
                                  seed=seed, half_maps=True)
    simulate_particles(folder, settings)
    return SmallData(folder)


def copy_data(data: SmallData, folder: Path) -> SmallData:
    shutil.copytree(data.folder, folder)
    return SmallData(folder)


def tree(root: Path) -> dict[str, str]:
    """Every entry below ``root``: relative path -> sha256 of a file, ``"dir"`` or ``"link"``."""
    entries: dict[str, str] = {}
    if not root.exists():
        return entries
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            entries[key] = "link"
        elif path.is_dir():
            entries[key] = "dir"
        else:
            entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


def patch_int32(path: Path, offset: int, value: int) -> None:
    """Overwrite one little-endian int32 of an MRC header (nx 0, ny 4, nz 8, mode 12)."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(struct.pack("<i", value))


def truncate(path: Path, keep: float = 0.5) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(int(1024 + (size - 1024) * keep))


@contextlib.contextmanager
def read_only_folder(folder: Path) -> Iterator[None]:
    """Make ``folder`` read-only: a read-only bind mount where this process may mount (root),
    else its permissions (which do not stop root)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode == 0
        if mounted and subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)],
                                      capture_output=True).returncode == 0:
            try:
                yield
            finally:
                subprocess.run(["umount", str(folder)], check=True)
            return
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)
        pytest.skip("cannot make a read-only folder: running as root without permission to mount")
    folder.chmod(0o555)
    try:
        yield
    finally:
        folder.chmod(0o755)


@contextlib.contextmanager
def small_filesystem(folder: Path, size: str = "48k") -> Iterator[None]:
    """A tmpfs of ``size`` mounted on ``folder`` (a full disk for the writes that go there)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small file system here (needs root and permission to mount)")
    try:
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)
