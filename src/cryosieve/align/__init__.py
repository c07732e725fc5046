"""Built-in gold-standard local refinement: each particle's pose and origin re-estimated around the given ones.

Each half-set is refined against the half map of its own particles only (:mod:`.gold_standard`), by a local
search of every particle (:mod:`.search`) over orientations within a search range, coarse to fine
(:mod:`.orientations`), and every shift within a shift range, refined below a pixel; the images are compared
with the CTF-modulated projections of the half-set's reference (:mod:`.references`: masked, weighted by its
own half-map FSC, limited to its own resolution) up to the current resolution only (:mod:`.spectra`,
:mod:`.slices`), each sample weighed by the noise of its shell measured in the data (:mod:`.noise`). The
hot path is a numba kernel on the CPU (:mod:`._kernels`) and batched tensors on CUDA.

The public entry points:

* :func:`refine_gold_standard` (:class:`GoldStandardSettings`, :class:`GoldStandardResult`): iterations of
  search, reconstruction and post-processing until the resolution stops improving;
* :class:`SearchTask` / :func:`search_rows` (:class:`SearchSettings`, :class:`HalfSearch`, :class:`Found`,
  :func:`moved`): one search of given particles against given references.
"""

from cryosieve.align.gold_standard import (
    GoldStandardResult,
    GoldStandardSettings,
    Iteration,
    particle_diameter,
    refine_gold_standard,
)
from cryosieve.align.noise import NoiseSpectrum, noise_spectrum
from cryosieve.align.orientations import SearchLevels, angle_between, search_levels
from cryosieve.align.references import HalfReference, half_reference, quarter_labels
from cryosieve.align.search import ENGINES, Found, HalfSearch, SearchSettings, SearchTask, moved, search_rows

__all__ = [
    "ENGINES", "Found", "GoldStandardResult", "GoldStandardSettings", "HalfReference", "HalfSearch", "Iteration",
    "NoiseSpectrum", "SearchLevels", "SearchSettings", "SearchTask", "angle_between", "half_reference", "moved",
    "noise_spectrum", "particle_diameter", "quarter_labels", "refine_gold_standard", "search_levels", "search_rows",
]
