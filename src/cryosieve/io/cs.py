"""The CryoSPARC codec: particle datasets (``.cs``, numpy structured arrays) in and out.

Read and written with the official ``cryosparc-tools`` :class:`cryosparc.dataset.Dataset`
(the optional extra ``pip install "cryosieve[cryosparc]"``). A subset is written back with
every field and every ``uid`` of its rows unchanged: rows are taken, nothing is re-created.

Conventions, as pyem's ``csparc2star`` converts them (the converter CryoSieve's own demo
data went through), checked by ``tests/test_cs.py``:

* pose: ``alignments3D/pose`` is a rotation vector (axis times angle, radians); RELION's
  rotation matrix ``A`` of the particle (:func:`cryosieve.geometry.euler_to_matrix`) is the
  transpose of its Rodrigues matrix, ``A = R(pose)^T``;
* origin: ``alignments3D/shift`` (pixels, x then y) is RELION's origin in pixels, same sign;
* half-sets: ``alignments3D/split`` 0 and 1 are RELION's ``rlnRandomSubset`` 1 and 2;
* CTF: ``ctf/df1_A``, ``ctf/df2_A`` are defocus U and V (Å), ``ctf/df_angle_rad`` and
  ``ctf/phase_shift_rad`` the astigmatism angle and phase shift (radians), ``ctf/accel_kv``,
  ``ctf/cs_mm``, ``ctf/amp_contrast`` as RELION's; ``ctf/bfactor`` and ``ctf/scale`` (where
  present) RELION's ``rlnCtfBfactor`` and ``rlnCtfScalefactor``;
* images: ``blob/path`` (relative to the project folder, ``--directory``), ``blob/idx``
  (0-based), ``blob/psize_A`` (Å), ``blob/shape`` (pixels);
* optics group: ``ctf/exp_group_id`` where present.

Fields missing from the main file are taken from passthrough files (other ``.cs`` files of
the same particles), matched by ``uid``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cryosieve.errors import CryoSieveInputError, setting
from cryosieve.geometry import euler_to_matrix, matrix_to_euler
from cryosieve.particles import ParticleSet
from cryosieve.tolerances import pixel_sizes_agree

if TYPE_CHECKING:
    from cryosparc.dataset import Dataset

#: Fields every particle needs (after merging passthrough files).
REQUIRED_FIELDS = ("blob/path", "blob/idx", "blob/psize_A", "alignments3D/pose", "alignments3D/shift",
                   "ctf/df1_A", "ctf/df2_A", "ctf/df_angle_rad", "ctf/accel_kv", "ctf/cs_mm", "ctf/amp_contrast")


def _dataset_class() -> type[Dataset]:
    try:
        from cryosparc.dataset import Dataset
    except ImportError:
        raise CryoSieveInputError('.cs particle files need cryosparc-tools: pip install "cryosieve[cryosparc]"'
                                  ) from None
    return Dataset


@dataclass(frozen=True)
class CsSource:
    """The ``.cs`` dataset a :class:`~cryosieve.particles.ParticleSet` was read from (the main
    file's fields only: passthrough fields are read, not written back)."""

    dataset: Any  # cryosparc.dataset.Dataset
    format: str = "cs"

    def subset(self, rows: np.ndarray) -> CsSource:
        return CsSource(self.dataset.take(np.asarray(rows, dtype=np.int64)))

    def write_to(self, path: str | os.PathLike[str]) -> None:
        with open(path, "wb") as handle:
            self.dataset.save(handle)

    def with_random_subset(self, halves: np.ndarray) -> CsSource:
        dataset = self.dataset.copy()
        if "alignments3D/split" not in dataset.fields():
            dataset.add_fields([("alignments3D/split", "u4")])
        dataset["alignments3D/split"] = np.asarray(halves, dtype=np.int64) - 1
        return CsSource(dataset)

    def with_poses(self, rot: np.ndarray, tilt: np.ndarray, psi: np.ndarray, origin_x: np.ndarray,
                   origin_y: np.ndarray, pixel_size: np.ndarray) -> CsSource:
        """``alignments3D/pose`` (the rotation vector of ``A^T``) and ``alignments3D/shift`` (pixels)
        replaced, every other field kept."""
        from scipy.spatial.transform import Rotation

        dataset = self.dataset.copy()
        matrices = euler_to_matrix(np.asarray(rot, dtype=np.float64), np.asarray(tilt, dtype=np.float64),
                                   np.asarray(psi, dtype=np.float64))
        dataset["alignments3D/pose"] = Rotation.from_matrix(np.transpose(matrices, (0, 2, 1))).as_rotvec()
        dataset["alignments3D/shift"] = np.stack([np.asarray(origin_x, dtype=np.float64),
                                                  np.asarray(origin_y, dtype=np.float64)], axis=1)
        return CsSource(dataset)

    @property
    def uid(self) -> np.ndarray:
        """``(n,)`` uint64 particle uids."""
        return np.asarray(self.dataset["uid"])


def load_dataset(path: str | os.PathLike[str]) -> Any:
    """A ``.cs`` file as a ``cryosparc-tools`` Dataset (an input error if it is not one)."""
    path = str(path)
    if not os.path.isfile(path):
        raise CryoSieveInputError(f"{path}: file not found")
    dataset_class = _dataset_class()
    try:
        return dataset_class.load(path)
    except Exception as error:  # numpy and cryosparc-tools raise several kinds for a damaged file
        raise CryoSieveInputError(f"{path}: not a readable CryoSPARC .cs dataset ({error})") from None


def _merged(path: str, main: Any, passthrough: list[tuple[str, Any]]) -> dict[str, np.ndarray]:
    """Every field of the main dataset, then those only passthrough files have, by ``uid``."""
    fields = {name: np.asarray(main[name]) for name in main.fields()}
    if "uid" not in fields:
        raise CryoSieveInputError(f"{path}: field uid missing")
    uid = fields["uid"]
    for other_path, other in passthrough:
        new = [name for name in other.fields() if name not in fields]
        if not new:
            continue
        if "uid" not in other.fields():
            raise CryoSieveInputError(f"{other_path}: field uid missing")
        other_uid = np.asarray(other["uid"])
        order = np.argsort(other_uid, kind="stable")
        position = np.searchsorted(other_uid[order], uid)
        position = np.minimum(position, len(order) - 1)
        found = other_uid[order][position] == uid
        if not np.all(found):
            missing = int(uid[np.flatnonzero(~found)[0]])
            raise CryoSieveInputError(f"{other_path}: holds no particle of uid {missing} of {path} "
                                      f"({setting('passthrough')} files must describe the same particles)")
        rows = order[position]
        for name in new:
            fields[name] = np.asarray(other[name])[rows]
    return fields


def _text(values: np.ndarray) -> np.ndarray:
    return np.array([value.decode() if isinstance(value, bytes) else str(value) for value in values], dtype=object)


def read_cs_particles(path: str | os.PathLike[str], passthrough: tuple[str, ...] = (),
                      angpix: float | None = None) -> ParticleSet:
    """Read a CryoSPARC particle dataset (``.cs``) and its passthrough files.

    ``angpix`` (Å), when given, must agree with ``blob/psize_A``.
    """
    path = str(path)
    main = load_dataset(path)
    if len(main) == 0:
        raise CryoSieveInputError(f"{path}: holds no particles")
    fields = _merged(path, main, [(str(other), load_dataset(other)) for other in passthrough])
    for name in REQUIRED_FIELDS:
        if name not in fields:
            hint = " (give the file that has it with --passthrough)" if name.split("/")[0] != "alignments3D" else \
                " (particles without 3D poses: refine them first)"
            raise CryoSieveInputError(f"{path}: field {name} missing{hint}")
    n = len(main)
    pose = np.asarray(fields["alignments3D/pose"], dtype=np.float64).reshape(n, 3)
    if not np.all(np.isfinite(pose)):
        raise CryoSieveInputError(f"{path}: field alignments3D/pose holds values that are not finite")
    from scipy.spatial.transform import Rotation

    relion = np.transpose(Rotation.from_rotvec(pose).as_matrix(), (0, 2, 1))
    rot, tilt, psi = matrix_to_euler(relion)
    shift = np.asarray(fields["alignments3D/shift"], dtype=np.float64).reshape(n, 2)
    pixel = np.asarray(fields["blob/psize_A"], dtype=np.float64)
    if np.any(~(pixel > 0)):
        raise CryoSieveInputError(f"{path}: field blob/psize_A must be positive")
    if angpix is not None and not pixel_sizes_agree(float(pixel[0]), angpix):
        raise CryoSieveInputError(f"{setting('angpix')} {angpix}: differs from blob/psize_A {pixel[0]:g} Å in {path}")
    files = _text(fields["blob/path"])
    index = np.asarray(fields["blob/idx"], dtype=np.int64)
    names = np.array([f"{i + 1:06d}@{file}" for i, file in zip(index, files, strict=True)], dtype=object)
    random_subset = None
    if "alignments3D/split" in fields:
        split = np.asarray(fields["alignments3D/split"], dtype=np.int64)
        if np.any((split != 0) & (split != 1)):
            raise CryoSieveInputError(f"{path}: field alignments3D/split must hold 0 and 1")
        random_subset = split + 1
    image_size = np.asarray(fields["blob/shape"], dtype=np.int64).reshape(n, -1)[:, -1] \
        if "blob/shape" in fields else None
    optics = np.asarray(fields["ctf/exp_group_id"], dtype=np.int64) if "ctf/exp_group_id" in fields else \
        np.ones(n, dtype=np.int64)

    def values(name: str, default: float) -> np.ndarray:
        return np.asarray(fields[name], dtype=np.float64) if name in fields else np.full(n, default)

    return ParticleSet(
        path=path, source=CsSource(main), image_name=names, image_file=files, image_index=index,
        rot=rot, tilt=tilt, psi=psi, origin_x=shift[:, 0].copy(), origin_y=shift[:, 1].copy(),
        defocus_u=values("ctf/df1_A", 0.0), defocus_v=values("ctf/df2_A", 0.0),
        defocus_angle=np.degrees(values("ctf/df_angle_rad", 0.0)),
        phase_shift=np.degrees(values("ctf/phase_shift_rad", 0.0)), voltage=values("ctf/accel_kv", 300.0),
        spherical_aberration=values("ctf/cs_mm", 2.7), amplitude_contrast=values("ctf/amp_contrast", 0.1),
        pixel_size=pixel, ctf_bfactor=values("ctf/bfactor", 0.0), ctf_scalefactor=values("ctf/scale", 1.0),
        optics_group=optics, random_subset=random_subset, image_size=image_size, angpix=angpix)


def particles_to_dataset(particles: ParticleSet, seed: int = 0) -> Any:
    """A new ``.cs`` Dataset describing ``particles`` (the conventions above; new seeded ``uid`` values).

    Used to describe simulated or STAR particles in CryoSPARC's terms; a set read from a ``.cs``
    file is written back from its source instead, which keeps every field and ``uid``.
    """
    dataset_class = _dataset_class()
    n = len(particles)
    pose = euler_to_matrix(particles.rot, particles.tilt, particles.psi)
    from scipy.spatial.transform import Rotation

    rotvec = Rotation.from_matrix(np.transpose(pose, (0, 2, 1))).as_rotvec()
    fields: list[tuple[str, str] | tuple[str, str, tuple[int, ...]]] = [
        ("blob/path", "O"), ("blob/idx", "u4"), ("blob/psize_A", "f4"), ("blob/shape", "u4", (2,)),
        ("alignments3D/pose", "f4", (3,)), ("alignments3D/shift", "f4", (2,)), ("alignments3D/split", "u4"),
        ("ctf/df1_A", "f4"), ("ctf/df2_A", "f4"), ("ctf/df_angle_rad", "f4"), ("ctf/phase_shift_rad", "f4"),
        ("ctf/accel_kv", "f4"), ("ctf/cs_mm", "f4"), ("ctf/amp_contrast", "f4"), ("ctf/bfactor", "f4"),
        ("ctf/scale", "f4"), ("ctf/exp_group_id", "u4")]
    dataset = dataset_class.allocate(n, fields)
    dataset["uid"] = np.random.default_rng(seed).integers(1, 2**63, size=n, dtype=np.uint64)
    dataset["blob/path"] = np.asarray([str(file) for file in particles.image_file], dtype=object)
    dataset["blob/idx"] = particles.image_index
    dataset["blob/psize_A"] = particles.pixel_size
    size = particles.image_size if particles.image_size is not None else np.zeros(n, dtype=np.int64)
    dataset["blob/shape"] = np.stack([size, size], axis=1)
    dataset["alignments3D/pose"] = rotvec
    dataset["alignments3D/shift"] = np.stack([particles.origin_x, particles.origin_y], axis=1)
    if particles.random_subset is not None:
        dataset["alignments3D/split"] = particles.random_subset - 1
    dataset["ctf/df1_A"] = particles.defocus_u
    dataset["ctf/df2_A"] = particles.defocus_v
    dataset["ctf/df_angle_rad"] = np.radians(particles.defocus_angle)
    dataset["ctf/phase_shift_rad"] = np.radians(particles.phase_shift)
    dataset["ctf/accel_kv"] = particles.voltage
    dataset["ctf/cs_mm"] = particles.spherical_aberration
    dataset["ctf/amp_contrast"] = particles.amplitude_contrast
    dataset["ctf/bfactor"] = particles.ctf_bfactor
    dataset["ctf/scale"] = particles.ctf_scalefactor
    dataset["ctf/exp_group_id"] = particles.optics_group
    return dataset

