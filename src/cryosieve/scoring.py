"""Scoring the particles of one shard: the loop over batches of a stack against the references.

Particles are scored half-set by half-set against their half-set's reference, in batches,
with the Fourier scorer (:mod:`cryosieve.score`) or the published one
(:mod:`cryosieve.published`). A worker of a multi-process run
(:mod:`cryosieve.distributed`, or a rank of a ``torchrun`` job, :class:`ScoreTask`) scores
its contiguous run of the batches; the batches are the same whatever the split, so the scores
are the same to the bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cryosieve import _kernels
from cryosieve.band import HighPass
from cryosieve.fsc import filter_by_shell, fsc_weight
from cryosieve.io.stack import BatchImages, StackReader, images_on, prefetch_batches
from cryosieve.particles import ParticleSet
from cryosieve.precision import map_device
from cryosieve.projection import FourierSliceProjector
from cryosieve.published import published_batch, published_scores
from cryosieve.score import BandSamples, ParticleBatch, fourier_scores
from cryosieve.world import job_progress

if TYPE_CHECKING:
    from cryosieve.world import World


@dataclass(frozen=True)
class ScoringOptions:
    """How to score: cut-off ``highpass_angstrom`` (Å), ``projector`` (``"fourier"`` or
    ``"realspace"``), particles per batch, device, and the Fourier scorer's ``engine``
    (:data:`cryosieve.score.ENGINES`)."""

    highpass_angstrom: float
    projector: str = "fourier"
    batch_size: int = 256
    device: Any = "cpu"
    engine: str = "auto"


#: Rows are put in viewing-direction order within chunks of this many particles (see below).
DIRECTION_ORDER_CHUNK = 4096


def viewing_direction_order(rot: np.ndarray, tilt: np.ndarray, chunk: int = DIRECTION_ORDER_CHUNK,
                            bands: int = 24) -> np.ndarray:
    """A permutation that puts particles of similar viewing direction next to each other.

    A particle's central slice depends only on its viewing direction (``rot``, ``tilt``;
    ``psi`` turns the image within the slice), so scoring neighbours in direction one
    after another reuses the cached grid lines of the half map's transform (measured
    1.3x at box 128 on 2 cores). Within each chunk of ``chunk`` consecutive particles,
    the sphere of directions is cut into ``bands`` bands of equal area by ``cos(tilt)``,
    walked back and forth in ``rot``. Chunks keep the stack reads mostly sequential.
    Scores do not depend on the order; only the speed does.

    ``rot``, ``tilt``: ``(n,)`` degrees. Returns ``(n,)`` int64 indices.
    """
    order = np.empty(len(rot), dtype=np.int64)
    for start in range(0, len(rot), chunk):
        stop = min(start + chunk, len(rot))
        height = np.cos(np.radians(tilt[start:stop]))
        band = np.minimum(((height + 1) / 2 * bands).astype(np.int64), bands - 1)
        walk = np.where(band % 2 == 0, rot[start:stop], -rot[start:stop])
        order[start:stop] = start + np.lexsort((walk, band))
    return order


def shard_batches(rows: np.ndarray, batch_size: int, rank: int, world_size: int) -> list[np.ndarray]:
    """Batches of ``rows`` for one worker: the ``rank``-th of ``world_size`` contiguous runs of batches
    (nearly equal in number), so each worker reads its own stretch of the stacks.

    Batch boundaries are the same whatever the number of workers, so every particle is
    scored in the same batch (and to the same bits) by any split.
    """
    batches = [rows[start:start + batch_size] for start in range(0, len(rows), batch_size)]
    bounds = np.linspace(0, len(batches), world_size + 1).round().astype(np.int64)
    return batches[bounds[rank]:bounds[rank + 1]]


def score_rows(table: ParticleSet, reader: StackReader, references: Sequence[np.ndarray],
               half_set: np.ndarray, settings: ScoringOptions, *, rank: int = 0, world_size: int = 1,
               volume_pixel_size: float | None = None, reference_fsc: np.ndarray | None = None,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Score the particles of this worker's shard; other entries of the result stay zero.

    ``references``: the ``(n, n, n)`` masked half maps, one per half-set (``half_set`` ``(n,)``
    holds 1, 2...); ``reference_fsc``: the per-shell FSC to weight them by, or ``None``;
    ``volume_pixel_size``: their voxel size (Å). Returns ``(n,)`` float64.
    """
    device = torch.device(settings.device)
    scores = np.zeros(len(table), dtype=np.float64)
    box = references[0].shape[-1]
    weight = torch.from_numpy(fsc_weight(reference_fsc)) if reference_fsc is not None else None
    lowest = HighPass(settings.highpass_angstrom).cycles_per_pixel(float(np.min(table.pixel_size)))
    samples = BandSamples(box, lowest, device) if settings.projector == "fourier" else None
    pending: list[tuple[np.ndarray, torch.Tensor]] = []  # a device's scores of the current half-set
    for subset_number in sorted(set(half_set.tolist())):
        rows = np.flatnonzero(half_set == subset_number)
        if settings.projector == "fourier":
            rows = rows[viewing_direction_order(table.rot[rows], table.tilt[rows])]
        reference = references[subset_number - 1]
        if settings.projector == "fourier":
            # the grid is built where whole maps are handled (the CPU for a device without float64)
            projector = FourierSliceProjector(torch.from_numpy(reference).to(map_device(device)),
                                              spectrum_weight=weight).to(device)
        else:
            volume_tensor = torch.from_numpy(reference).to(device=device, dtype=torch.float64)
            if weight is not None:
                volume_tensor = filter_by_shell(volume_tensor, weight.to(device))
        # On the CPU the scorer keeps every core busy: read each batch in turn, and for the
        # Fourier scorer slice by slice as it transforms them (see prefetch_batches).
        on_cpu = device.type == "cpu"
        kernel = settings.projector == "fourier" and on_cpu and settings.engine != "torch" and _kernels.AVAILABLE
        for batch_rows, images in prefetch_batches(reader, shard_batches(rows, settings.batch_size, rank, world_size),
                                                   background=not on_cpu, on_demand=kernel,
                                                   pinned=device.type == "cuda"):
            if settings.projector == "fourier":
                batch = ParticleBatch.from_table(table, batch_rows, settings.highpass_angstrom, device)
                image_input = images if isinstance(images, BatchImages) else images_on(images, device)
                assert samples is not None  # made above for the Fourier scorer
                values = fourier_scores(projector, image_input, batch, samples, volume_pixel_size, settings.engine)
            else:
                batch = published_batch(table, batch_rows, settings.highpass_angstrom, device)
                assert not isinstance(images, BatchImages)  # read on demand for the Fourier kernel only
                values = published_scores(volume_tensor, images_on(images, device), batch)
            if on_cpu:
                scores[batch_rows] = values.numpy()
            else:  # kept on the device until the half-set is done: no wait for the device at every batch
                pending.append((batch_rows, values))
            if progress is not None:
                progress(len(batch_rows))
        if pending:
            gathered = torch.cat([values for _, values in pending]).cpu().double().numpy()
            scores[np.concatenate([batch_rows for batch_rows, _ in pending])] = gathered
            pending.clear()
        if settings.projector == "fourier":
            del projector
    return scores


@dataclass
class ScoreTask:
    """Scoring as a task of a ``torchrun`` job (:mod:`cryosieve.world`): every rank scores its run of
    batches (:func:`score_rows`) and the scores are summed on rank 0. Fields as for :func:`score_rows`;
    ``progress`` (rank 0 only, not sent) counts rank 0's particles times the number of ranks."""

    table: ParticleSet
    directory: Any
    references: Sequence[np.ndarray]
    half_set: np.ndarray
    options: ScoringOptions
    volume_pixel_size: float | None
    reference_fsc: np.ndarray | None
    progress: Callable[[int], None] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["progress"] = None
        return state

    def run(self, world: World) -> np.ndarray:
        """``(n,)`` float64 scores of every particle on rank 0 (this rank's share elsewhere)."""
        scores = np.zeros(len(self.table), dtype=np.float64)
        error: BaseException | None = None
        update = self.progress
        try:
            options = replace(self.options, device=world.device(self.options.device))
            with StackReader(self.table, self.directory) as reader:
                scores = score_rows(self.table, reader, self.references, self.half_set, options, rank=world.rank,
                                    world_size=world.size, volume_pixel_size=self.volume_pixel_size,
                                    reference_fsc=self.reference_fsc,
                                    progress=job_progress(update, world, len(self.table)))
        except Exception as raised:
            error = raised
        world.check(error)
        world.sum_to_root(scores)
        return scores
