"""The gold-standard iterations: refine poses, reconstruct both halves, post-process, until it stops paying.

:func:`refine_gold_standard` starts from the half maps of the given poses and repeats, at most
``iterations`` times:

1. for each half-set still refining, its reference (:mod:`cryosieve.align.references`: its own masked half
   map, weighted by its own estimate of the half-map FSC, limited to its own current resolution), its noise
   spectrum (:mod:`cryosieve.align.noise`) and its levels (:mod:`cryosieve.align.orientations`: down to the
   finest step the settings and its resolution allow);
2. the local search of every particle of those half-sets (:class:`cryosieve.align.search.SearchTask`; every
   rank of a ``torchrun`` job searches its share);
3. the quarter and half maps with the new poses (one pass: :func:`cryosieve.reconstruct.reconstruct_subsets`
   with unions);
4. the post-processing of the two half maps (the resolution at FSC 0.143 of the phase-randomisation-corrected
   FSC, reported for the iteration);
5. a half-set stops when its own resolution did not improve (nor, at Nyquist, its FSC), or when fewer than
   ``MOVED_FRACTION`` of its particles moved by more than its finest step; its poses stay as they are from
   then on.

Each half-set thus decides everything from its own particles only (its mask too, when none is given: one
made around its own first map), and the two meet only in the post-processing: changing the images of one
half-set leaves every pose of the other unchanged, bit for bit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cryosieve.align.noise import noise_spectrum
from cryosieve.align.orientations import angle_between, search_levels
from cryosieve.align.references import HalfReference, half_reference, quarter_labels
from cryosieve.align.search import Found, HalfSearch, SearchTask, moved
from cryosieve.align.settings import GoldStandardSettings
from cryosieve.errors import CryoSieveInputError
from cryosieve.fourier import centred_coordinates
from cryosieve.geometry import euler_to_matrix
from cryosieve.io.stack import StackReader
from cryosieve.mask import soft_mask
from cryosieve.particles import ParticleSet
from cryosieve.progress import ProgressFactory, no_progress
from cryosieve.world import current as current_world

log = logging.getLogger("cryosieve")

#: A half-set stops once fewer than this fraction of its particles moved by more than the finest step.
MOVED_FRACTION = 0.01
#: The two half-sets.
HALVES = (1, 2)


@dataclass
class Iteration:
    """What one iteration did: ``resolution`` (Å, of the post-processed half maps; ``None`` where the FSC never
    reached 0.143), and per half-set refined in it: its own ``half_resolution`` before and after (Å), the
    ``finest_step`` (degrees), the ``moved`` fraction (beyond that step), the median turn (degrees) and move
    of the origin (pixels), and whether it goes on."""

    iteration: int
    resolution: float | None
    half_resolution_before: dict[int, float]
    half_resolution: dict[int, float]
    finest_step: dict[int, float]
    moved: dict[int, float]
    median_angle: dict[int, float]
    median_shift: dict[int, float]
    continues: dict[int, bool]

    def rows(self) -> list[dict[str, object]]:
        """One table row per half-set refined in this iteration."""
        return [{"iteration": self.iteration, "half_set": half,
                 "resolution (A)": math.nan if self.resolution is None else self.resolution,
                 "half-set resolution before (A)": self.half_resolution_before[half],
                 "half-set resolution after (A)": self.half_resolution[half],
                 "finest step (deg)": self.finest_step[half], "moved beyond the finest step": self.moved[half],
                 "median turn (deg)": self.median_angle[half], "median origin move (px)": self.median_shift[half],
                 "continues": self.continues[half]} for half in sorted(self.moved)]


@dataclass
class GoldStandardResult:
    """The refined ``particles`` (every column of the input, poses and origins replaced), their final
    ``maps`` (``{1: half map, 2: half map}``, ``(n, n, n)`` float32), the ``history`` of iterations, and how far
    each particle moved from its given pose: ``angle`` ``(n,)`` degrees and ``shift`` ``(n, 2)`` pixels (x, y)."""

    particles: ParticleSet
    maps: dict[int, np.ndarray]
    history: list[Iteration]
    angle: np.ndarray
    shift: np.ndarray


def particle_diameter(mask: np.ndarray, pixel_size: float) -> float:
    """The particle's diameter (Å) a mask implies: twice the largest distance from the box centre of a voxel
    where the mask is at least one half, at most the box."""
    box = int(mask.shape[-1])
    axis: np.ndarray = centred_coordinates(box) ** 2
    radius2 = axis[:, None, None] + axis[None, :, None] + axis[None, None, :]
    inside = mask >= 0.5
    if not inside.any():
        return box * pixel_size
    return float(min(2 * math.sqrt(float(radius2[inside].max())) * pixel_size, box * pixel_size))


def check_particles(table: ParticleSet) -> None:
    """A set the refinement can take: both half-sets (``rlnRandomSubset`` 1 and 2, nothing else) and one
    pixel size."""
    if table.random_subset is None:
        raise CryoSieveInputError(f"{table.path}: column rlnRandomSubset missing (the gold standard refines "
                                  "two half-sets)")
    present = set(np.unique(table.random_subset).tolist())
    if present != set(HALVES):
        raise CryoSieveInputError(f"{table.path}: rlnRandomSubset must hold 1 and 2 (found "
                                  f"{', '.join(str(value) for value in sorted(present))})")
    pixel = table.pixel_size
    if np.any(np.abs(pixel - pixel[0]) > 1e-6 * pixel[0]):
        raise CryoSieveInputError(f"{table.path}: particles of different pixel sizes; refine them one by one")


def _maps(table: ParticleSet, reader: StackReader, settings: GoldStandardSettings,
          progress: Callable[[int], None] | None) -> dict[int, np.ndarray]:
    """Quarter maps (``11, 12, 21, 22``) and half maps (``1, 2``) of the current poses, in one pass."""
    assert table.random_subset is not None
    from cryosieve.reconstruct import reconstruct_subsets

    split = table.with_values(random_subset=quarter_labels(table.random_subset))
    return reconstruct_subsets(split, reader, subsets=(11, 12, 21, 22), unions={1: (11, 12), 2: (21, 22)},
                               symmetry=settings.symmetry, batch_size=settings.reconstruct_batch_size,
                               device=str(settings.search.device), progress=progress)


def _reference(maps: dict[int, np.ndarray], half: int, mask: np.ndarray, pixel: float,
               settings: GoldStandardSettings) -> HalfReference:
    return half_reference(maps[half], (maps[10 * half + 1], maps[10 * half + 2]), mask, pixel,
                          settings.lowest_resolution)


def _joint_resolution(maps: dict[int, np.ndarray], mask: np.ndarray | None, pixel: float,
                      device: object) -> float | None:
    """The post-processed resolution (Å) of the two half maps, with ``mask`` or one made around their average;
    ``None`` where the FSC never reaches 0.143 (or never falls below 0.8)."""
    from cryosieve.postprocess import postprocess

    if mask is None:
        mask = soft_mask((maps[1] + maps[2]) / 2, pixel)
    try:
        result = postprocess(maps[1], maps[2], mask, pixel, auto_bfactor=False, device=device)  # type: ignore[arg-type]
    except CryoSieveInputError:
        return None
    return float(result.resolution)


def refine_gold_standard(table: ParticleSet, reader: StackReader, mask: np.ndarray | None,
                         settings: GoldStandardSettings, progress: ProgressFactory = no_progress
                         ) -> GoldStandardResult:
    """Refine the poses and origins of ``table`` (images from ``reader``) by local searches, each half-set
    against its own half map (see the module's text).

    ``mask``: ``(n, n, n)`` in [0, 1], the post-processing mask, which masks the references too; ``None``: each
    half-set masks its references with a mask made around its own first half map, and the post-processing of
    each iteration with one around the two maps' average. In a ``torchrun`` job, call it on rank 0.
    """
    settings.check()
    check_particles(table)
    assert table.random_subset is not None
    box = reader.validate()
    pixel = float(table.pixel_size[0])
    if mask is not None and mask.shape != (box,) * 3:
        raise CryoSieveInputError(f"mask: box {mask.shape[0]} does not match the particles' {box}")
    rows = {half: np.flatnonzero(table.random_subset == half) for half in HALVES}
    start = table
    with progress("reconstruct", len(table)) as update:
        maps = _maps(table, reader, settings, update)
    masks = {half: mask if mask is not None else soft_mask(maps[half], pixel) for half in HALVES}
    diameters = {half: settings.particle_diameter or particle_diameter(masks[half], pixel) for half in HALVES}
    references = {half: _reference(maps, half, masks[half], pixel, settings) for half in HALVES}
    active = dict.fromkeys(HALVES, True)
    history: list[Iteration] = []
    world = current_world()
    for iteration in range(1, settings.iterations + 1):
        halves: dict[int, tuple[np.ndarray, HalfSearch]] = {}
        for half in HALVES:
            if not active[half]:
                continue
            reference = references[half]
            noise = noise_spectrum(table, reader, rows[half], reference.projector(settings.search.device),
                                   reference.limit, batch_size=settings.search.batch_size)
            levels = search_levels(settings.search.search_range, settings.search.angular_step,
                                   reference.resolution, diameters[half], reference.limit, box, pixel)
            halves[half] = (rows[half], HalfSearch(reference, noise, levels))
            log.info("iteration %d, half-set %d: resolution %.2f Å, search up to %.2f Å, steps %s degrees",
                     iteration, half, reference.resolution, box * pixel / reference.limit,
                     ", ".join(f"{step:.3g}" for step in levels.steps))
        searched = sum(len(members) for members, _ in halves.values())
        with progress(f"search {iteration}", searched) as update:
            found = world.run(SearchTask(table, reader.directory, halves, settings.search, update))
        table = _with_found(table, found, [members for members, _ in halves.values()])
        with progress("reconstruct", len(table)) as update:
            maps = _maps(table, reader, settings, update)
        resolution = _joint_resolution(maps, mask, pixel, settings.search.device)
        record = Iteration(iteration, resolution, {}, {}, {}, {}, {}, {}, {})
        for half, (members, search) in halves.items():
            previous = references[half]
            before = previous.resolution
            references[half] = _reference(maps, half, masks[half], pixel, settings)
            finest = search.levels.finest
            moved_fraction = float(np.mean(found.angle()[members] > finest)) if len(members) else 0.0
            active[half] = references[half].better_than(previous) and moved_fraction >= MOVED_FRACTION
            record.half_resolution_before[half] = before
            record.half_resolution[half] = references[half].resolution
            record.finest_step[half] = finest
            record.moved[half] = moved_fraction
            record.median_angle[half] = float(np.median(found.angle()[members]))
            record.median_shift[half] = float(np.median(found.distance()[members]))
            record.continues[half] = active[half] and iteration < settings.iterations
        history.append(record)
        log.info("iteration %d: resolution %s; %s", iteration,
                 "not reached" if resolution is None else f"{resolution:.2f} Å",
                 "; ".join(f"half-set {half}: {record.moved[half]:.1%} moved beyond {record.finest_step[half]:.2g}°, "
                           f"own resolution {record.half_resolution[half]:.2f} Å" for half in sorted(record.moved)))
        if not any(active.values()):
            break
    initial = euler_to_matrix(start.rot, start.tilt, start.psi)
    final = euler_to_matrix(table.rot, table.tilt, table.psi)
    shift = np.stack([table.origin_x - start.origin_x, table.origin_y - start.origin_y], axis=1)
    return GoldStandardResult(particles=table, maps={half: maps[half] for half in HALVES}, history=history,
                              angle=angle_between(final, initial), shift=shift)


def _with_found(table: ParticleSet, found: Found, searched: list[np.ndarray]) -> ParticleSet:
    """``table`` with the poses found for the rows ``searched`` (the others keep theirs exactly)."""
    rows = np.concatenate(searched) if searched else np.zeros(0, dtype=np.int64)
    if not len(rows):
        return table
    updated = moved(table.subset(rows), Found(found.vector[rows], found.shift[rows], found.score[rows]))
    values = {name: getattr(table, name).copy() for name in ("rot", "tilt", "psi", "origin_x", "origin_y")}
    for name in values:
        values[name][rows] = getattr(updated, name)
    return table.with_poses(values["rot"], values["tilt"], values["psi"], values["origin_x"], values["origin_y"])
