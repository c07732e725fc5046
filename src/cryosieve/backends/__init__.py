"""Back-ends of the pipeline's reconstruction and post-processing steps.

Each step is a small protocol, so that a new back-end touches nothing else:

* :class:`Reconstructor`: the two half maps of a particle set
  (:class:`~cryosieve.backends.builtin.BuiltinReconstructor`,
  :class:`~cryosieve.backends.relion.RelionReconstructor`);
* :class:`PostProcessor`: resolution, B-factor and FSC of two half maps, as a
  :class:`~cryosieve.postprocess.PostprocessReport`, leaving the same report files whatever
  runs (:class:`~cryosieve.backends.builtin.BuiltinPostProcessor`,
  :class:`~cryosieve.backends.relion.RelionPostProcessor`).

A back-end's :meth:`describe` is recorded with a run: resuming with another one is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cryosieve.io.mrc import Volume
from cryosieve.progress import ProgressFactory

if TYPE_CHECKING:
    from cryosieve.particles import ParticleSet
    from cryosieve.postprocess import PostprocessReport


@dataclass(frozen=True)
class HalfMapJob:
    """Reconstruct half-sets 1 and 2 of a particle set.

    ``particles`` and ``star`` are the same particles (in memory and as the STAR file an
    external program reads); image names are relative to ``directory`` (``None``: the current
    folder); ``outputs`` and ``logs`` are per half-set; ``pixel_size`` in Å.
    """

    particles: ParticleSet
    star: Path
    directory: Path | None
    outputs: tuple[Path, Path]
    logs: tuple[Path, Path]
    pixel_size: float
    symmetry: str


@dataclass(frozen=True)
class PostprocessJob:
    """Post-process two half maps with a mask into ``folder / root_name.*`` (``folder`` appears whole
    or not at all); ``log``: where an external program's output goes; ``pixel_size`` in Å."""

    half_maps: tuple[Path, Path]
    mask: Volume
    pixel_size: float
    folder: Path
    root_name: str
    log: Path


class Reconstructor(Protocol):
    """Makes the two half maps of a particle set."""

    def describe(self) -> str:
        """What reconstructs (recorded with the run)."""

    def reconstruct_half_maps(self, job: HalfMapJob, progress: ProgressFactory) -> None:
        """Write ``job.outputs``, both or neither."""


class PostProcessor(Protocol):
    """Measures two half maps."""

    def describe(self) -> str:
        """What post-processes (recorded with the run)."""

    def postprocess(self, job: PostprocessJob) -> PostprocessReport:
        """Write ``job.folder`` (with :data:`cryosieve.postprocess.REPORT_FILES` among its files) and
        return what it measured."""


__all__ = ["HalfMapJob", "PostProcessor", "PostprocessJob", "Reconstructor"]
