"""A set of particles in memory, independent of the file format it came from.

The per-particle values every stage uses are arrays of shape ``(n,)`` in fixed units (their
RELION names in :data:`RELION_NAMES`): poses in degrees (RELION's ZYZ Euler angles), origins
in pixels (the image is the projection shifted by minus the origin, as RELION), CTF values as
RELION gives them, pixel sizes in Å. What a format must write back untouched (every other
column, other blocks, the original text of values) stays in :attr:`ParticleSet.source`, a
:class:`SourceRecord` that only its codec reads: the STAR codec in :mod:`cryosieve.io.star`
today. A subset keeps its rows of the source, so writing it changes nothing but the rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

import numpy as np

#: The RELION 3.1 column behind each per-particle value (units of the value, not the column, where they
#: differ: origins are pixels here, Å in ``rlnOriginXAngst``).
RELION_NAMES = {
    "image_name": "rlnImageName", "rot": "rlnAngleRot", "tilt": "rlnAngleTilt", "psi": "rlnAnglePsi",
    "origin_x": "rlnOriginXAngst", "origin_y": "rlnOriginYAngst", "defocus_u": "rlnDefocusU",
    "defocus_v": "rlnDefocusV", "defocus_angle": "rlnDefocusAngle", "phase_shift": "rlnPhaseShift",
    "voltage": "rlnVoltage", "spherical_aberration": "rlnSphericalAberration",
    "amplitude_contrast": "rlnAmplitudeContrast", "pixel_size": "rlnImagePixelSize", "ctf_bfactor": "rlnCtfBfactor",
    "ctf_scalefactor": "rlnCtfScalefactor", "optics_group": "rlnOpticsGroup", "random_subset": "rlnRandomSubset",
    "image_size": "rlnImageSize",
}


class SourceRecord(Protocol):
    """What a codec keeps of the file a set was read from, to write a subset back untouched."""

    @property
    def format(self) -> str:
        """The format's name (``"star"``...)."""

    def subset(self, rows: np.ndarray) -> SourceRecord:
        """The record of these rows (integer indices, in this order)."""

    def write_to(self, path: str | os.PathLike[str]) -> None:
        """Write the rows in this format to ``path`` directly (callers handle atomicity)."""

    def with_random_subset(self, halves: np.ndarray) -> SourceRecord:
        """The record with new half-sets ``(n,)`` int64 (1, 2) written back."""

    def with_poses(self, rot: np.ndarray, tilt: np.ndarray, psi: np.ndarray, origin_x: np.ndarray,
                   origin_y: np.ndarray, pixel_size: np.ndarray) -> SourceRecord:
        """The record with new poses written back: Euler angles ``(n,)`` degrees, origins ``(n,)`` pixels
        (in the format's own units, with ``pixel_size`` ``(n,)`` Å), every other column as read."""


@dataclass
class ParticleSet:
    """Particles with their images, poses, origins and CTFs.

    All arrays have shape ``(n,)`` and dtype float64 unless stated.
    """

    path: str  # the file the set was read from (for messages)
    source: SourceRecord
    image_name: np.ndarray  # object: the image names as written (``N@stack.mrcs``)
    image_file: np.ndarray  # object: stack file names
    image_index: np.ndarray  # int64, 0-based index in the stack
    rot: np.ndarray  # degrees
    tilt: np.ndarray  # degrees
    psi: np.ndarray  # degrees
    origin_x: np.ndarray  # pixels
    origin_y: np.ndarray  # pixels
    defocus_u: np.ndarray  # Å
    defocus_v: np.ndarray  # Å
    defocus_angle: np.ndarray  # degrees
    phase_shift: np.ndarray  # degrees
    voltage: np.ndarray  # kV
    spherical_aberration: np.ndarray  # mm
    amplitude_contrast: np.ndarray  # fraction
    pixel_size: np.ndarray  # Å
    ctf_bfactor: np.ndarray  # Å^2 (0 when absent)
    ctf_scalefactor: np.ndarray  # (1 when absent)
    optics_group: np.ndarray  # int64 group number (1 without optics groups)
    random_subset: np.ndarray | None  # int64 half-set numbers, or None
    image_size: np.ndarray | None = field(default=None)  # int64 box sizes the file states, or None
    angpix: float | None = None  # the pixel size the user gave (``--angpix``, Å), or None

    def __len__(self) -> int:
        return len(self.image_index)

    @property
    def format(self) -> str:
        """The format the set was read from (``"star"``...)."""
        return self.source.format

    def subset(self, rows: np.ndarray) -> ParticleSet:
        """The particles of ``rows`` (boolean mask or integer indices), in that order."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        values: dict[str, Any] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, np.ndarray) and value.shape[:1] == (len(self),):
                value = value[rows]
            values[item.name] = value
        values["source"] = self.source.subset(rows)
        return ParticleSet(**values)

    def with_halves(self, halves: np.ndarray) -> ParticleSet:
        """The same particles in new half-sets ``halves`` ``(n,)`` int64 (1, 2), written back too."""
        halves = np.asarray(halves, dtype=np.int64)
        return replace(self, random_subset=halves, source=self.source.with_random_subset(halves))

    def with_poses(self, rot: np.ndarray, tilt: np.ndarray, psi: np.ndarray, origin_x: np.ndarray,
                   origin_y: np.ndarray) -> ParticleSet:
        """The same particles with new poses (``(n,)`` degrees) and origins (``(n,)`` pixels), written back too
        (every other column of the source as read)."""
        values = {name: np.array(value, dtype=np.float64) for name, value in
                  (("rot", rot), ("tilt", tilt), ("psi", psi), ("origin_x", origin_x), ("origin_y", origin_y))}
        for name, value in values.items():
            if value.shape != (len(self),):
                raise ValueError(f"{name}: expected shape ({len(self)},), got {value.shape}")
        source = self.source.with_poses(values["rot"], values["tilt"], values["psi"], values["origin_x"],
                                        values["origin_y"], self.pixel_size)
        return replace(self, rot=values["rot"], tilt=values["tilt"], psi=values["psi"], origin_x=values["origin_x"],
                       origin_y=values["origin_y"], source=source)

    def with_values(self, **values: Any) -> ParticleSet:
        """The same particles with some values replaced (the source is not changed)."""
        return replace(self, **values)

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write the set atomically in its own format, every column as read."""
        from cryosieve.io.atomic import atomic_path

        with atomic_path(path) as temporary:
            self.write_to(temporary)

    def write_to(self, path: str | os.PathLike[str]) -> None:
        """Write the set to ``path`` directly in its own format (callers handle atomicity)."""
        self.source.write_to(path)
