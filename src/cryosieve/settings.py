"""The options of one sieve, in one dataclass: read by the scorer (:mod:`cryosieve.scoring`), the
selection (:mod:`cryosieve.selection`), the automatic retention ratio (:mod:`cryosieve.retention`),
``cryosieve-core`` and, round after round, the pipeline (which changes the cut-off with
``dataclasses.replace``).

A new sieve option is a field here and a flag of the command line; the pipeline carries it and
records it in its state file without further code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from cryosieve.errors import CryoSieveInputError, setting

#: The ``retention_ratio`` that chooses the fraction kept (:mod:`cryosieve.retention`).
AUTO = "auto"
#: The projectors: the Fourier scorer and the published real-space one.
PROJECTORS = ("fourier", "realspace")
#: The implementations of the Fourier scorer: ``numba`` (the fused CPU kernel), ``torch`` (batched
#: tensors on any device: the CUDA path, which runs on the CPU too), ``auto`` (numba on the CPU).
ENGINES = ("auto", "numba", "torch")
#: Reference weightings: by the half-map FSC, none, or ``auto``.
WEIGHTINGS = ("auto", "fsc", "none")
#: Marks a field that says how a sieve computes, not what it gives (left out of :meth:`SieveSettings.record`).
HOW = {"how": True}


@dataclass(frozen=True)
class SieveSettings:
    """Options of one sieve.

    Attributes
    ----------
    retention_ratio:
        Fraction of each half-set kept, in (0, 1], or ``"auto"``: the fraction whose half maps hold
        the most information (:mod:`cryosieve.retention`; needs both half-sets).
    highpass_angstrom:
        Cut-off ``F`` in Å: frequencies below ``1/F`` are removed from the score.
    projector:
        One of :data:`PROJECTORS`: ``"fourier"`` (central slices, default) or ``"realspace"`` (the
        published projector).
    reference_weighting:
        One of :data:`WEIGHTINGS`: ``"fsc"`` weights each half map by ``sqrt(2 FSC / (1 + FSC))`` per
        shell (needs two half maps), ``"none"`` uses the masked maps as they are, ``"auto"`` is ``fsc``
        for the Fourier projector with two half maps and ``none`` otherwise.
    batch_size:
        Particles per batch.
    device:
        Where to compute (a ``torch.device`` or its name).
    balance:
        Keep the same number in every half-set: the smallest ``round(R n)`` of them.
    engine:
        Implementation of the Fourier scorer, one of :data:`ENGINES`.
    keep_orientations:
        ``None``, or a factor of at least 1: within each half-set, no well-populated viewing direction
        loses more than this times the average share (:func:`cryosieve.selection.keep_views`); its
        best-scoring sieved particles are kept back.
    """

    retention_ratio: float | str
    highpass_angstrom: float
    projector: str = "fourier"
    reference_weighting: str = "auto"
    batch_size: int = field(default=256, metadata=HOW)
    device: Any = field(default="cpu", metadata=HOW)
    balance: bool = False
    engine: str = field(default="auto", metadata=HOW)
    keep_orientations: float | None = None

    def check(self) -> None:
        """Refuse (one line naming the setting) a value out of range."""
        check_retention_ratio(self.retention_ratio)
        if not (self.highpass_angstrom > 0) or not math.isfinite(self.highpass_angstrom):
            raise CryoSieveInputError(
                f"{setting('highpass_angstrom')} {self.highpass_angstrom}: must be a positive number of Å")
        for name, allowed in (("projector", PROJECTORS), ("reference_weighting", WEIGHTINGS), ("engine", ENGINES)):
            if getattr(self, name) not in allowed:
                raise CryoSieveInputError(f"{setting(name)} {getattr(self, name)}: must be one of {', '.join(allowed)}")
        if self.batch_size < 1:
            raise CryoSieveInputError(f"{setting('batch_size')} {self.batch_size}: must be at least 1")
        if self.keep_orientations is not None and not self.keep_orientations >= 1.0:
            raise CryoSieveInputError(f"{setting('keep_orientations')} {self.keep_orientations}: must be at least 1")

    def record(self) -> dict[str, Any]:
        """The settings that decide a sieve's outputs, by field name (JSON-ready): every field but those
        marked :data:`HOW` (where and in what pieces it computes)."""
        return {item.name: getattr(self, item.name) for item in fields(self) if not item.metadata.get("how")}


def check_retention_ratio(value: float | str) -> None:
    """A fraction in (0, 1] or :data:`AUTO`."""
    if value == AUTO:
        return
    if isinstance(value, str) or not (0.0 < value <= 1.0):
        raise CryoSieveInputError(f"{setting('retention_ratio')} {value}: must be in (0, 1] or auto")
