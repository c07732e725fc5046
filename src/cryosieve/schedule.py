"""The pipeline's schedule of high-pass cut-offs, one per round.

Round ``i`` of ``n`` sieves at ``F_i = 1 / linspace(1 / start, 1 / end, n)[i]`` Å, rounded to
0.001 Å as the published CryoSieve passes it on (``--frequency {F:.3f}``), so the rounding is
part of the result. To sieve with another schedule, change :meth:`CutoffSchedule.cutoffs`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cryosieve.band import HighPass
from cryosieve.errors import CryoSieveInputError, setting


@dataclass(frozen=True)
class CutoffSchedule:
    """Cut-offs from ``start`` to ``end`` Å over ``rounds`` rounds."""

    start: float
    end: float
    rounds: int

    @property
    def cutoffs(self) -> np.ndarray:
        """``(rounds,)`` float64 cut-offs in Å."""
        exact = 1.0 / np.linspace(1.0 / self.start, 1.0 / self.end, self.rounds)
        return np.array([float(f"{value:.3f}") for value in exact], dtype=np.float64)

    def __len__(self) -> int:
        return self.rounds

    def __getitem__(self, round_index: int) -> float:
        return float(self.cutoffs[round_index])

    def check(self, box: int, pixel_size: float) -> None:
        """Refuse a schedule that is not one (a non-positive number, no round) or whose cut-offs leave
        nothing to score in a ``box``-pixel image of ``pixel_size`` Å (the particles' coarsest)."""
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise CryoSieveInputError(f"{setting('num_iters')} {self.rounds}: must be at least 1")
        for name, value in (("frequency_start", self.start), ("frequency_end", self.end)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise CryoSieveInputError(f"{setting(name)} {value}: must be a positive number")
        for name, value in (("frequency_start", self.start), ("frequency_end", self.end)):
            HighPass(value).check(box, pixel_size, setting(name))
        for value in self.cutoffs:
            HighPass(float(value)).check(box, pixel_size, f"{setting('frequency_end')} {self.end} "
                                                          "(a round's cut-off, rounded to 0.001 Å)")
