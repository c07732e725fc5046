"""The STAR codec: RELION particle STAR files (3.0 single table, 3.1+ optics + particles).

:func:`read_particles` gives a :class:`~cryosieve.particles.ParticleSet` whose values are in
the set's fixed units, and whose :class:`StarSource` keeps every original block and column so
that a subset is written back unchanged (:func:`star_text`: shortest exact float text, no
time stamp).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import starfile

from cryosieve.errors import CryoSieveInputError, setting
from cryosieve.io.text import EscapeClash, decode_text, encode_text, is_utf8, os_text
from cryosieve.particles import ParticleSet
from cryosieve.tolerances import ORIGIN_TOLERANCE_PIXELS, pixel_sizes_agree

#: First line of every STAR file this package writes (no time stamp: same table, same bytes).
STAR_HEADER = "# written by cryosieve"

POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
CTF_PARTICLE_COLUMNS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")
OPTICS_COLUMNS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
#: The largest image number an MRC stack can hold (its header counts images in a signed 32-bit integer).
MAX_IMAGE_NUMBER = 2**31 - 1


@dataclass(frozen=True)
class StarSource:
    """The STAR file a :class:`~cryosieve.particles.ParticleSet` was read from: every block and
    column as read, so that a subset is written back with only its rows changed.

    ``version``: ``"3.0"`` (one table) or ``"3.1"`` (``data_optics`` + ``data_particles``);
    ``escaped``: the file was not UTF-8, and its other bytes are held as :mod:`cryosieve.io.text`
    says (written back as the same bytes).
    """

    version: str
    blocks: dict[str, pd.DataFrame]
    particles_block: str
    format: str = "star"
    escaped: bool = False

    @property
    def particles(self) -> pd.DataFrame:
        """The particle table as read (all columns)."""
        return self.blocks[self.particles_block]

    def subset(self, rows: np.ndarray) -> StarSource:
        blocks = dict(self.blocks)
        blocks[self.particles_block] = self.particles.iloc[rows].reset_index(drop=True)
        return replace(self, blocks=blocks)

    def write_to(self, path: str | os.PathLike[str]) -> None:
        write_star_to(path, self.blocks, escaped=self.escaped)

    def with_random_subset(self, halves: np.ndarray) -> StarSource:
        blocks = dict(self.blocks)
        blocks[self.particles_block] = self.particles.assign(rlnRandomSubset=np.asarray(halves, dtype=np.int64))
        return replace(self, blocks=blocks)

    def with_poses(self, rot: np.ndarray, tilt: np.ndarray, psi: np.ndarray, origin_x: np.ndarray,
                   origin_y: np.ndarray, pixel_size: np.ndarray) -> StarSource:
        """Poses replaced, every other column kept: ``rlnAngleRot``, ``rlnAngleTilt``, ``rlnAnglePsi``
        (degrees) and the origins, in Å (``rlnOriginXAngst``, ``rlnOriginYAngst``) in RELION 3.1+ files,
        in pixels (``rlnOriginX``, ``rlnOriginY``) in RELION 3.0 files and wherever a 3.1+ file also
        holds those."""
        columns: dict[str, np.ndarray] = {"rlnAngleRot": np.asarray(rot, dtype=np.float64),
                                          "rlnAngleTilt": np.asarray(tilt, dtype=np.float64),
                                          "rlnAnglePsi": np.asarray(psi, dtype=np.float64)}
        frame = self.particles
        for axis, origin in (("X", origin_x), ("Y", origin_y)):
            pixels = np.asarray(origin, dtype=np.float64)
            if self.version == "3.0" or f"rlnOrigin{axis}" in frame.columns:
                columns[f"rlnOrigin{axis}"] = pixels
            if self.version != "3.0":
                columns[f"rlnOrigin{axis}Angst"] = pixels * np.asarray(pixel_size, dtype=np.float64)
        blocks = dict(self.blocks)
        blocks[self.particles_block] = frame.assign(**columns)
        return replace(self, blocks=blocks)


def write_star_to(path: str | os.PathLike[str], blocks: dict[str, pd.DataFrame], *, escaped: bool = False) -> None:
    """Write :func:`star_text` of these blocks to ``path`` directly (callers handle atomicity), as UTF-8;
    ``escaped``: values hold bytes that are not UTF-8 as :func:`cryosieve.io.text.decode_text` read them,
    written back as those bytes."""
    text = star_text(blocks)
    Path(path).write_bytes(encode_text(text) if escaped else text.encode("utf-8"))


def star_text(blocks: dict[str, pd.DataFrame]) -> str:
    """STAR text of these blocks, float columns in the shortest exact form.

    Written with ``starfile``'s block writer under a fixed first line instead of its
    time-stamped one, so that the same table always gives the same bytes.
    """
    from starfile.writer import StarWriter

    writer = StarWriter({name: _exact_text(frame) for name, frame in blocks.items()})
    lines = [STAR_HEADER, "", "", *writer.data_block_generator()]
    return "".join(line + "\n" for line in lines)


def _exact_text(frame: pd.DataFrame) -> pd.DataFrame:
    """Format float columns with the shortest text that parses back to the same value."""
    frame = frame.copy()
    for column in frame.columns:
        if pd.api.types.is_float_dtype(frame[column]):
            frame[column] = [repr(float(value)) for value in frame[column]]
    return frame


def _column(path: str, block: str, frame: pd.DataFrame, name: str) -> np.ndarray:
    if name not in frame.columns:
        raise CryoSieveInputError(f"{path}: column {name} missing in data_{block}")
    values = pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(values)):
        row = int(np.flatnonzero(~np.isfinite(values))[0])
        raise CryoSieveInputError(
            f"{path}: column {name} in data_{block} holds {frame[name].iloc[row]!s} at row {row + 1}: "
            "not a finite number"
        )
    result: np.ndarray = values
    return result


def _optional(frame: pd.DataFrame, name: str, default: float, path: str, block: str) -> np.ndarray:
    if name in frame.columns:
        return _column(path, block, frame, name)
    return np.full(len(frame), default, dtype=np.float64)


def parse_image_names(path: str, names: pd.Series, escaped: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Split ``N@stack.mrcs`` names into (file, 0-based index); a bare name is image 0.

    ``escaped``: the names hold bytes that are not UTF-8 as :mod:`cryosieve.io.text` reads them; the
    file names returned open the files of those bytes (:func:`cryosieve.io.text.os_text`).
    """
    files = np.empty(len(names), dtype=object)
    indices = np.zeros(len(names), dtype=np.int64)
    for row, name in enumerate(names.astype(str)):
        if "@" in name:
            number, _, file = name.partition("@")
            try:
                index = int(number)
            except ValueError:
                raise CryoSieveInputError(
                    f"{path}: rlnImageName {name!r} at row {row + 1} is not of the form N@stack"
                ) from None
            if index < 1:
                raise CryoSieveInputError(
                    f"{path}: rlnImageName {name!r} at row {row + 1} has image number below 1"
                )
            if index > MAX_IMAGE_NUMBER:
                raise CryoSieveInputError(
                    f"{path}: rlnImageName {name!r} at row {row + 1} has an image number beyond any MRC stack "
                    f"(at most {MAX_IMAGE_NUMBER})"
                )
            files[row], indices[row] = file, index - 1
        else:
            files[row], indices[row] = name, 0
    if escaped:
        files = np.array([os_text(file) for file in files], dtype=object)
    return files, indices


def read_particles(path: str | os.PathLike[str], angpix: float | None = None) -> ParticleSet:
    """Read a RELION 3.0 or 3.1+ particle STAR file.

    Parameters
    ----------
    path:
        The STAR file.
    angpix:
        Pixel size in Å. Required for RELION 3.0 files (which carry none); for 3.1+ files,
        whose optics table carries ``rlnImagePixelSize``, a given value must agree with it
        (within :data:`cryosieve.tolerances.PIXEL_SIZE`) in every optics group used.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise CryoSieveInputError(f"{path}: file not found")
    blocks, escaped = _read_blocks(path)
    blocks = {
        name: (frame if isinstance(frame, pd.DataFrame) else pd.DataFrame([frame]))
        for name, frame in blocks.items()
    }
    for name, frame in blocks.items():
        repeated = frame.columns[frame.columns.duplicated()]
        if len(repeated):
            raise CryoSieveInputError(f"{path}: column {repeated[0]} appears twice in data_{name}")
    if angpix is not None and not (math.isfinite(angpix) and angpix > 0):
        raise CryoSieveInputError(f"{setting('angpix')} {angpix}: must be a positive number of Å")
    if "optics" in blocks and "particles" in blocks:
        table = _read_31(path, blocks, escaped)
        table.angpix = angpix
        if angpix is not None:
            pixel = np.unique(table.pixel_size)
            worst = float(pixel[np.argmax(np.abs(pixel - angpix))])
            if not pixel_sizes_agree(worst, angpix):
                raise CryoSieveInputError(
                    f"{setting('angpix')} {angpix}: differs from rlnImagePixelSize {worst:g} Å in {path} "
                    f"(leave {setting('angpix')} out for RELION 3.1+ files; rescaling is not supported)")
        return table
    particle_blocks = [name for name, frame in blocks.items() if "rlnImageName" in frame.columns]
    if len(particle_blocks) != 1:
        raise CryoSieveInputError(
            f"{path}: expected data_optics + data_particles (RELION 3.1+) or one particle "
            "table with rlnImageName (RELION 3.0)"
        )
    table = _read_30(path, blocks, particle_blocks[0], angpix, escaped)
    table.angpix = angpix
    return table


def _read_blocks(path: str) -> tuple[dict[str, Any], bool]:
    """The data blocks of a STAR file (``starfile``), and whether it was not UTF-8.

    ``starfile`` reads UTF-8 only: another file (a Latin-1 comment or optics group name, which
    RELION reads) yields no block, so it is read again from a UTF-8 copy in a temporary folder
    whose other bytes are escaped as :func:`cryosieve.io.text.decode_text` says.
    """
    try:
        blocks = starfile.read(path, always_dict=True)
        failure = None
    except Exception as error:  # starfile and pandas raise several kinds for a damaged file
        blocks, failure = {}, error
    if blocks:
        return blocks, False
    data = Path(path).read_bytes()
    if is_utf8(data):
        if failure is not None:
            raise CryoSieveInputError(f"{path}: not a readable STAR file ({failure})") from None
        return blocks, False
    try:
        text = decode_text(data)
    except EscapeClash as error:
        raise CryoSieveInputError(f"{path}: not UTF-8, and {error}") from None
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cryosieve-star.") as folder:
        copy = Path(folder) / "escaped.star"
        copy.write_bytes(text.encode("utf-8"))
        try:
            return starfile.read(copy, always_dict=True), True
        except Exception as error:
            raise CryoSieveInputError(f"{path}: not a readable STAR file ({error})") from None


def _read_common(path: str, block: str, frame: pd.DataFrame, escaped: bool) -> dict[str, Any]:
    if len(frame) == 0:
        raise CryoSieveInputError(f"{path}: data_{block} holds no particles")
    if "rlnImageName" not in frame.columns:
        raise CryoSieveInputError(f"{path}: column rlnImageName missing in data_{block}")
    files, indices = parse_image_names(path, frame["rlnImageName"], escaped)
    # ParticleSet's keyword arguments: arrays, and None for an absent optional column
    values: dict[str, Any] = {
        "image_name": frame["rlnImageName"].astype(str).to_numpy(dtype=object),
        "image_file": files,
        "image_index": indices,
        "rot": _column(path, block, frame, "rlnAngleRot"),
        "tilt": _column(path, block, frame, "rlnAngleTilt"),
        "psi": _column(path, block, frame, "rlnAnglePsi"),
        "defocus_u": _column(path, block, frame, "rlnDefocusU"),
        "defocus_v": _column(path, block, frame, "rlnDefocusV"),
        "defocus_angle": _column(path, block, frame, "rlnDefocusAngle"),
        "phase_shift": _optional(frame, "rlnPhaseShift", 0.0, path, block),
        "ctf_bfactor": _optional(frame, "rlnCtfBfactor", 0.0, path, block),
        "ctf_scalefactor": _optional(frame, "rlnCtfScalefactor", 1.0, path, block),
    }
    if "rlnRandomSubset" in frame.columns:
        subset = _column(path, block, frame, "rlnRandomSubset")
        if np.any(subset != np.round(subset)) or np.any(subset < 1):
            raise CryoSieveInputError(
                f"{path}: column rlnRandomSubset in data_{block} must hold integers >= 1"
            )
        values["random_subset"] = subset.astype(np.int64)
    else:
        values["random_subset"] = None
    return values


def _read_30(path: str, blocks: dict[str, pd.DataFrame], block: str, angpix: float | None,
             escaped: bool) -> ParticleSet:
    frame = blocks[block]
    label = block or "(unnamed)"
    values = _read_common(path, label, frame, escaped)
    if angpix is None or angpix <= 0:
        raise CryoSieveInputError(
            f"{path}: RELION 3.0 STAR file carries no pixel size; give {setting('angpix')}"
        )
    n = len(frame)
    values.update(
        origin_x=_optional(frame, "rlnOriginX", 0.0, path, label),
        origin_y=_optional(frame, "rlnOriginY", 0.0, path, label),
        voltage=_column(path, label, frame, "rlnVoltage"),
        spherical_aberration=_column(path, label, frame, "rlnSphericalAberration"),
        amplitude_contrast=_column(path, label, frame, "rlnAmplitudeContrast"),
        pixel_size=np.full(n, float(angpix)),
        optics_group=np.ones(n, dtype=np.int64),
        image_size=None,
    )
    return ParticleSet(path=path, source=StarSource(version="3.0", blocks=blocks, particles_block=block,
                                                    escaped=escaped), **values)


def _read_31(path: str, blocks: dict[str, pd.DataFrame], escaped: bool) -> ParticleSet:
    optics, frame = blocks["optics"], blocks["particles"]
    values = _read_common(path, "particles", frame, escaped)
    group = _column(path, "particles", frame, "rlnOpticsGroup").astype(np.int64)
    optics_group = _column(path, "optics", optics, "rlnOpticsGroup").astype(np.int64)
    if len(set(optics_group.tolist())) != len(optics_group):
        raise CryoSieveInputError(f"{path}: data_optics lists an optics group twice")
    row_of = {int(g): i for i, g in enumerate(optics_group)}
    unknown = sorted(set(group.tolist()) - set(row_of))
    if unknown:
        raise CryoSieveInputError(
            f"{path}: rlnOpticsGroup {unknown[0]} in data_particles is not in data_optics"
        )
    rows = np.array([row_of[int(g)] for g in group], dtype=np.int64)
    if "rlnImagePixelSize" in optics.columns:
        optics_pixel = _column(path, "optics", optics, "rlnImagePixelSize")
    else:
        raise CryoSieveInputError(f"{path}: column rlnImagePixelSize missing in data_optics")
    if np.any(optics_pixel <= 0):
        raise CryoSieveInputError(f"{path}: rlnImagePixelSize in data_optics must be positive")
    pixel = optics_pixel[rows]
    per_optics = {name: _column(path, "optics", optics, name)[rows] for name in OPTICS_COLUMNS}
    image_size = None
    if "rlnImageSize" in optics.columns:
        image_size = _column(path, "optics", optics, "rlnImageSize").astype(np.int64)[rows]
    values.update(
        origin_x=_origin_31(path, frame, "X", pixel),
        origin_y=_origin_31(path, frame, "Y", pixel),
        voltage=per_optics["rlnVoltage"],
        spherical_aberration=per_optics["rlnSphericalAberration"],
        amplitude_contrast=per_optics["rlnAmplitudeContrast"],
        pixel_size=pixel,
        optics_group=group,
        image_size=image_size,
    )
    return ParticleSet(path=path, source=StarSource(version="3.1", blocks=blocks, particles_block="particles",
                                                    escaped=escaped),
                       **values)


def _origin_31(path: str, frame: pd.DataFrame, axis: str, pixel: np.ndarray) -> np.ndarray:
    """Origins (pixels) of a RELION 3.1+ table along ``axis``: ``rlnOrigin{axis}Angst`` / pixel size.

    Some converters write RELION 3.0's ``rlnOrigin{axis}`` (pixels) into 3.1 files; those
    are used as they are. With both columns, they must agree (to 1e-3 pixel).
    """
    angstrom_name, pixel_name = f"rlnOrigin{axis}Angst", f"rlnOrigin{axis}"
    from_angstrom = _column(path, "particles", frame, angstrom_name) / pixel if angstrom_name in frame.columns else None
    from_pixels = _column(path, "particles", frame, pixel_name) if pixel_name in frame.columns else None
    if from_angstrom is not None and from_pixels is not None:
        differs = np.flatnonzero(np.abs(from_angstrom - from_pixels) > ORIGIN_TOLERANCE_PIXELS)
        if differs.size:
            row = int(differs[0])
            raise CryoSieveInputError(
                f"{path}: {pixel_name} ({from_pixels[row]:g} px) and "
                f"{angstrom_name} ({from_angstrom[row] * pixel[row]:g} Å "
                f"= {from_angstrom[row]:g} px) disagree at row {row + 1} of data_particles; keep one of them")
    if from_angstrom is not None:
        result: np.ndarray = from_angstrom
        return result
    if from_pixels is not None:
        return from_pixels
    return np.zeros(len(frame), dtype=np.float64)


def output_paths(out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(kept, sieved) STAR paths for ``--o OUT.star``: ``OUT.star`` and ``OUT_sieved.star``."""
    out = Path(out)
    root, ext = os.path.splitext(str(out))
    return out, Path(root + "_sieved" + (ext or ".star"))


def star_source_of(particles: ParticleSet) -> StarSource:
    """A RELION 3.1 description of ``particles`` (for a set read from another format, ``--o x.star``):
    ``data_optics`` with one row per optics group, ``data_particles`` with the values the set holds
    (origins in Å)."""
    groups = np.unique(particles.optics_group)
    first = np.array([int(np.flatnonzero(particles.optics_group == group)[0]) for group in groups])
    optics = pd.DataFrame({
        "rlnOpticsGroup": groups.astype(np.int64),
        "rlnOpticsGroupName": [f"opticsGroup{int(group)}" for group in groups],
        "rlnVoltage": particles.voltage[first], "rlnSphericalAberration": particles.spherical_aberration[first],
        "rlnAmplitudeContrast": particles.amplitude_contrast[first], "rlnImagePixelSize": particles.pixel_size[first],
    })
    if particles.image_size is not None:
        optics["rlnImageSize"] = particles.image_size[first].astype(np.int64)
    optics["rlnImageDimensionality"] = 2
    table = pd.DataFrame({
        "rlnImageName": particles.image_name.astype(str), "rlnAngleRot": particles.rot,
        "rlnAngleTilt": particles.tilt, "rlnAnglePsi": particles.psi,
        "rlnOriginXAngst": particles.origin_x * particles.pixel_size,
        "rlnOriginYAngst": particles.origin_y * particles.pixel_size,
        "rlnDefocusU": particles.defocus_u, "rlnDefocusV": particles.defocus_v,
        "rlnDefocusAngle": particles.defocus_angle, "rlnPhaseShift": particles.phase_shift,
        "rlnCtfBfactor": particles.ctf_bfactor, "rlnCtfScalefactor": particles.ctf_scalefactor,
        "rlnOpticsGroup": particles.optics_group.astype(np.int64),
    })
    if particles.random_subset is not None:
        table["rlnRandomSubset"] = particles.random_subset.astype(np.int64)
    return StarSource(version="3.1", blocks={"optics": optics, "particles": table}, particles_block="particles")
