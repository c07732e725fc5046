"""Back-ends of the pipeline's reconstruction and post-processing steps.

Each step is a small protocol, so that a new back-end touches nothing else:

* :class:`Reconstructor`: the two half maps of a particle set
  (:class:`~cryosieve.backends.builtin.BuiltinReconstructor`,
  :class:`~cryosieve.backends.relion.RelionReconstructor`);
* :class:`PostProcessor`: resolution, B-factor and FSC of two half maps, as a
  :class:`~cryosieve.postprocess.PostprocessReport`, leaving the same report files whatever
  runs (:class:`~cryosieve.backends.builtin.BuiltinPostProcessor`,
  :class:`~cryosieve.backends.relion.RelionPostProcessor`);
* :class:`Refiner`: resolution and B-factor of a particle set, with its poses re-estimated
  (:class:`~cryosieve.backends.relion.RelionRefiner`) or as given
  (:class:`~cryosieve.backends.builtin.FixedPoseRefiner`, an optimistic estimate).

A back-end's :meth:`describe` is recorded with a run: resuming with another one is refused.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cryosieve.io.mrc import Volume
from cryosieve.progress import ProgressFactory

if TYPE_CHECKING:
    from cryosieve.particles import ParticleSet
    from cryosieve.postprocess.report import PostprocessReport


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


#: Fewest particles per half-set of any set refined (smaller sets give no usable FSC).
MIN_PER_HALF_SET = 10


@dataclass(frozen=True)
class RefinementJob:
    """Refine the particles of ``particles_star`` in ``folder`` (made, and removed on failure, by the caller).

    ``directory``: the folder image names are relative to (``None``: the current one); ``symmetry``:
    canonical point group; ``pixel_size`` in Å; ``reference``: initial map, or ``None`` to make one
    from the particles with their given poses; ``ini_high``: its low-pass, Å (``None``: not given, each
    back-end's default); ``mask``: for
    post-processing, or ``None`` to make one around the refined map; ``particle_diameter``: Å
    (``None``: 90 % of the box); ``local``: search only around the given poses; ``seed``: of the
    back-end's random choices; ``log``: where an external program's output goes (outside
    ``folder``, so that it outlives a failure); ``group``: jobs of the same group refine the same particles
    (trials of one set), so a back-end may share work between them (``None``: none shared).
    """

    particles_star: Path
    folder: Path
    directory: Path | None
    symmetry: str
    pixel_size: float
    box: int
    reference: Path | None
    ini_high: float | None
    mask: Path | None
    particle_diameter: float | None
    local: bool
    seed: int
    log: Path
    source: Path | None = None
    particles_cs: Path | None = None
    group: str | None = None


@dataclass(frozen=True)
class RefinementResult:
    """What a refinement measured: ``particles`` refined, ``resolution_angstrom`` at FSC 0.143 of the
    phase-randomisation-corrected FSC (``None``: not reached), the post-processing ``bfactor`` (Å^2),
    ``alignment_star``: the refined particles' STAR file, relative to the job's folder,
    ``fixed_pose``: the given poses were used as they are (an optimistic estimate), and ``mask``: the mask of
    the post-processing (the file given, or one of the job's own by its name in the job's folder and how it
    came to be: ``mask.mrc (made around the refined map)``)."""

    particles: int
    resolution_angstrom: float | None
    bfactor: float
    alignment_star: str
    fixed_pose: bool
    mask: str = ""


class Refiner(Protocol):
    """Measures a particle set, with its poses re-estimated or not."""

    def describe(self) -> str:
        """What refines (recorded with each job)."""

    def plan(self, job: RefinementJob) -> list[str]:
        """The steps or command lines :meth:`refine` would run (for a dry run)."""

    def refine(self, job: RefinementJob, progress: ProgressFactory) -> RefinementResult:
        """Refine, writing into ``job.folder``."""


class RemoteRefiner(Refiner, Protocol):
    """A refiner whose work runs elsewhere (a CryoSPARC server): its jobs run in threads of the command,
    which only wait, and stop when ``stop`` is set."""

    remote: bool

    def prepare(self, sources: list[Path], dry_run: bool) -> None:
        """Check, before any job, that every input can be refined (and, unless ``dry_run``, that the
        server is there); raises :class:`~cryosieve.errors.CryoSieveInputError`."""

    def expect(self, groups: Sequence[str]) -> None:
        """Be told the group (:attr:`RefinementJob.group`) of each set this run refines (for the done/total
        counts of its log)."""

    def for_origin(self, path: Path) -> RemoteRefiner:
        """The refiner of sets drawn from the particle file ``path`` (a CryoSPARC ``.cs`` file: its job)."""

    def refine_until(self, job: RefinementJob, stop: threading.Event) -> RefinementResult:
        """:meth:`refine`, giving up (and stopping its remote work) once ``stop`` is set."""


def is_remote(refiner: Refiner) -> bool:
    """Whether ``refiner`` is a :class:`RemoteRefiner`."""
    return bool(getattr(refiner, "remote", False))


__all__ = ["MIN_PER_HALF_SET", "HalfMapJob", "PostProcessor", "PostprocessJob", "Reconstructor", "RefinementJob",
           "RefinementResult", "Refiner", "RemoteRefiner", "is_remote"]
