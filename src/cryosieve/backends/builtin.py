"""The built-in back-ends: :mod:`cryosieve.reconstruct` and :mod:`cryosieve.postprocess`, in-process."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryosieve.backends import HalfMapJob, PostprocessJob
from cryosieve.io.atomic import OutputGroup
from cryosieve.io.mrc import read_volume, write_volume_to
from cryosieve.io.stack import StackReader
from cryosieve.postprocess import PostprocessReport
from cryosieve.progress import ProgressFactory

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
        from cryosieve.postprocess import postprocess, write_postprocess

        half1, half2 = (read_volume(path) for path in job.half_maps)
        result = postprocess(half1.data, half2.data, job.mask.data, job.pixel_size, auto_bfactor=True,
                             autob_lowres=self.autob_lowres, device=self.device)
        with OutputGroup() as group:
            folder = group.folder_for(job.folder)
            write_postprocess(result, str(folder / job.root_name), job.pixel_size)
        return result.report(job.pixel_size)
