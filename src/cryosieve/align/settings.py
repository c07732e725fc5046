"""The settings of the built-in local refinement, checked before anything heavy is loaded (no torch here).

:class:`SearchSettings`: how each particle is searched (:mod:`cryosieve.align.search`);
:class:`GoldStandardSettings`: the iterations around it (:mod:`cryosieve.align.gold_standard`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from cryosieve.align import _kernels
from cryosieve.errors import CryoSieveInputError, setting

#: The implementations of the search: ``numba`` (the CPU kernel), ``torch`` (batched tensors, any device),
#: ``auto`` (numba on the CPU, torch elsewhere).
ENGINES = ("auto", "numba", "torch")

#: The resolution (Å) every search compares up to at least, unless told otherwise (RELION's ``--ini_high`` by
#: default).
LOWEST_RESOLUTION = 30.0


def _device_type(device: Any) -> str:
    """``"cuda"`` of ``"cuda:1"`` or of a ``torch.device`` (read by its name: no torch needed)."""
    return str(device).split(":")[0]


@dataclass(frozen=True)
class SearchSettings:
    """How to search: ``search_range`` (degrees, the largest turn from the given pose), ``angular_step``
    (degrees, the finest step, unless the resolution supports only a coarser one), ``shift_range`` (pixels,
    the largest move of the origin), particles per batch, device and engine (:data:`ENGINES`)."""

    search_range: float = 15.0
    angular_step: float = 0.5
    shift_range: float = 5.0
    batch_size: int = 128
    device: Any = "cpu"
    engine: str = "auto"

    def check(self) -> None:
        """Raise :class:`CryoSieveInputError` naming the first bad setting."""
        for name, value in (("search_range", self.search_range), ("angular_step", self.angular_step)):
            if not (math.isfinite(value) and 0 < value <= 180):
                raise CryoSieveInputError(f"{setting(name)} {value}: must be in (0, 180] degrees")
        if self.angular_step > self.search_range:
            raise CryoSieveInputError(f"{setting('angular_step')} {self.angular_step}: must not exceed "
                                      f"{setting('search_range')} {self.search_range}")
        if not (math.isfinite(self.shift_range) and 0 <= self.shift_range <= 100):
            raise CryoSieveInputError(f"{setting('shift_range')} {self.shift_range}: must be in [0, 100] pixels")
        if self.batch_size < 1:
            raise CryoSieveInputError(f"{setting('batch_size')} {self.batch_size}: must be at least 1")
        if self.engine not in ENGINES:
            raise CryoSieveInputError(f"{setting('engine')} {self.engine}: must be one of {', '.join(ENGINES)}")
        if self.engine == "numba" and (_device_type(self.device) != "cpu" or not _kernels.AVAILABLE):
            raise CryoSieveInputError(f"{setting('engine')} numba: runs on the CPU only, with numba installed")

    def chosen_engine(self) -> str:
        """``"numba"`` or ``"torch"``."""
        if self.engine != "auto":
            return self.engine
        return "numba" if _device_type(self.device) == "cpu" and _kernels.AVAILABLE else "torch"


@dataclass(frozen=True)
class GoldStandardSettings:
    """What :func:`cryosieve.align.gold_standard.refine_gold_standard` does: the ``search``; at most
    ``iterations`` rounds; ``symmetry`` of the reconstructions (the search itself is of each particle's own
    pose); ``lowest_resolution`` (Å): the search always compares up to at least this resolution;
    ``particle_diameter`` (Å; ``None``: from the mask); particles per batch of the reconstruction."""

    search: SearchSettings = field(default_factory=SearchSettings)
    iterations: int = 5
    symmetry: str = "C1"
    lowest_resolution: float = LOWEST_RESOLUTION
    particle_diameter: float | None = None
    reconstruct_batch_size: int = 128

    def check(self) -> None:
        """Raise :class:`CryoSieveInputError` naming the first bad setting."""
        self.search.check()
        if self.iterations < 1:
            raise CryoSieveInputError(f"{setting('iterations')} {self.iterations}: must be at least 1")
        if not (math.isfinite(self.lowest_resolution) and self.lowest_resolution > 0):
            raise CryoSieveInputError(f"{setting('ini_high')} {self.lowest_resolution}: must be a positive "
                                      "resolution in Å")
        if self.particle_diameter is not None and not self.particle_diameter > 0:
            raise CryoSieveInputError(f"{setting('particle_diameter')} {self.particle_diameter}: must be positive")
