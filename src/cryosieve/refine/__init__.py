"""Measuring particle sets with their poses re-estimated: ``cryosieve-refine`` and ``cryosieve-rhbfactor``.

A resolution measured with the poses of the original refinement is biased: those poses
were found against a map that included the particles sieved since. :func:`refine_files`
re-estimates them (a :class:`~cryosieve.backends.Refiner`: RELION's gold-standard
auto-refinement, or, fast and optimistic, the given poses) and reports resolution and
B-factor; :func:`rhbfactor_files` fits the Rosenthal-Henderson B-factor over nested random
subsets. Modules: :mod:`~cryosieve.refine.inputs` (which STAR files),
:mod:`~cryosieve.refine.rh` (subsets and the fits), :mod:`~cryosieve.refine.jobs` (jobs in
worker processes and folders of their own, resumable), :mod:`~cryosieve.refine.api` (the
two commands from files to files).
"""

from typing import TYPE_CHECKING

from cryosieve._lazy import lazy_names

if TYPE_CHECKING:
    from cryosieve.refine.api import RefineSettings, refine_files, rhbfactor_files

__getattr__ = lazy_names(__name__, dict.fromkeys(("RefineSettings", "refine_files", "rhbfactor_files"), "api"))

__all__ = ["RefineSettings", "refine_files", "rhbfactor_files"]
