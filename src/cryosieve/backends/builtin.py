"""The built-in back-ends: :mod:`cryosieve.reconstruct` and :mod:`cryosieve.postprocess`, in-process."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cryosieve.backends import HalfMapJob, PostprocessJob, RefinementJob, RefinementResult
from cryosieve.errors import CryoSieveInputError
from cryosieve.io.atomic import OutputGroup
from cryosieve.io.mrc import read_volume, write_volume, write_volume_to
from cryosieve.io.stack import StackReader
from cryosieve.mask import check_mask, soft_mask
from cryosieve.postprocess.report import PostprocessReport
from cryosieve.progress import ProgressFactory

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
