"""The iterative CryoSieve pipeline: reconstruct, post-process, sieve, repeat.

Round ``i`` (0 .. ``num_iters - 1``), as the published CryoSieve runs it:

1. reconstruct the two half maps of ``PREFIX_iter{i}.star`` ->
   ``PREFIX_iter{i}_half1.mrc`` and ``PREFIX_iter{i}_half2.mrc`` (a
   :class:`~cryosieve.backends.Reconstructor`);
2. post-process them -> ``PREFIX_postprocess_iter{i}/iter{i}.*`` (a
   :class:`~cryosieve.backends.PostProcessor`);
3. sieve ``PREFIX_iter{i}.star`` with those half maps and the mask at the round's cut-off
   (:class:`~cryosieve.schedule.CutoffSchedule`) -> ``PREFIX_iter{i+1}.star`` (kept),
   ``PREFIX_iter{i+1}_sieved.star`` (removed) and ``PREFIX_iter{i+1}_scores.csv``.

``PREFIX_iter0.star`` is the input (a byte copy, or with ``balance`` the subset that makes
both half-sets equally large). As in the published program, the last kept set
``PREFIX_iter{num_iters}.star`` is not reconstructed.

Every step goes through one step runner. ``PREFIX_state.json`` (written atomically) holds the
settings that determine the outputs (by field name), the SHA-256 of each input file, each
particle stack's size, modification time and SHA-256 of its first and last image (a resume with
a changed input or stack is refused), the completed steps, and what each round measured
(resolution, B-factor, corrected FSC, the back-ends), recorded by the pipeline itself whatever
back-end measured it; each step writes its outputs atomically before it is recorded. A run
started again with ``resume=True`` skips every recorded step, so an interrupted run ends with
the same files as an uninterrupted one. Every random choice is seeded.

The library never prints: it logs to the ``cryosieve`` logger (and, while running, to
``PREFIX_pipeline.log``) and reports progress through a caller-given factory.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd

from cryosieve.backends import (
    HalfMapJob,
    PostprocessJob,
    PostProcessor,
    Reconstructor,
    Refiner,
    RemoteRefiner,
    is_remote,
)
from cryosieve.backends.builtin import BuiltinPostProcessor, BuiltinReconstructor
from cryosieve.errors import CryoSieveInputError, setting
from cryosieve.io.atomic import atomic_path, remove_stale_temporaries, write_text_atomic
from cryosieve.io.lock import exclusive_lock
from cryosieve.io.mrc import Volume, read_volume
from cryosieve.io.particle_files import format_of, in_format_of, read_particle_file
from cryosieve.io.paths import InputFile, check_outputs
from cryosieve.io.stack import StackReader, stack_paths, stack_record
from cryosieve.mask import check_mask
from cryosieve.particles import ParticleSet
from cryosieve.postprocess import PostprocessReport
from cryosieve.progress import ProgressFactory, no_progress
from cryosieve.refine import jobs
from cryosieve.refine.api import MIN_PER_HALF_SET
from cryosieve.refine.rh import fit_rh, nested_subsets, voltage_constant
from cryosieve.report import ReportPaths, RoundSummary, chosen_round, report_paths, write_report
from cryosieve.schedule import CutoffSchedule
from cryosieve.score import retained_count
from cryosieve.sieve import (
    AUTO,
    SieveSettings,
    check_geometry,
    check_retention_ratio,
    check_settings,
    half_sets,
    retention_path,
    sieve,
    sieve_output_paths,
    write_sieve_outputs,
)
from cryosieve.symmetry import canonical_name, group_order
from cryosieve.tolerances import pixel_sizes_agree
from cryosieve.views import depleted_fraction, view_bins

if TYPE_CHECKING:
    from cryosieve.cryosparc.selection import PreparedReturn, ReturnTarget

log = logging.getLogger("cryosieve")

STATE_FORMAT = 3
#: The state's record of the particle stacks, path -> :func:`cryosieve.io.stack.stack_record`.
STACKS = "particle_stacks"
BALANCE_SEED = 0


@dataclass(frozen=True)
class PipelineSettings:
    """The settings of one run (the command line of ``cryosieve``).

    Attributes
    ----------
    input_star:
        Particle STAR file with poses, CTF and ``rlnRandomSubset`` 1/2.
    output_prefix:
        Path prefix of every output (``output/`` gives ``output/_iter0.star`` ...).
    mask:
        Mask MRC (values in [0, 1]) for sieving and post-processing.
    angpix:
        Pixel size in Å: needed for RELION 3.0 STAR files; for 3.1+ files (which carry
        it) ``None``, or a value that agrees with theirs.
    directory:
        Folder that ``rlnImageName`` paths are relative to (``None``: current folder).
    symmetry:
        Point group for reconstruction (RELION's names, any case).
    num_iters, frequency_start, frequency_end, retention_ratio, balance:
        As in the published CryoSieve (cut-offs in Å).
    reconstructor, postprocessor:
        The back-ends (``None``: the built-in ones on ``device``).
    validator:
        Re-estimates the poses of every set (``--validate``): each round's set and the last kept
        set are also refined, and their resolution and B-factor reported beside the fixed-pose
        ones; ``None``: no validation.
    validate_rh:
        With a validator, also the Rosenthal-Henderson B-factor of every set (``rh_halves``
        nested halvings).
    num_processes:
        Scoring processes (one per GPU on CUDA).
    device:
        Where the built-in steps compute.
    batch_size, projector, reference_weighting:
        Passed to the sieving engine.
    reconstruct_batch_size:
        Images per batch of the built-in reconstruction.
    report:
        Write the plots and the HTML page (the summary CSV is always written).
    passthrough, return_to:
        Further ``.cs`` files of a ``.cs`` input; where the last selection goes back to CryoSPARC.
    patience:
        ``None``: every one of ``num_iters`` rounds (the published schedule); else stop once the
        resolution (with poses re-estimated when there is a validator, else with the given poses:
        optimistic) has not improved for ``patience`` rounds, ``num_iters`` being the most.
    keep_orientations:
        Most a well-populated view may lose, times the average (:class:`~cryosieve.sieve.SieveSettings`).
    """

    input_star: str
    output_prefix: str
    mask: str
    angpix: float | None = None
    directory: str | None = None
    symmetry: str = "C1"
    num_iters: int = 10
    frequency_start: float = 50.0
    frequency_end: float = 3.0
    retention_ratio: float | str = 0.8  # or "auto" (cryosieve.retention)
    balance: bool = False
    reconstructor: Reconstructor | None = None
    postprocessor: PostProcessor | None = None
    validator: Refiner | None = None
    validate_rh: bool = False
    rh_halves: int = 4
    num_processes: int = 1
    device: Any = "cpu"
    batch_size: int = 256
    projector: str = "fourier"
    reference_weighting: str = "auto"
    reconstruct_batch_size: int = 128
    report: bool = True
    passthrough: tuple[str, ...] = ()
    return_to: ReturnTarget | None = None
    patience: int | None = None
    keep_orientations: float | None = None

    @property
    def schedule(self) -> CutoffSchedule:
        return CutoffSchedule(self.frequency_start, self.frequency_end, self.num_iters)

    def backends(self) -> tuple[Reconstructor, PostProcessor]:
        """The back-ends to use, the built-in ones where none is given."""
        return (self.reconstructor or BuiltinReconstructor(self.device, self.reconstruct_batch_size),
                self.postprocessor or BuiltinPostProcessor(self.device))


@dataclass(frozen=True)
class OutputNames:
    """Every output path of a run, from its prefix (string concatenation, as published)."""

    prefix: str
    extension: str = ".star"  # the particle files' format, the input's: ".star" or ".cs"

    def _path(self, suffix: str) -> Path:
        return Path(self.prefix + suffix)

    def star(self, iteration: int) -> Path:
        """The particle file of set ``iteration`` (``_iter{i}.star``, or ``.cs`` for a ``.cs`` input)."""
        return self._path(f"_iter{iteration}{self.extension}")

    def sieved(self, iteration: int) -> Path:
        return self._path(f"_iter{iteration}_sieved{self.extension}")

    def relion_star(self, iteration: int) -> Path:
        """The STAR description of a ``.cs`` set for an external reconstruction program."""
        return self._path(f"_iter{iteration}_relion.star")

    def scores(self, iteration: int) -> Path:
        return self._path(f"_iter{iteration}_scores.csv")

    def half_map(self, iteration: int, subset: int) -> Path:
        return self._path(f"_iter{iteration}_half{subset}.mrc")

    def reconstruct_log(self, iteration: int, subset: int) -> Path:
        return self._path(f"_iter{iteration}_reconstruct_half{subset}.txt")

    def postprocess_directory(self, iteration: int) -> Path:
        return self._path(f"_postprocess_iter{iteration}")

    def postprocess_root_name(self, iteration: int) -> str:
        return f"iter{iteration}"

    def postprocess_log(self, iteration: int) -> Path:
        return self._path(f"_postprocess_iter{iteration}.txt")

    @property
    def best(self) -> Path:
        """A copy of the particle file of the run's best set."""
        return self._path(f"_best{self.extension}")

    @property
    def state(self) -> Path:
        return self._path("_state.json")

    @property
    def log(self) -> Path:
        return self._path("_pipeline.log")

    @property
    def lock(self) -> Path:
        return self._path("_run.lock")

    def files(self, num_iters: int) -> list[Path]:
        """Every file a run of ``num_iters`` rounds writes (post-processing folders apart)."""
        paths = [self.star(0), self.state, self.log, self.lock]
        for iteration in range(num_iters):
            paths += [self.half_map(iteration, 1), self.half_map(iteration, 2),
                      self.reconstruct_log(iteration, 1), self.reconstruct_log(iteration, 2),
                      self.postprocess_log(iteration), *sieve_output_paths(self.star(iteration + 1)),
                      retention_path(self.star(iteration + 1))]
            if self.extension != ".star":
                paths.append(self.relion_star(iteration))
        report = report_paths(self.prefix)
        paths += [report.summary_csv, report.resolution_plot, report.fsc_plot, report.scores_plot, report.html,
                  report.angles_plot, self.best]
        return paths

    def folders(self, num_iters: int) -> list[Path]:
        """The post-processing folders of a run (each replaced as a whole) and the validation jobs' folder."""
        return [*(self.postprocess_directory(iteration) for iteration in range(num_iters)), self.validation]

    @property
    def validation(self) -> Path:
        """Where the validation jobs of every set go (``--validate``)."""
        return self._path("_validate")

    def owns(self, name: str) -> bool:
        """Whether a file name in the prefix's folder is one of the run's output names."""
        return name.startswith(Path(self.prefix + "x").name[:-1])


@dataclass
class PipelineResult:
    """What a finished run produced: one summary per set (``num_iters + 1``) and the report files."""

    rounds: list[RoundSummary]
    report: ReportPaths
    computed_steps: list[str] = field(default_factory=list)
    skipped_steps: list[str] = field(default_factory=list)


def cutoff_frequencies(frequency_start: float, frequency_end: float, num_iters: int) -> np.ndarray:
    """The cut-offs (Å) of :class:`~cryosieve.schedule.CutoffSchedule`: ``(num_iters,)`` float64."""
    return CutoffSchedule(frequency_start, frequency_end, num_iters).cutoffs


#: The last step of a run whose selection goes back to CryoSPARC.
GIVE_BACK = "give back to CryoSPARC"


def step_names(num_iters: int, validate: bool = False, give_back: bool = False) -> list[str]:
    """Every step of a run, in order."""
    names = ["prepare"]
    for iteration in range(num_iters):
        names += [f"reconstruct {iteration}", f"postprocess {iteration}", f"sieve {iteration}"]
        names += [f"validate {iteration}"] if validate else []
    return names + ([f"validate {num_iters}"] if validate else []) + ([GIVE_BACK] if give_back else [])


def _sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


# --------------------------------------------------------------------------- validation


@dataclass
class _Prepared:
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
    arguments: dict[str, Any]
    validator: Refiner | None = None  # settings.validator, told where the particles come from
    returning: PreparedReturn | None = None  # where the last selection goes back to CryoSPARC


def _check_numbers(settings: PipelineSettings) -> None:
    if settings.angpix is not None and not (math.isfinite(settings.angpix) and settings.angpix > 0):
        raise CryoSieveInputError(f"{setting('angpix')} {settings.angpix}: must be a positive number")
    check_retention_ratio(settings.retention_ratio)
    if settings.reconstruct_batch_size < 1:
        raise CryoSieveInputError(f"{setting('batch_size')} {settings.reconstruct_batch_size}: must be at least 1")
    if not settings.output_prefix or not settings.output_prefix.strip():
        raise CryoSieveInputError(f"{setting('output_prefix')}: empty output prefix")
    check_settings(_sieve_settings(settings, settings.frequency_start))
    if settings.patience is not None and settings.patience < 1:
        raise CryoSieveInputError(f"{setting('patience')} {settings.patience}: must be at least 1")


def _sieve_settings(settings: PipelineSettings, cutoff: float) -> SieveSettings:
    return SieveSettings(retention_ratio=settings.retention_ratio, highpass_angstrom=float(cutoff),
                         projector=settings.projector, reference_weighting=settings.reference_weighting,
                         batch_size=settings.batch_size, device=settings.device,
                         num_processes=settings.num_processes, balance=settings.balance,
                         keep_orientations=settings.keep_orientations)


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
    ratio = 1.0 if isinstance(settings.retention_ratio, str) else settings.retention_ratio  # auto: unknown yet
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


def prepare(settings: PipelineSettings) -> _Prepared:
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
    check_outputs(names.files(settings.num_iters), _inputs(settings, particles), names.folders(settings.num_iters))
    if particles.random_subset is None:
        raise CryoSieveInputError(f"{settings.input_star}: column rlnRandomSubset missing (half-sets 1 and 2 needed)")
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
            f"{setting('validate_rh')}: needs {setting('validator')} (fixed, relion or cryosparc)")
    if settings.validator is not None and settings.validate_rh:
        for voltage in np.unique(particles.voltage):
            voltage_constant(round(float(voltage)))
        if settings.rh_halves < 1:
            raise CryoSieveInputError(f"{setting('rh_halves')} {settings.rh_halves}: must be at least 1")
    rows0 = balanced_rows(particles.random_subset) if settings.balance else np.arange(len(particles))
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
    arguments = {
        "input_star": os.path.abspath(settings.input_star),
        "input_star_sha256": _sha256(settings.input_star),
        "passthrough": [os.path.abspath(path) for path in settings.passthrough],
        "passthrough_sha256": [_sha256(path) for path in settings.passthrough],
        "mask": os.path.abspath(settings.mask),
        "mask_sha256": _sha256(settings.mask),
        # each stack's size, modification time and first and last image: a changed stack is not resumed
        STACKS: {str(path.absolute()): stack_record(path)
                            for path in stack_paths(particles, settings.directory or None)},
        "directory": os.path.abspath(settings.directory or "."),
        "angpix": angpix,
        "symmetry": symmetry,
        "num_iters": int(settings.num_iters),
        "frequency_start": float(settings.frequency_start),
        "frequency_end": float(settings.frequency_end),
        "retention_ratio": settings.retention_ratio if isinstance(settings.retention_ratio, str)
        else float(settings.retention_ratio),
        "balance": bool(settings.balance),
        "reconstructor": reconstructor.describe(),
        "postprocessor": postprocessor.describe(),
        "validator": settings.validator.describe() if settings.validator is not None else "none",
        **({"patience": settings.patience} if settings.patience is not None else {}),
        **({"keep_orientations": settings.keep_orientations} if settings.keep_orientations is not None else {}),
        **({"cryosparc_return": f"{settings.return_to.project} {settings.return_to.workspace} "
                                f"{returning.source[0]}.{returning.source[1]}"}
           if settings.return_to is not None and returning is not None else {}),
        "validate_rh": bool(settings.validate_rh and settings.validator is not None),
        "projector": settings.projector,
        "reference_weighting": settings.reference_weighting,
    }
    return _Prepared(settings=settings, names=names, particles=particles, rows0=rows0, box=box, angpix=angpix,
                     symmetry=symmetry, mask=mask, schedule=schedule, reconstructor=reconstructor,
                     postprocessor=postprocessor, arguments=arguments, validator=validator, returning=returning)


# --------------------------------------------------------------------------- state


class _State:
    """``PREFIX_state.json``: settings, completed steps and each round's outcome, rewritten atomically."""

    def __init__(self, path: Path, arguments: dict[str, Any], completed: list[str],
                 outcomes: dict[str, dict[str, Any]]) -> None:
        self.path = path
        self.arguments = arguments
        self.completed = completed
        self.outcomes = outcomes

    def save(self) -> None:
        document = {"program": "cryosieve", "format": STATE_FORMAT, "arguments": self.arguments,
                    "completed": self.completed, "outcomes": self.outcomes}
        write_text_atomic(self.path, json.dumps(document, indent=2) + "\n")

    def done(self, step: str) -> bool:
        return step in self.completed

    def record(self, step: str, outcome: dict[str, Any] | None = None) -> None:
        """Mark ``step`` done, with what it measured (saved in the same write)."""
        if outcome is not None:
            self.outcomes[step] = outcome
        self.completed.append(step)
        self.save()


def _open_state(prepared: _Prepared, resume: bool, warn: bool = True) -> _State:
    """Load (``resume``) or refuse to overwrite the state of an earlier run; nothing is written (``warn``: log
    what cannot be checked)."""
    path = prepared.names.state
    if not path.exists():
        if resume:
            log.info("resuming: no %s yet, starting from the beginning", path)
        return _State(path, prepared.arguments, [], {})
    if not resume:
        raise CryoSieveInputError(
            f"{setting('output_prefix')} {prepared.settings.output_prefix}: {path} exists (an earlier run); add "
            f"{setting('resume')} to resume it or choose another output prefix")
    try:
        document = json.loads(path.read_text())
        version = int(document.get("format", 1))
        recorded = document["arguments"]
        completed = [str(step) for step in document["completed"]]
        outcomes = dict(document.get("outcomes", {}))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CryoSieveInputError(f"{path}: not a readable state file ({error})") from None
    if version != STATE_FORMAT:
        raise CryoSieveInputError(
            f"{setting('resume')}: {path} was written by another version of cryosieve (state format {version}, this "
            f"one reads {STATE_FORMAT}); start a new run with another output prefix")
    for name, value in prepared.arguments.items():
        if name == STACKS:
            _check_stacks(path, recorded.get(STACKS), value, warn)
            continue
        if name not in recorded:
            raise CryoSieveInputError(f"{setting('resume')}: {path} does not record {name}; start a new run")
        if recorded[name] != value:
            if name.endswith("_sha256"):
                raise CryoSieveInputError(f"{setting('resume')}: the {setting(name[:-len('_sha256')])} file changed "
                                          f"since the run recorded in {path}")
            raise CryoSieveInputError(
                f"{setting('resume')}: {setting(name)} changed ({recorded[name]!r} in {path}, now {value!r})")
    unknown = [step for step in completed
               if step not in step_names(prepared.settings.num_iters, prepared.validator is not None,
                                         prepared.returning is not None)]
    if unknown:
        raise CryoSieveInputError(f"{path}: unknown step {unknown[0]!r}")
    return _State(path, prepared.arguments, completed, outcomes)


def _check_stacks(path: Path, recorded: dict[str, Any] | None, now: dict[str, Any], warn: bool) -> None:
    """Refuse to resume with a particle stack whose record (:func:`cryosieve.io.stack.stack_record`)
    differs from the one in the state ``path``. A state of an earlier version holds none: the stacks
    cannot be checked, which a warning says, and their record is saved from now on."""
    if recorded is None:
        if warn:
            log.warning("%s records no particle stacks (written by an earlier version of cryosieve): they are "
                        "not checked on this resume, and recorded from now on", path)
        return
    for stack, record in now.items():
        if recorded.get(stack) != record:
            what = "was not read by" if stack not in recorded else "changed (size, modification time, first or " \
                "last image) since"
            raise CryoSieveInputError(f"{setting('resume')}: the particle stack {stack} {what} the run recorded in "
                                      f"{path}; start a new run")


# --------------------------------------------------------------------------- steps


def _write_iter0(prepared: _Prepared) -> None:
    target = prepared.names.star(0)
    if not prepared.settings.balance:
        with atomic_path(target) as temporary:
            shutil.copyfile(prepared.settings.input_star, temporary)
    else:
        prepared.particles.subset(prepared.rows0).write(target)


def _reconstruct(prepared: _Prepared, particles: ParticleSet, iteration: int, progress: ProgressFactory) -> None:
    names = prepared.names
    directory = Path(prepared.settings.directory) if prepared.settings.directory else None
    star = names.star(iteration).absolute()
    if names.extension != ".star" and not isinstance(prepared.reconstructor, BuiltinReconstructor):
        # an external program reads STAR files: the set described in RELION's terms
        star = names.relion_star(iteration).absolute()
        in_format_of(particles, star).write(star)
    job = HalfMapJob(particles=particles, star=star, directory=directory,
                     outputs=(names.half_map(iteration, 1), names.half_map(iteration, 2)),
                     logs=(names.reconstruct_log(iteration, 1), names.reconstruct_log(iteration, 2)),
                     pixel_size=prepared.angpix, symmetry=prepared.symmetry)

    @contextlib.contextmanager
    def labelled(description: str, total: int) -> Iterator[Callable[[int], None]]:
        with progress(f"iter {iteration}: {description}", total) as update:
            yield update

    prepared.reconstructor.reconstruct_half_maps(job, labelled)


def _postprocess(prepared: _Prepared, iteration: int) -> dict[str, Any]:
    """Post-process round ``iteration``; returns the outcome the state records."""
    names = prepared.names
    job = PostprocessJob(half_maps=(names.half_map(iteration, 1), names.half_map(iteration, 2)), mask=prepared.mask,
                         pixel_size=prepared.angpix, folder=names.postprocess_directory(iteration),
                         root_name=names.postprocess_root_name(iteration), log=names.postprocess_log(iteration))
    return _outcome(prepared, prepared.postprocessor.postprocess(job))


def _outcome(prepared: _Prepared, report: PostprocessReport) -> dict[str, Any]:
    """What the state records of a round, in one format whatever measured it."""
    table = report.fsc_table
    resolution = report.summary.get("final_resolution_angstrom")
    return {
        "resolution_angstrom": float(resolution) if isinstance(resolution, (int, float)) else None,
        "bfactor": float(report.summary.get("bfactor") or 0.0),  # type: ignore[arg-type]
        "fsc_frequency": [float(value) for value in table["shell"].to_numpy() / (report.box * prepared.angpix)],
        "fsc_corrected": [float(value) for value in table["fsc_corrected"].to_numpy()],
        "reconstructor": prepared.reconstructor.describe(),
        "postprocessor": prepared.postprocessor.describe(),
    }


def _sieve(prepared: _Prepared, particles: ParticleSet, iteration: int, progress: ProgressFactory) -> None:
    """Sieve the particles of round ``iteration`` into the next set, its sieved set and the scores."""
    names = prepared.names
    cutoff = prepared.schedule[iteration]
    volumes = [read_volume(names.half_map(iteration, subset)) for subset in (1, 2)]
    half_set = half_sets(particles, 2)
    check_geometry(particles, prepared.box, volumes, cutoff)
    settings = _sieve_settings(prepared.settings, cutoff)
    def choosing(description: str, total: int) -> contextlib.AbstractContextManager[Callable[[int], None]]:
        return progress(f"iter {iteration}: {description}", total)

    with StackReader(particles, prepared.settings.directory or None) as reader, \
            progress(f"iter {iteration}: sieve at {cutoff:.2f} Å", len(particles)) as update:
        result = sieve(particles, reader, volumes, prepared.mask, half_set, settings, progress=update,
                       choosing=choosing)
    write_sieve_outputs(particles, result, names.star(iteration + 1))


def _validate(prepared: _Prepared, iteration: int, progress: ProgressFactory) -> dict[str, Any]:
    """Refine set ``iteration`` (``PREFIX_iter{i}.star``) with the validator, and with ``validate_rh`` nested
    halves of it for the Rosenthal-Henderson fit; returns the outcome the state records."""
    settings, names = prepared.settings, prepared.names
    validator = prepared.validator
    assert validator is not None
    star = names.star(iteration).absolute()
    particles = read_particle_file(star, prepared.angpix, settings.passthrough)
    job_settings = jobs.JobSettings(
        directory=Path(os.path.abspath(settings.directory)) if settings.directory else None,
        symmetry=prepared.symmetry, reference=None, ini_high=30.0, mask=Path(os.path.abspath(settings.mask)),
        particle_diameter=None, local=False,
        passthrough=tuple(Path(os.path.abspath(path)) for path in settings.passthrough))
    subsets = nested_subsets(len(particles), particles.random_subset,
                             settings.rh_halves if settings.validate_rh else 0, seed=1, resplit=False)
    specs = [jobs.JobSpec(name=f"set{iteration}_half{level}", source=star, trial=0, level=level, seed=1,
                          rows=None if level == 0 else rows) for level, rows in enumerate(subsets)]

    @contextlib.contextmanager
    def labelled(description: str, total: int) -> Iterator[Callable[[int], None]]:
        with progress(f"set {iteration}: validate", total) as update:
            yield update

    results = jobs.run(specs, job_settings, validator, names.validation, progress=labelled)
    full = results[specs[0].name]
    rh_bfactor = rh_classical = None
    if settings.validate_rh:
        fit = fit_rh(np.array([math.nan if results[spec.name].resolution_angstrom is None
                               else results[spec.name].resolution_angstrom for spec in specs]),
                     np.array([results[spec.name].particles for spec in specs]), group_order(prepared.symmetry),
                     round(float(particles.voltage[0])))
        rh_bfactor, rh_classical = fit.bfactor, fit.classical_bfactor
    return {"resolution_angstrom": full.resolution_angstrom, "bfactor": full.bfactor, "particles": full.particles,
            "alignment3D": str(names.validation / specs[0].name / full.alignment_star), "fixed_pose": full.fixed_pose,
            "rh_bfactor": rh_bfactor, "rh_bfactor_classical": rh_classical, "validator": validator.describe()}


def _give_back(prepared: _Prepared, kept: ParticleSet) -> dict[str, Any]:
    """The last kept set and the rest of the input, as an External job of CryoSPARC."""
    from cryosieve.sieve import give_selection_back, uids_of

    assert prepared.returning is not None
    uids = uids_of(prepared.particles)
    job = give_selection_back(prepared.returning, uids, np.isin(uids, uids_of(kept)),
                              f"CryoSieve selection of {Path(prepared.settings.input_star).name} "
                              f"({prepared.settings.num_iters} rounds)",
                              [prepared.names.star(prepared.settings.num_iters)])
    return {"cryosparc_job": job}


def _kept(names: OutputNames, iteration: int, particles: ParticleSet) -> np.ndarray:
    """Kept mask ``(n,)`` of sieve ``iteration``, from ``PREFIX_iter{i+1}_scores.csv``."""
    path = names.scores(iteration + 1)
    if not path.is_file():
        raise CryoSieveInputError(f"{path}: missing, but its sieve is recorded as done; start a new run")
    scores = pd.read_csv(path, keep_default_na=False, dtype={"rlnImageName": str})
    if len(scores) != len(particles) or not np.array_equal(scores["rlnImageName"].to_numpy(dtype=object),
                                                           particles.image_name.astype(str)):
        raise CryoSieveInputError(f"{path}: does not list the particles of {names.star(iteration)}")
    return scores["kept"].to_numpy(dtype=np.int64).astype(bool)


# --------------------------------------------------------------------------- report data


def _round_summary(prepared: _Prepared, iteration: int, particles: ParticleSet, state: _State) -> RoundSummary:
    names = prepared.names
    assert particles.random_subset is not None
    summary = RoundSummary(
        iteration=iteration,
        cutoff_angstrom=prepared.schedule[iteration] if iteration < prepared.settings.num_iters
        and state.done(f"sieve {iteration}") else None,
        particles_half1=int(np.sum(particles.random_subset == 1)),
        particles_half2=int(np.sum(particles.random_subset == 2)),
    )
    outcome = state.outcomes.get(f"postprocess {iteration}")
    if outcome is not None:
        resolution = outcome["resolution_angstrom"]
        summary.resolution_angstrom = math.nan if resolution is None else float(resolution)
        summary.bfactor = float(outcome["bfactor"])
        summary.fsc_frequency = np.asarray(outcome["fsc_frequency"], dtype=np.float64)
        summary.fsc_corrected = np.asarray(outcome["fsc_corrected"], dtype=np.float64)
    validated = state.outcomes.get(f"validate {iteration}")
    if validated is not None:
        summary.validated_resolution_angstrom = (math.nan if validated["resolution_angstrom"] is None
                                                 else float(validated["resolution_angstrom"]))
        summary.validated_bfactor = float(validated["bfactor"])
        summary.rh_bfactor = None if validated["rh_bfactor"] is None else float(validated["rh_bfactor"])
        classical = validated.get("rh_bfactor_classical")
        summary.rh_bfactor_classical = None if classical is None else float(classical)
    summary.view_bins = view_bins(particles.rot, particles.tilt)
    if state.done(f"sieve {iteration}"):
        scores = pd.read_csv(names.scores(iteration + 1), keep_default_na=False, dtype={"rlnImageName": str})
        summary.scores = scores["score"].to_numpy(dtype=np.float64)
        summary.half_set = scores["half_set"].to_numpy(dtype=np.int64)
        summary.kept = scores["kept"].to_numpy(dtype=np.int64).astype(bool)
        summary.depleted_views = depleted_fraction(summary.view_bins, summary.kept)
        retention = retention_path(names.star(iteration + 1))
        if prepared.settings.retention_ratio == AUTO:
            curve = pd.read_csv(retention)
            summary.retention_curve = (curve["fraction"].to_numpy(dtype=np.float64),
                                       curve["information"].to_numpy(dtype=np.float64))
            summary.retention_ratio = float(curve["fraction"][curve["chosen"] == 1].iloc[0])
        elif not isinstance(prepared.settings.retention_ratio, str):
            summary.retention_ratio = float(prepared.settings.retention_ratio)
    return summary


def _write_best(prepared: _Prepared, rounds: list[RoundSummary]) -> list[str]:
    """Copy the best set's particle file to ``PREFIX_best`` (:func:`cryosieve.report.chosen_round`); the report's
    line about it."""
    chosen = chosen_round(rounds)
    if chosen is None:
        return []
    names = prepared.names
    with atomic_path(names.best) as temporary:
        shutil.copyfile(names.star(chosen.iteration), temporary)
    how = "with poses re-estimated" if chosen.validated_resolution_angstrom is not None else \
        "with the given poses (optimistic)"
    log.info("best set: iteration %d (%d particles), by its resolution %s; written to %s", chosen.iteration,
             chosen.particles, how, names.best)
    return [f"Best set: iteration {chosen.iteration} ({chosen.particles} particles), by its resolution {how}; "
            f"written to {names.best.name}."]


def _stalled(rounds: list[RoundSummary], patience: int, validated: bool) -> bool:
    """Whether the last ``patience`` rounds measured no better resolution than the best before them."""
    def resolution(summary: RoundSummary) -> float:
        value = summary.validated_resolution_angstrom if validated else summary.resolution_angstrom
        return math.inf if value is None or not math.isfinite(value) else float(value)

    if len(rounds) <= patience:
        return False
    before = min(resolution(summary) for summary in rounds[:-patience])
    return all(resolution(summary) >= before for summary in rounds[-patience:])


# --------------------------------------------------------------------------- the run


@contextlib.contextmanager
def _log_to_file(path: Path) -> Iterator[None]:
    """Every log line of the run, debug lines included, appended to ``path``."""
    handler = logging.FileHandler(path, mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    handler.setLevel(logging.DEBUG)
    previous_level = log.level
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()
        log.setLevel(previous_level)


def run_pipeline(settings: PipelineSettings, *, resume: bool = False,
                 progress: ProgressFactory | None = None,
                 checkpoint: Callable[[], None] | None = None) -> PipelineResult:
    """Run (or, with ``resume``, continue) the iterative sieve; returns the summaries and report paths.

    Parameters
    ----------
    settings:
        The run's settings.
    resume:
        Continue the run recorded in ``PREFIX_state.json``.
    progress:
        Progress reporting (:data:`cryosieve.progress.ProgressFactory`).
    checkpoint:
        Called before every step; it may raise to stop the run there (the command line
        stops an interrupted run this way even if the first interrupt was swallowed).

    Raises
    ------
    CryoSieveInputError
        Bad input, an output that would overwrite an input, an unwritable output location,
        another run working on the same prefix, an existing run without ``resume`` or changed
        settings with it (all before any output is written).
    cryosieve.errors.ExternalCommandError
        An external program failed (the run can be continued after fixing the cause).
    """
    progress = progress or no_progress
    checkpoint = checkpoint or (lambda: None)
    prepared = prepare(settings)
    _open_state(prepared, resume, warn=False)  # refuse early, before the output folder is made
    names = prepared.names
    folder = names.state.parent
    made_folder = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive_lock(names.lock, f"{setting('output_prefix')} {settings.output_prefix}"):
            state = _open_state(prepared, resume)  # again, now that no other run can change it
            if not state.path.exists():
                state.save()
            made_folder = False
            return _Run(prepared, state, progress, checkpoint).run(resume)
    finally:
        if made_folder:
            with contextlib.suppress(OSError):
                folder.rmdir()


class _Run:
    """The steps of one run, through one step runner."""

    def __init__(self, prepared: _Prepared, state: _State, progress: ProgressFactory,
                 checkpoint: Callable[[], None]) -> None:
        self.prepared, self.state, self.progress, self.checkpoint = prepared, state, progress, checkpoint
        self.computed: list[str] = []
        self.skipped: list[str] = []

    def step(self, name: str, action: Callable[[], dict[str, Any] | None]) -> None:
        """Run ``action`` unless ``name`` is recorded as done; record it with what it measured."""
        if self.state.done(name):
            self.skipped.append(name)
            return
        self.checkpoint()
        started = time.perf_counter()
        outcome = action()
        self.state.record(name, outcome)
        self.computed.append(name)
        log.info("%s: done in %.1f s", name, time.perf_counter() - started)

    def run(self, resume: bool) -> PipelineResult:
        prepared, state = self.prepared, self.state
        settings, names = prepared.settings, prepared.names
        with _log_to_file(names.log):
            log.info("cryosieve %s: %s", "continuing" if resume else "starting",
                     " ".join(f"{key}={value}" for key, value in prepared.arguments.items()
                              if "sha256" not in key and key != STACKS))
            if state.completed:
                log.info("already done: %s", ", ".join(state.completed))
            # Under the lock no other run writes here: every temporary of ours is left by a killed run.
            for path in remove_stale_temporaries(names.state.parent, names.owns, any_owner=True):
                log.info("removed %s, left by an interrupted run", path)
            self.step("prepare", lambda: _write_iter0(prepared))
            particles = prepared.particles.subset(prepared.rows0) if settings.balance else prepared.particles
            rounds: list[RoundSummary] = []
            stopped: int | None = None
            validated = settings.validator is not None
            if settings.patience is not None and not validated:
                log.warning("--patience without --validate: rounds are compared by their resolution with the given "
                            "poses, which is optimistic")
            for iteration in range(settings.num_iters):
                assert particles.random_subset is not None
                log.info("[ITER %d] %d particles (half-sets %d + %d); cut-off %.3f Å", iteration, len(particles),
                         int(np.sum(particles.random_subset == 1)), int(np.sum(particles.random_subset == 2)),
                         prepared.schedule[iteration])
                # each step runs at once; partial binds this round's particles and iteration
                self.step(f"reconstruct {iteration}",
                          functools.partial(_reconstruct, prepared, particles, iteration, self.progress))
                self.step(f"postprocess {iteration}", functools.partial(_postprocess, prepared, iteration))
                outcome = state.outcomes[f"postprocess {iteration}"]
                log.info("[ITER %d] resolution %s Å, B-factor %.1f Å^2", iteration,
                         "-" if outcome["resolution_angstrom"] is None else f"{outcome['resolution_angstrom']:.2f}",
                         outcome["bfactor"])
                self.step(f"sieve {iteration}",
                          functools.partial(_sieve, prepared, particles, iteration, self.progress))
                if settings.validator is not None:
                    self.step(f"validate {iteration}", functools.partial(_validate, prepared, iteration, self.progress))
                rounds.append(_round_summary(prepared, iteration, particles, state))
                particles = particles.subset(_kept(names, iteration, particles))
                log.info("[ITER %d] kept %d particles (half-sets %d + %d)", iteration, len(particles),
                         int(np.sum(particles.random_subset == 1)), int(np.sum(particles.random_subset == 2)))
                self.checkpoint()
                write_report(names.prefix, [*rounds, _round_summary(prepared, iteration + 1, particles, state)],
                             plots=settings.report, validation=prepared.arguments["validator"])
                if settings.patience is not None and _stalled(rounds, settings.patience, validated):
                    stopped = iteration
                    log.info("[ITER %d] no better resolution for %d rounds: stopping", iteration, settings.patience)
                    break
            last = settings.num_iters if stopped is None else stopped + 1
            if settings.validator is not None and stopped is None:
                self.step(f"validate {settings.num_iters}",
                          functools.partial(_validate, prepared, settings.num_iters, self.progress))
            if prepared.returning is not None:
                self.step(GIVE_BACK, functools.partial(_give_back, prepared, particles))
            rounds.append(_round_summary(prepared, last, particles, state))
            notes = _write_best(prepared, rounds)
            if stopped is not None:
                notes.insert(0, f"Stopped after round {stopped}: no better resolution for {settings.patience} "
                                f"rounds (--patience); at most {settings.num_iters} rounds were asked for.")
            report = write_report(names.prefix, rounds, plots=settings.report,
                                  validation=prepared.arguments["validator"], notes=notes)
            measured = [summary for summary in rounds if summary.resolution_angstrom is not None
                        and math.isfinite(summary.resolution_angstrom)]
            if measured:
                best = min(measured, key=lambda summary: summary.resolution_angstrom or math.inf)
                log.info("best resolution %.2f Å at iteration %d (%d particles); summary %s",
                         best.resolution_angstrom, best.iteration, best.particles, report.summary_csv)
        return PipelineResult(rounds=rounds, report=report, computed_steps=self.computed, skipped_steps=self.skipped)
