"""Built-in gold-standard local refinement: each particle's pose and origin re-estimated around the given ones.

Each half-set is refined against the half map of its own particles only (:mod:`.gold_standard`), by a local
search of every particle (:mod:`.search`) over orientations within a search range, coarse to fine
(:mod:`.orientations`), and every shift within a shift range, refined below a pixel; the images are compared
with the CTF-modulated projections of the half-set's reference (:mod:`.references`: masked, weighted by its
own half-map FSC, limited to its own resolution) up to the current resolution only (:mod:`.spectra`,
:mod:`.slices`), each sample weighed by the noise of its shell measured in the data (:mod:`.noise`). Each batch
of particles is one :class:`cryosieve.batch.ParticleBatch`, as in scoring and insertion. The hot path is a
numba kernel on the CPU (:mod:`._kernels`) and batched tensors on CUDA. :mod:`.settings` holds the settings,
checked before anything heavy is loaded.

The public entry points:

* :func:`refine_gold_standard` (:class:`GoldStandardSettings`, :class:`GoldStandardResult`): iterations of
  search, reconstruction and post-processing until the resolution stops improving;
* :class:`SearchTask` / :func:`search_rows` (:class:`SearchSettings`, :class:`HalfSearch`, :class:`Found`,
  :func:`moved`): one search of given particles against given references.

The package face loads each name on first use, so that checking the settings does not load torch.
"""

from typing import TYPE_CHECKING

from cryosieve._lazy import lazy_names

if TYPE_CHECKING:
    from cryosieve.align.gold_standard import (
        GoldStandardResult,
        Iteration,
        particle_diameter,
        refine_gold_standard,
    )
    from cryosieve.align.noise import NoiseSpectrum, noise_spectrum
    from cryosieve.align.orientations import SearchLevels, angle_between, search_levels
    from cryosieve.align.references import HalfReference, half_reference, quarter_labels
    from cryosieve.align.search import Found, HalfSearch, SearchTask, moved, search_rows
    from cryosieve.align.settings import ENGINES, LOWEST_RESOLUTION, GoldStandardSettings, SearchSettings

_WHERE = (dict.fromkeys(("GoldStandardResult", "Iteration", "particle_diameter", "refine_gold_standard"),
                        "gold_standard")
          | dict.fromkeys(("NoiseSpectrum", "noise_spectrum"), "noise")
          | dict.fromkeys(("SearchLevels", "angle_between", "search_levels"), "orientations")
          | dict.fromkeys(("HalfReference", "half_reference", "quarter_labels"), "references")
          | dict.fromkeys(("Found", "HalfSearch", "SearchTask", "moved", "search_rows"), "search")
          | dict.fromkeys(("ENGINES", "LOWEST_RESOLUTION", "GoldStandardSettings", "SearchSettings"), "settings"))
__getattr__ = lazy_names(__name__, _WHERE)

__all__ = [
    "ENGINES", "LOWEST_RESOLUTION", "Found", "GoldStandardResult", "GoldStandardSettings", "HalfReference",
    "HalfSearch", "Iteration", "NoiseSpectrum", "SearchLevels", "SearchSettings", "SearchTask", "angle_between",
    "half_reference", "moved", "noise_spectrum", "particle_diameter", "quarter_labels", "refine_gold_standard",
    "search_levels", "search_rows",
]
