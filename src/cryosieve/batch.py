"""One batch of particles: what every per-particle consumer needs, built once from a particle set.

Scoring (:mod:`cryosieve.scoring`), insertion into a reconstruction (:mod:`cryosieve.reconstruct`)
and pose refinement read the same :class:`ParticleBatch`: its rows, poses (degrees and RELION
matrices), origins (pixels), pixel sizes (Å) and the host-side CTF terms
(:class:`~cryosieve.ctf.CtfParameters`). Everything is a numpy array on the host, float64; a
consumer on a device takes the tensors it needs with :meth:`ParticleBatch.on` (cast on the host:
:func:`cryosieve.precision.to_device`). No torch import here, so the CPU reconstruction stays free
of it.

Adding a per-particle term of the CTF touches :mod:`cryosieve.ctf` (and the readers that fill the
particle set), not this module or its consumers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from cryosieve.ctf import CtfParameters
from cryosieve.geometry import euler_to_matrix
from cryosieve.particles import ParticleSet

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ParticleBatch:
    """``b`` particles of a :class:`~cryosieve.particles.ParticleSet`.

    Attributes
    ----------
    table, rows:
        The set and the ``(b,)`` int64 rows of it (for a variant that reads other columns, as the
        published scorer its own CTF formula).
    rot, tilt, psi:
        ``(b,)`` float64 Euler angles, degrees (RELION's ZYZ).
    origin_x, origin_y:
        ``(b,)`` float64 origins, pixels.
    pixel_size:
        ``(b,)`` float64, Å.
    ctf:
        The CTF terms (:class:`~cryosieve.ctf.CtfParameters`), ``rlnCtfBfactor`` and ``rlnCtfScalefactor``
        included.
    """

    table: ParticleSet = field(repr=False, compare=False)
    rows: np.ndarray
    rot: np.ndarray
    tilt: np.ndarray
    psi: np.ndarray
    origin_x: np.ndarray
    origin_y: np.ndarray
    pixel_size: np.ndarray
    ctf: CtfParameters

    @classmethod
    def from_table(cls, table: ParticleSet, rows: np.ndarray) -> ParticleBatch:
        """The particles ``rows`` (``(b,)`` integer indices) of ``table``."""
        rows = np.asarray(rows, dtype=np.int64)

        def take(values: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(np.asarray(values, dtype=np.float64)[rows])

        return cls(table=table, rows=rows, rot=take(table.rot), tilt=take(table.tilt), psi=take(table.psi),
                   origin_x=take(table.origin_x), origin_y=take(table.origin_y), pixel_size=take(table.pixel_size),
                   ctf=CtfParameters.from_table(table, rows))

    def __len__(self) -> int:
        return int(self.rows.size)

    @cached_property
    def rotations(self) -> np.ndarray:
        """``(b, 3, 3)`` float64 RELION matrices ``A`` of the poses (:func:`cryosieve.geometry.euler_to_matrix`)."""
        return np.ascontiguousarray(euler_to_matrix(self.rot, self.tilt, self.psi))

    def on(self, name: str, device: torch.device | str) -> torch.Tensor:
        """One of the ``(b,)`` arrays above, or ``"rotations"``, as a tensor on ``device`` (float64, or float32
        on a device without float64; cast on the host)."""
        from cryosieve.precision import to_device

        return to_device(getattr(self, name), device)
