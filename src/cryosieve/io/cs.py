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
  (0-based), ``blob/psize_A`` (Å), ``blob/shape`` (pixels); a ``blob/path`` beginning with ``>`` is
  CryoSPARC's mark of an exported job or result group (its data lie beside the ``.cs`` file, and CryoSPARC
  removes the mark when it imports them): it is relative to the folder of the file that holds it, and a
  subset written to another folder has those paths re-based there, so that they name the same images;
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
    result: type[Dataset] = Dataset
    return result


#: CryoSPARC's mark on the paths of an exported job or result group (relative to the ``.cs`` file's folder).
EXPORTED = ">"


def resolve_exported(value: str, folder: str) -> str:
    """A ``blob/path`` value as a path: one marked :data:`EXPORTED` joined to ``folder`` (the folder of the
    ``.cs`` file holding it), any other as it is (relative to the project folder, ``--directory``)."""
    return os.path.normpath(os.path.join(folder, value[1:])) if value.startswith(EXPORTED) else value


@dataclass(frozen=True)
class CsSource:
    """The ``.cs`` dataset a :class:`~cryosieve.particles.ParticleSet` was read from (the main
    file's fields only: passthrough fields are read, not written back); ``folder``: the folder of the file
    it was read from (``>`` paths are relative to it)."""

    dataset: Any  # cryosparc.dataset.Dataset
    format: str = "cs"
    folder: str | None = None

    def subset(self, rows: np.ndarray) -> CsSource:
        return CsSource(self.dataset.take(np.asarray(rows, dtype=np.int64)), folder=self.folder)

    def write_to(self, path: str | os.PathLike[str]) -> None:
        dataset = self.dataset
        target = os.path.dirname(os.path.abspath(path))
        if self.folder is not None and "blob/path" in dataset.fields() and \
                os.path.realpath(target) != os.path.realpath(self.folder):
            values = _text(np.asarray(dataset["blob/path"]))
            if any(value.startswith(EXPORTED) for value in values):
                dataset = dataset.copy()
                dataset["blob/path"] = np.array(
                    [EXPORTED + os.path.relpath(resolve_exported(value, self.folder), target)
                     if value.startswith(EXPORTED) else value for value in values], dtype=object)
        with open(path, "wb") as handle:
            dataset.save(handle)

    def with_random_subset(self, halves: np.ndarray) -> CsSource:
        dataset = self.dataset.copy()
        if "alignments3D/split" not in dataset.fields():
            dataset.add_fields([("alignments3D/split", "u4")])
        dataset["alignments3D/split"] = np.asarray(halves, dtype=np.int64) - 1
        return CsSource(dataset, folder=self.folder)

    def with_poses(self, rot: np.ndarray, tilt: np.ndarray, psi: np.ndarray, origin_x: np.ndarray,
                   origin_y: np.ndarray, pixel_size: np.ndarray) -> CsSource:
        """``alignments3D/pose`` (the rotation vector of ``A^T``) and ``alignments3D/shift`` (pixels)
        replaced, every other field kept."""
        dataset = self.dataset.copy()
        dataset["alignments3D/pose"] = pose_vectors(rot, tilt, psi)
        dataset["alignments3D/shift"] = np.stack([np.asarray(origin_x, dtype=np.float64),
                                                  np.asarray(origin_y, dtype=np.float64)], axis=1)
        return CsSource(dataset, folder=self.folder)

    @property
    def uid(self) -> np.ndarray:
        """``(n,)`` uint64 particle uids."""
        return np.asarray(self.dataset["uid"])


def load_dataset(path: str | os.PathLike[str]) -> Any:
    """A ``.cs`` file as a ``cryosparc-tools`` Dataset (an input error if it is not one, has no
    ``uid`` field or repeats a ``uid``)."""
    path = str(path)
    if not os.path.isfile(path):
        raise CryoSieveInputError(f"{path}: file not found")
    dataset_class = _dataset_class()
    try:
        # cryosparc-tools invents random uids for a file without them: look at the stored fields first
        stored = [field[0] for field in dataset_class.inspect(path)["dtype"]]
        dataset = dataset_class.load(path)
    except Exception as error:  # numpy and cryosparc-tools raise several kinds for a damaged file
        raise CryoSieveInputError(f"{path}: not a readable CryoSPARC .cs dataset ({error})") from None
    if "uid" not in stored:
        raise CryoSieveInputError(f"{path}: field uid missing (every particle of a .cs file needs its uid)")
    _check_unique_uids(path, np.asarray(dataset["uid"]))
    return dataset


def _check_unique_uids(path: str, uid: np.ndarray) -> None:
    """Refuse a file that holds a ``uid`` twice (a repeated row), naming the uid and both rows."""
    values, first = np.unique(uid, return_index=True)
    if values.size == uid.size:
        return
    again = int(np.setdiff1d(np.arange(uid.size), first)[0])  # the first row that repeats an earlier one
    earlier = int(first[np.searchsorted(values, uid[again])])
    raise CryoSieveInputError(f"{path}: uid {int(uid[again])} appears twice (rows {earlier + 1} and {again + 1}); "
                              "each particle must appear once")


#: Where a merged field was read: the file and, per particle of the main file, its row there.
_Origin = tuple[str, np.ndarray]


def _merged(path: str, main: Any, passthrough: list[tuple[str, Any]]
            ) -> tuple[dict[str, np.ndarray], dict[str, _Origin]]:
    """Every field of the main dataset, then those only passthrough files have, by ``uid``; and
    where each field was read."""
    fields = {name: np.asarray(main[name]) for name in main.fields()}
    origin: dict[str, _Origin] = {name: (path, np.arange(len(main))) for name in fields}
    uid = fields["uid"]
    for other_path, other in passthrough:
        new = [name for name in other.fields() if name not in fields]
        if not new:
            continue
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
            origin[name] = (other_path, rows)
    return fields, origin


def _text(values: np.ndarray) -> np.ndarray:
    return np.array([value.decode() if isinstance(value, bytes) else str(value) for value in values], dtype=object)


def read_cs_particles(path: str | os.PathLike[str], passthrough: tuple[str, ...] = (),
                      angpix: float | None = None) -> ParticleSet:
    """Read a CryoSPARC particle dataset (``.cs``) and its passthrough files.

    ``angpix`` (Å), when given, must agree with ``blob/psize_A``. Every file needs ``uid``
    and may hold each only once; every number used (poses, shifts, pixel sizes, CTF values)
    must be finite: an input error names the file, the field, the row and its uid otherwise.
    """
    path = str(path)
    main = load_dataset(path)
    if len(main) == 0:
        raise CryoSieveInputError(f"{path}: holds no particles")
    fields, origin = _merged(path, main, [(str(other), load_dataset(other)) for other in passthrough])
    for name in REQUIRED_FIELDS:
        if name not in fields:
            hint = " (give the file that has it with --passthrough)" if name.split("/")[0] != "alignments3D" else \
                " (particles without 3D poses: refine them first)"
            raise CryoSieveInputError(f"{path}: field {name} missing{hint}")
    n = len(main)
    uid = fields["uid"]

    def where(name: str, row: int) -> str:
        file, rows = origin[name]
        return f"{file}: field {name} at row {int(rows[row]) + 1} (uid {int(uid[row])})"

    def numbers(name: str, width: int = 1) -> np.ndarray:
        """The field as float64 ``(n, width)``, every value finite."""
        values = np.asarray(fields[name], dtype=np.float64).reshape(n, width)
        bad = np.flatnonzero(~np.all(np.isfinite(values), axis=1))
        if bad.size:
            row = int(bad[0])
            shown = ", ".join(f"{value:g}" for value in values[row])
            raise CryoSieveInputError(f"{where(name, row)} holds {shown}: not a finite number")
        return values

    def values(name: str, default: float) -> np.ndarray:
        return numbers(name)[:, 0] if name in fields else np.full(n, default)

    pose = numbers("alignments3D/pose", 3)
    from scipy.spatial.transform import Rotation

    relion = np.transpose(Rotation.from_rotvec(pose).as_matrix(), (0, 2, 1))
    rot, tilt, psi = matrix_to_euler(relion)
    shift = numbers("alignments3D/shift", 2)
    pixel = values("blob/psize_A", 0.0)
    if np.any(pixel <= 0):
        raise CryoSieveInputError(f"{where('blob/psize_A', int(np.flatnonzero(pixel <= 0)[0]))}: "
                                  "the pixel size must be positive")
    if angpix is not None and not pixel_sizes_agree(float(pixel[0]), angpix):
        raise CryoSieveInputError(f"{setting('angpix')} {angpix}: differs from blob/psize_A {pixel[0]:g} Å in {path}")
    folder = os.path.dirname(os.path.abspath(origin["blob/path"][0]))
    files = np.array([resolve_exported(value, folder) for value in _text(fields["blob/path"])], dtype=object)
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

    return ParticleSet(
        path=path, source=CsSource(main, folder=os.path.dirname(os.path.abspath(path))), image_name=names,
        image_file=files, image_index=index,
        rot=rot, tilt=tilt, psi=psi, origin_x=shift[:, 0].copy(), origin_y=shift[:, 1].copy(),
        defocus_u=values("ctf/df1_A", 0.0), defocus_v=values("ctf/df2_A", 0.0),
        defocus_angle=np.degrees(values("ctf/df_angle_rad", 0.0)),
        phase_shift=np.degrees(values("ctf/phase_shift_rad", 0.0)), voltage=values("ctf/accel_kv", 300.0),
        spherical_aberration=values("ctf/cs_mm", 2.7), amplitude_contrast=values("ctf/amp_contrast", 0.1),
        pixel_size=pixel, ctf_bfactor=values("ctf/bfactor", 0.0), ctf_scalefactor=values("ctf/scale", 1.0),
        optics_group=optics, random_subset=random_subset, image_size=image_size, angpix=angpix)


#: The per-particle values a new ``uid`` is drawn from (with the image name): not the half-set, which a
#: re-split changes, nor the box, which the stack gives.
UID_VALUES = ("rot", "tilt", "psi", "origin_x", "origin_y", "defocus_u", "defocus_v", "defocus_angle", "phase_shift",
              "voltage", "spherical_aberration", "amplitude_contrast", "pixel_size", "ctf_bfactor",
              "ctf_scalefactor", "optics_group")


def particle_uids(particles: ParticleSet, seed: int = 0) -> np.ndarray:
    """New ``uid`` values for particles that have none: ``(n,)`` uint64 in [1, 2^63).

    Each is the first 63 bits of a BLAKE2b hash of ``seed``, the particle's image name and
    its values (:data:`UID_VALUES`, float64 bytes). So the same particle gets the same uid in
    every set it is converted with, the same input always gives the same uids, and particles
    that differ in their image or any of these values (two different data sets) get different
    ones: two hashes agree by chance with probability 2^-63. A particle repeated with the same
    values gets a new uid at each repetition (its count enters the hash), so the uids of a set
    are always distinct.
    """
    import hashlib

    numbers = np.ascontiguousarray(np.stack([np.asarray(getattr(particles, name), dtype=np.float64)
                                             for name in UID_VALUES], axis=1))
    salt = int(seed).to_bytes(8, "little", signed=True)
    uids = np.empty(len(particles), dtype=np.uint64)
    taken: set[int] = set()
    seen: dict[bytes, int] = {}
    for row, name in enumerate(particles.image_name):
        content = str(name).encode("utf-8", "surrogatepass") + b"\0" + numbers[row].tobytes()
        repeat = seen.get(content, 0)
        seen[content] = repeat + 1
        while True:
            digest = hashlib.blake2b(content + repeat.to_bytes(8, "little"), digest_size=8, key=salt).digest()
            uid = int.from_bytes(digest, "little") >> 1
            if uid and uid not in taken:
                break
            repeat += 1 << 32  # a collision (probability about n^2 / 2^64): the next value, still reproducible
        taken.add(uid)
        uids[row] = uid
    return uids


def pose_vectors(rot: np.ndarray, tilt: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """``alignments3D/pose`` of RELION's Euler angles ``(n,)`` (degrees): the rotation vectors of ``A^T``,
    ``(n, 3)`` float64 radians (the conventions above)."""
    from scipy.spatial.transform import Rotation

    matrices = euler_to_matrix(np.asarray(rot, dtype=np.float64), np.asarray(tilt, dtype=np.float64),
                               np.asarray(psi, dtype=np.float64))
    vectors: np.ndarray = Rotation.from_matrix(np.transpose(matrices, (0, 2, 1))).as_rotvec()
    return vectors


def particles_to_dataset(particles: ParticleSet, seed: int = 0) -> Any:
    """A new ``.cs`` Dataset describing ``particles`` (the conventions above; new ``uid`` values from
    :func:`particle_uids`, which ``seed`` enters).

    Used to describe simulated or STAR particles in CryoSPARC's terms; a set read from a ``.cs``
    file is written back from its source instead, which keeps every field and ``uid``.
    """
    dataset_class = _dataset_class()
    n = len(particles)
    rotvec = pose_vectors(particles.rot, particles.tilt, particles.psi)
    fields: list[tuple[str, str] | tuple[str, str, tuple[int, ...]]] = [
        ("blob/path", "O"), ("blob/idx", "u4"), ("blob/psize_A", "f4"), ("blob/shape", "u4", (2,)),
        ("alignments3D/pose", "f4", (3,)), ("alignments3D/shift", "f4", (2,)), ("alignments3D/split", "u4"),
        ("ctf/df1_A", "f4"), ("ctf/df2_A", "f4"), ("ctf/df_angle_rad", "f4"), ("ctf/phase_shift_rad", "f4"),
        ("ctf/accel_kv", "f4"), ("ctf/cs_mm", "f4"), ("ctf/amp_contrast", "f4"), ("ctf/bfactor", "f4"),
        ("ctf/scale", "f4"), ("ctf/exp_group_id", "u4")]
    dataset = dataset_class.allocate(n, fields)
    dataset["uid"] = particle_uids(particles, seed)
    paths = [str(file) for file in particles.image_file]
    for row, path in enumerate(paths):
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:  # a name with bytes that are not UTF-8 (cryosieve.io.text.os_text)
            raise CryoSieveInputError(f"{particles.path}: the stack name of row {row + 1}, {path!a}, holds bytes "
                                      "that are not UTF-8, which a .cs file cannot hold; write a STAR file") from None
    dataset["blob/path"] = np.asarray(paths, dtype=object)
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

