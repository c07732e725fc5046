"""The built-in back-ends: :mod:`cryosieve.reconstruct` and :mod:`cryosieve.postprocess`, in-process."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cryosieve.backends import HalfMapJob, PostprocessJob, RefinementJob, RefinementResult
from cryosieve.errors import CryoSieveInputError
from cryosieve.io.atomic import OutputGroup
from cryosieve.io.mrc import read_volume, write_volume, write_volume_to
from cryosieve.io.stack import StackReader
from cryosieve.mask import check_mask, soft_mask
from cryosieve.postprocess.report import PostprocessReport
from cryosieve.progress import ProgressFactory

if TYPE_CHECKING:
    from cryosieve.align.settings import GoldStandardSettings, SearchSettings

log = logging.getLogger("cryosieve")

#: Lowest resolution (Å) of the automatic B-factor fit, as the published program asks RELION.
AUTOB_LOWRES = 10.0


@dataclass(frozen=True)
class BuiltinReconstructor:
    """Direct Fourier inversion (:func:`cryosieve.reconstruct.reconstruct_subsets`), ``batch_size``
    images at a time, on ``device``."""

    device: Any = "cpu"
    batch_size: int = 128

    def describe(self) -> str:
        return "built-in"

    def reconstruct_half_maps(self, job: HalfMapJob, progress: ProgressFactory) -> None:
        from cryosieve.reconstruct import reconstruct_subsets

        with StackReader(job.particles, job.directory) as reader, \
                progress("reconstruct", len(job.particles)) as update:
            maps = reconstruct_subsets(job.particles, reader, subsets=(1, 2), symmetry=job.symmetry, apply_ctf=True,
                                       batch_size=self.batch_size, device=self.device, progress=update)
        with OutputGroup() as group:
            for subset, output in zip((1, 2), job.outputs, strict=True):
                write_volume_to(group.path_for(output), maps[subset], job.pixel_size)


@dataclass(frozen=True)
class BuiltinPostProcessor:
    """:func:`cryosieve.postprocess.postprocess` with an automatic B-factor fitted from
    ``autob_lowres`` Å, on ``device``."""

    device: Any = "cpu"
    autob_lowres: float = AUTOB_LOWRES

    def describe(self) -> str:
        return "built-in"

    def postprocess(self, job: PostprocessJob) -> PostprocessReport:
        from cryosieve.postprocess.compute import postprocess
        from cryosieve.postprocess.files import write_postprocess

        half1, half2 = (read_volume(path) for path in job.half_maps)
        result = postprocess(half1.data, half2.data, job.mask.data, job.pixel_size, auto_bfactor=True,
                             autob_lowres=self.autob_lowres, device=self.device)
        with OutputGroup() as group:
            folder = group.folder_for(job.folder)
            write_postprocess(result, str(folder / job.root_name), job.pixel_size)
        return result.report(job.pixel_size)


def measure_half_maps(half_maps: tuple[Path, Path], job: RefinementJob, device: Any = "cpu",
                      around: Path | None = None) -> PostprocessReport:
    """Post-process a refinement's half maps in ``job.folder / "postprocess"`` with ``job.mask``, or with a
    soft mask made around ``around`` (a map; the average of the half maps when ``None``), written to
    ``job.folder / "mask.mrc"``."""
    if job.mask is not None:
        mask = read_volume(job.mask, what="mask")
        # a mask of the job's own (CryoSPARC's FSC mask, downloaded) by its name in the job's folder
        used = job.mask.name if job.mask.parent == job.folder else str(job.mask)
    else:
        if around is not None:
            data = read_volume(around).data
        else:
            first, second = (read_volume(path).data for path in half_maps)
            data = (first + second) / 2
        path = job.folder / "mask.mrc"
        write_volume(path, soft_mask(data, job.pixel_size), job.pixel_size)
        mask = read_volume(path, what="mask")
        used = f"{path.name} (made around the {'refined map' if around is not None else 'half maps'})"
        log.info("no --mask given: post-processed with %s", used)
    check_mask(mask, (job.box,) * 3, job.pixel_size, against="the particles")
    from cryosieve.postprocess.compute import postprocess
    from cryosieve.postprocess.files import write_postprocess

    maps = [read_volume(path).data for path in half_maps]
    try:
        result = postprocess(maps[0], maps[1], mask.data, job.pixel_size, auto_bfactor=True,
                             autob_lowres=AUTOB_LOWRES, device=device)
    except CryoSieveInputError as error:
        if "autob_lowres" not in error.fields():
            raise
        # a set too small to reach the fit's range (the Rosenthal-Henderson subsets): its resolution
        # still counts, without a B-factor
        result = postprocess(maps[0], maps[1], mask.data, job.pixel_size, auto_bfactor=False, device=device)
        result.bfactor = float("nan")
    with OutputGroup() as group:
        folder = group.folder_for(job.folder / "postprocess")
        write_postprocess(result, str(folder / "postprocess"), job.pixel_size)
    report = result.report(job.pixel_size)
    report.summary["mask"] = used
    return report


def result_of(report: PostprocessReport, particles: int, alignment_star: str, fixed_pose: bool) -> RefinementResult:
    """The :class:`RefinementResult` of a post-processing report (:func:`measure_half_maps`: with its mask)."""
    resolution = report.summary.get("final_resolution_angstrom")
    bfactor = report.summary.get("bfactor")
    return RefinementResult(
        particles=particles,
        resolution_angstrom=float(resolution) if isinstance(resolution, (int, float)) and np.isfinite(resolution)
        else None,
        bfactor=float(bfactor) if isinstance(bfactor, (int, float)) else float("nan"),
        alignment_star=alignment_star, fixed_pose=fixed_pose, mask=str(report.summary.get("mask", "")))


@dataclass(frozen=True)
class FixedPoseRefiner:
    """No re-refinement: the half maps of the given poses (built-in reconstruction) and their
    post-processing. Fast; an optimistic estimate, since those poses were found with the other
    particles in the map."""

    device: Any = "cpu"
    batch_size: int = 128

    def describe(self) -> str:
        return "fixed poses (built-in reconstruction and post-processing; optimistic)"

    def plan(self, job: RefinementJob) -> list[str]:
        return [f"built-in reconstruction of the half-sets of {job.particles_star} with their given poses "
                f"(symmetry {job.symmetry})",
                "built-in post-processing of the half maps" + (f" with mask {job.mask}" if job.mask else
                                                                " with a mask made around them")]

    def refine(self, job: RefinementJob, progress: ProgressFactory) -> RefinementResult:
        from cryosieve.io.star import read_particles

        particles = read_particles(job.particles_star)
        half_maps = (job.folder / "half1.mrc", job.folder / "half2.mrc")
        BuiltinReconstructor(self.device, self.batch_size).reconstruct_half_maps(HalfMapJob(
            particles=particles, star=job.particles_star, directory=job.directory, outputs=half_maps,
            logs=(job.log, job.log), pixel_size=job.pixel_size, symmetry=job.symmetry), progress)
        report = measure_half_maps(half_maps, job, self.device)
        return result_of(report, len(particles), job.particles_star.name, fixed_pose=True)


#: The files a built-in refinement leaves in its job's folder (RELION's names where RELION has one).
REFINE_DATA, REFINE_HALVES = "run_data.star", ("run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc")
REFINE_MOVES, REFINE_ITERATIONS = "run_moves.csv", "run_iterations.csv"


def _default_search() -> SearchSettings:
    from cryosieve.align.settings import SearchSettings

    return SearchSettings()


@dataclass(frozen=True)
class BuiltinRefiner:
    """A gold-standard local refinement in-process (:func:`cryosieve.align.refine_gold_standard`): each half-set's
    poses re-estimated around the given ones against its own half map, then the built-in post-processing of
    the final half maps. Leaves, in the job's folder, ``run_data.star`` (the particles with their new poses and
    origins, every other column as given), ``run_half1_class001_unfil.mrc`` and
    ``run_half2_class001_unfil.mrc``, ``postprocess/``, ``run_moves.csv`` (how far each particle moved) and
    ``run_iterations.csv``.

    ``search``: how each particle is searched (its device is the refinement's); at most ``iterations`` rounds.
    """

    search: SearchSettings = field(default_factory=_default_search)
    iterations: int = 5
    #: Under ``torchrun``, its jobs run in rank 0's process and every rank searches and reconstructs a share.
    uses_job_ranks = True

    @property
    def device(self) -> Any:
        """Where it searches, reconstructs and post-processes."""
        return self.search.device

    def describe(self) -> str:
        search = self.search
        return (f"built-in gold-standard local refinement (search range {search.search_range:g} degrees, angular "
                f"step {search.angular_step:g} degrees, shift range {search.shift_range:g} px, at most "
                f"{self.iterations} iterations)")

    def settings(self, job: RefinementJob | None = None) -> GoldStandardSettings:
        """The :class:`cryosieve.align.GoldStandardSettings` of ``job`` (without one: of no particular job)."""
        from cryosieve.align.settings import LOWEST_RESOLUTION, GoldStandardSettings

        if job is None:
            return GoldStandardSettings(search=self.search, iterations=self.iterations)
        return GoldStandardSettings(
            search=self.search, iterations=self.iterations, symmetry=job.symmetry,
            lowest_resolution=LOWEST_RESOLUTION if job.ini_high is None else job.ini_high,
            particle_diameter=job.particle_diameter)

    def check(self, job: RefinementJob | None = None) -> None:
        """Refuse settings this back-end cannot run (:class:`CryoSieveInputError` naming the option)."""
        from cryosieve.errors import setting

        if job is not None and job.reference is not None:
            raise CryoSieveInputError(f"{setting('reference')} {job.reference}: the built-in refinement starts from "
                                      "each half-set's own map of the given poses; leave it out")
        self.settings().check()

    def plan(self, job: RefinementJob) -> list[str]:
        return [f"built-in half maps of {job.particles_star} with its given poses, then up to {self.iterations} "
                f"iterations of local searches (within {self.search.search_range:g} degrees and "
                f"{self.search.shift_range:g} px, down to {self.search.angular_step:g} degrees), each half-set "
                f"against its own half map (symmetry {job.symmetry})",
                "built-in post-processing of run_half1_class001_unfil.mrc and run_half2_class001_unfil.mrc"
                + (f" with mask {job.mask}" if job.mask else " with a mask made around them")]

    def refine(self, job: RefinementJob, progress: ProgressFactory) -> RefinementResult:
        from cryosieve.align import refine_gold_standard
        from cryosieve.io.star import read_particles

        self.check(job)
        particles = read_particles(job.particles_star)
        mask = None
        if job.mask is not None:
            volume = read_volume(job.mask, what="mask")
            check_mask(volume, (job.box,) * 3, job.pixel_size, against="the particles")
            mask = volume.data
        with StackReader(particles, job.directory) as reader:
            outcome = refine_gold_standard(particles, reader, mask, self.settings(job), progress)
        half_maps = tuple(job.folder / name for name in REFINE_HALVES)
        for half, path in zip((1, 2), half_maps, strict=True):
            write_volume(path, outcome.maps[half], job.pixel_size)
        outcome.particles.write(job.folder / REFINE_DATA)
        moves_table(outcome).to_csv(job.folder / REFINE_MOVES, index=False, float_format="%.6g")
        import pandas as pd

        pd.DataFrame([row for record in outcome.history for row in record.rows()]).to_csv(
            job.folder / REFINE_ITERATIONS, index=False, float_format="%.6g")
        report = measure_half_maps((half_maps[0], half_maps[1]), job, self.device)
        return result_of(report, len(particles), REFINE_DATA, fixed_pose=False)


def moves_table(outcome: Any) -> Any:
    """How far each particle moved (a :class:`cryosieve.align.GoldStandardResult`): image name, half-set, the
    turn from its given pose (degrees) and the move of its origin (pixels, and along x and y)."""
    import pandas as pd

    particles = outcome.particles
    return pd.DataFrame({"rlnImageName": particles.image_name, "rlnRandomSubset": particles.random_subset,
                         "angle_degrees": outcome.angle, "origin_pixels": np.hypot(outcome.shift[:, 0],
                                                                                   outcome.shift[:, 1]),
                         "origin_x_pixels": outcome.shift[:, 0], "origin_y_pixels": outcome.shift[:, 1]})
