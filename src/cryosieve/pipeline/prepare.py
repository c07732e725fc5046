"""Everything a run reads and checks before it writes anything: the inputs, the settings, the
output names, the back-ends, the validation's size, and the run's record (what its state file
holds to refuse a resume with changed settings or inputs).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from cryosieve.backends import MIN_PER_HALF_SET, PostProcessor, Reconstructor, Refiner, RemoteRefiner, is_remote
from cryosieve.errors import CryoSieveInputError, setting
from cryosieve.io.mrc import Volume, read_volume
from cryosieve.io.particle_files import format_of, read_particle_file
from cryosieve.io.paths import InputFile, check_outputs
from cryosieve.io.stack import StackReader, stack_paths, stack_record
from cryosieve.mask import check_mask
from cryosieve.particles import ParticleSet
from cryosieve.pipeline.names import OutputNames
from cryosieve.pipeline.settings import PipelineSettings
from cryosieve.pipeline.state import STACKS, sha256
from cryosieve.refine.rh import random_halves, voltage_constant
from cryosieve.schedule import CutoffSchedule
from cryosieve.selection import retained_count
from cryosieve.sieve import check_settings
from cryosieve.symmetry import canonical_name
from cryosieve.tolerances import pixel_sizes_agree

if TYPE_CHECKING:
    from cryosieve.cryosparc.selection import PreparedReturn

#: Seed of the random choice of rows that balances the half-sets (``balance``).
BALANCE_SEED = 0
#: Seed of the random half-sets of ``resplit``.
RESPLIT_SEED = 0


def balanced_rows(random_subset: np.ndarray, seed: int = BALANCE_SEED) -> np.ndarray:
    """Rows (sorted) that leave both half-sets equally large, dropping from the larger one at random.

    ``random_subset``: ``(n,)`` int64 half-set numbers.  Seeded, so the same input always
    gives the same rows.
    """
    groups = np.unique(random_subset)
    members = {int(group): np.flatnonzero(random_subset == group) for group in groups}
    target = min(len(rows) for rows in members.values())
    rng = np.random.default_rng(seed)
    chosen = []
    for group in sorted(members):
        rows = members[group]
        if len(rows) > target:
            rows = np.sort(rng.choice(rows, size=target, replace=False))
        chosen.append(rows)
    return np.sort(np.concatenate(chosen))


@dataclass
class Prepared:
    """Everything read and checked before any output is written."""

    settings: PipelineSettings
    names: OutputNames
    particles: ParticleSet  # the input, as read
    rows0: np.ndarray  # rows of ``particles`` in PREFIX_iter0.star
    box: int
    angpix: float  # Å, of the particles and every map
    symmetry: str  # canonical name
    mask: Volume
    schedule: CutoffSchedule
    reconstructor: Reconstructor
    postprocessor: PostProcessor
    record: dict[str, Any]  # what the state file records of the run (pipeline.state)
    validator: Refiner | None = None  # settings.validator, told where the particles come from
    returning: PreparedReturn | None = None  # where the last selection goes back to CryoSPARC


def _check_numbers(settings: PipelineSettings) -> None:
    if settings.angpix is not None and not (math.isfinite(settings.angpix) and settings.angpix > 0):
        raise CryoSieveInputError(f"{setting('angpix')} {settings.angpix}: must be a positive number")
    if settings.reconstruct_batch_size < 1:
        raise CryoSieveInputError(f"{setting('batch_size')} {settings.reconstruct_batch_size}: must be at least 1")
    if not settings.output_prefix or not settings.output_prefix.strip():
        raise CryoSieveInputError(f"{setting('output_prefix')}: empty output prefix")
    check_settings(settings.sieve_at(settings.frequency_start))
    if settings.patience is not None and settings.patience < 1:
        raise CryoSieveInputError(f"{setting('patience')} {settings.patience}: must be at least 1")
    if not 0 <= settings.realign <= 20:
        raise CryoSieveInputError(f"{setting('realign')} {settings.realign}: must be from 0 (none) to 20 iterations")
    settings.realign_settings("C1").check()  # the search ranges, for --realign and the built-in validator


def _pixel_size(settings: PipelineSettings, particles: ParticleSet) -> float:
    """The one pixel size (Å) of the run: ``angpix`` (checked against the file by
    :func:`read_particles`) or the file's own."""
    if settings.angpix is not None:
        return float(settings.angpix)
    sizes = np.unique(particles.pixel_size)
    if any(not pixel_sizes_agree(float(size), float(sizes[0])) for size in sizes):
        raise CryoSieveInputError(
            f"{settings.input_star}: optics groups of different pixel sizes ({', '.join(f'{v:g}' for v in sizes)} Å); "
            f"the maps need one: give {setting('angpix')}")
    return float(sizes[0])


def _inputs(settings: PipelineSettings, particles: ParticleSet) -> list[InputFile]:
    inputs = [InputFile(Path(settings.input_star), f"{setting('input_star')}, the particle file"),
              InputFile(Path(settings.mask), setting("mask"))]
    inputs += [InputFile(Path(path), setting("passthrough")) for path in settings.passthrough]
    inputs += [InputFile(path, f"particle stack of {settings.input_star}")
               for path in stack_paths(particles, settings.directory or None)]
    return inputs


def _check_validation_size(settings: PipelineSettings, halves: np.ndarray) -> None:
    """Refuse, before anything runs, a validation whose last (smallest) set, or its smallest
    Rosenthal-Henderson halving, would keep fewer than ``MIN_PER_HALF_SET`` particles per half-set."""
    smallest = min(int(np.sum(halves == value)) for value in (1, 2))
    ratio = settings.sieve.retention_ratio
    ratio = 1.0 if isinstance(ratio, str) else ratio  # auto: unknown yet
    for _ in range(settings.num_iters):
        smallest = retained_count(smallest, ratio)
    halvings = settings.rh_halves if settings.validate_rh else 0
    needed = MIN_PER_HALF_SET * 2**halvings
    if smallest < needed:
        raise CryoSieveInputError(
            f"{setting('validator')}: the last set keeps {smallest} particles in its smaller half-set, and its "
            f"refinement{' and RH halvings' if halvings else ''} need at least {needed} (fewer "
            f"{setting('num_iters')}, a higher {setting('retention_ratio')}"
            + (f", or no {setting('validate_rh')})" if halvings else ")"))


def prepare(settings: PipelineSettings) -> Prepared:
    """Read and check every input; raises :class:`CryoSieveInputError` before anything is written."""
    _check_numbers(settings)
    symmetry = canonical_name(settings.symmetry)  # unknown names are an input error
    reconstructor, postprocessor = settings.backends()
    if settings.directory and not os.path.isdir(settings.directory):
        raise CryoSieveInputError(f"{setting('directory')} {settings.directory}: not a folder")
    if not os.path.isfile(settings.input_star):
        raise CryoSieveInputError(f"{setting('input_star')} {settings.input_star}: file not found")
    if format_of(settings.input_star) == "star" and not settings.input_star.endswith(".star"):
        raise CryoSieveInputError(
            f"{setting('input_star')} {settings.input_star}: not a particle file (name must end in .star or .cs)")
    if not os.path.isfile(settings.mask):
        raise CryoSieveInputError(f"{setting('mask')} {settings.mask}: file not found")
    particles = read_particle_file(settings.input_star, settings.angpix, settings.passthrough)
    names = OutputNames(settings.output_prefix, Path(settings.input_star).suffix.lower())
    check_outputs(names.files(settings.num_iters, settings.realign > 0), _inputs(settings, particles),
                  names.folders(settings.num_iters))
    if settings.resplit:  # new random half-sets, seeded, written into _iter0 (rlnRandomSubset)
        particles = particles.with_halves(random_halves(len(particles), RESPLIT_SEED))
    if particles.random_subset is None:
        raise CryoSieveInputError(f"{settings.input_star}: column rlnRandomSubset missing (half-sets 1 and 2 needed); "
                                  f"add {setting('resplit')} to split the particles into two random halves")
    present = sorted(set(particles.random_subset.tolist()))
    if present != [1, 2]:
        raise CryoSieveInputError(
            f"{settings.input_star}: rlnRandomSubset must hold half-sets 1 and 2, found {present}")
    angpix = _pixel_size(settings, particles)
    with StackReader(particles, settings.directory or None) as reader:
        box = reader.validate()
    mask = read_volume(settings.mask, what="mask")
    check_mask(mask, (box, box, box), angpix, against="the particles")
    schedule = settings.schedule
    schedule.check(box, float(np.max(particles.pixel_size)))
    if settings.validate_rh and settings.validator is None:
        raise CryoSieveInputError(
            f"{setting('validate_rh')}: needs {setting('validator')} (builtin, fixed, relion or cryosparc)")
    if settings.validator is not None and settings.validate_rh:
        for voltage in np.unique(particles.voltage):
            voltage_constant(round(float(voltage)))
        if settings.rh_halves < 1:
            raise CryoSieveInputError(f"{setting('rh_halves')} {settings.rh_halves}: must be at least 1")
    rows0 = balanced_rows(particles.random_subset) if settings.sieve.balance else np.arange(len(particles))
    validator = settings.validator
    if validator is not None:
        _check_validation_size(settings, particles.random_subset[rows0])
        if is_remote(validator):  # the server and the particles' source job, checked before anything runs
            validator = cast(RemoteRefiner, validator).for_origin(Path(settings.input_star))
            validator.prepare([], dry_run=False)
    returning = None
    if settings.return_to is not None:
        from cryosieve.cryosparc.selection import prepare_return
        from cryosieve.sieve import uids_of

        returning = prepare_return(settings.return_to, settings.input_star, uids_of(particles))
    record = {
        "input_star": os.path.abspath(settings.input_star),
        "input_star_sha256": sha256(settings.input_star),
        "passthrough": [os.path.abspath(path) for path in settings.passthrough],
        "passthrough_sha256": [sha256(path) for path in settings.passthrough],
        "mask": os.path.abspath(settings.mask),
        "mask_sha256": sha256(settings.mask),
        # each stack's size, modification time and first and last image: a changed stack is not resumed
        STACKS: {str(path.absolute()): stack_record(path)
                 for path in stack_paths(particles, settings.directory or None)},
        "directory": os.path.abspath(settings.directory or "."),
        "angpix": angpix,
        "symmetry": symmetry,
        "resplit": bool(settings.resplit),
        "num_iters": int(settings.num_iters),
        "frequency_start": float(settings.frequency_start),
        "frequency_end": float(settings.frequency_end),
        "sieve": {name: value for name, value in settings.sieve.record().items() if name != "highpass_angstrom"},
        "reconstructor": reconstructor.describe(),
        "postprocessor": postprocessor.describe(),
        "validator": settings.validator.describe() if settings.validator is not None else "none",
        "validate_rh": bool(settings.validate_rh and settings.validator is not None),
        "patience": settings.patience,
        "realign": {"iterations": settings.realign, "search_range": settings.search.search_range,
                    "angular_step": settings.search.angular_step, "shift_range": settings.search.shift_range}
        if settings.realign else None,
        "cryosparc_return": f"{settings.return_to.project} {settings.return_to.workspace} "
                            f"{returning.source[0]}.{returning.source[1]}"
        if settings.return_to is not None and returning is not None else None,
    }
    return Prepared(settings=settings, names=names, particles=particles, rows0=rows0, box=box, angpix=angpix,
                    symmetry=symmetry, mask=mask, schedule=schedule, reconstructor=reconstructor,
                    postprocessor=postprocessor, record=record, validator=validator, returning=returning)
