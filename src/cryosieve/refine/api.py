"""``cryosieve-refine`` and ``cryosieve-rhbfactor`` from files to files.

:func:`refine_files` refines each input (``repeat`` trials, seeded) and writes a summary with
the original ``cryosieve-csrefine``'s columns; :func:`rhbfactor_files` refines nested random
subsets of each input and fits the Rosenthal-Henderson B-factor
(:mod:`cryosieve.refine.rh`), writing the original ``cryosieve-csrhbfactor``'s summary, every
refinement (``_raw.csv``) and a plot (``_rh.png``). Both run their jobs through
:mod:`cryosieve.refine.jobs` in folders beside the summary (``OUT_jobs/``), so that a command
run again resumes where it stopped.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd

from cryosieve.backends import MIN_PER_HALF_SET, RefinementResult, Refiner, RemoteRefiner, is_remote
from cryosieve.backends.builtin import FixedPoseRefiner
from cryosieve.errors import CryoSieveInputError, setting
from cryosieve.io.atomic import OutputGroup, remove_stale_temporaries_of
from cryosieve.io.mrc import read_volume
from cryosieve.io.particle_files import read_particle_file
from cryosieve.io.paths import InputFile, check_outputs
from cryosieve.io.stack import StackReader, stack_paths
from cryosieve.mask import check_mask
from cryosieve.progress import ProgressFactory, no_progress
from cryosieve.refine import jobs
from cryosieve.refine.inputs import expand_inputs
from cryosieve.refine.rh import RHFit, fit_rh, nested_subsets, random_halves, voltage_constant
from cryosieve.symmetry import canonical_name, group_order
from cryosieve.tolerances import pixel_sizes_agree

log = logging.getLogger("cryosieve")

#: Refiners whose estimates keep the given poses (their outputs say so).
_FIXED: tuple[type, ...] = (FixedPoseRefiner,)


#: The summaries' columns: the original's, then whether the poses were the given ones and the mask used.
REFINE_COLUMNS = ["filename", "number of particles", "resolution (A)", "b-factor (A^2)", "alignment3D", "trial",
                  "fixed pose", "median resolution (A)", "median b-factor (A^2)", "mask"]
RH_COLUMNS = ["filename", "resolution (A)", "RH-b-factor (A^2)", "classical RH-b-factor (A^2)", "trials",
              "fixed pose", "mask"]
RAW_COLUMNS = ["filename", "trial", "halving", "number of particles", "resolution (A)", "b-factor (A^2)",
               "alignment3D", "fixed pose", "mask"]


@dataclass(frozen=True)
class RefineSettings:
    """The settings of ``cryosieve-refine`` / ``cryosieve-rhbfactor`` (``inputs``: STAR files, wildcards or
    ``.txt`` lists; ``output``: the summary CSV; the others as :class:`~cryosieve.backends.RefinementJob`
    takes them; ``repeat`` trials with seeds ``seed``, ``seed + 1``...)."""

    inputs: tuple[str, ...]
    output: str
    directory: str | None = None
    symmetry: str = "C1"
    reference: str | None = None
    ini_high: float | None = None  # None: not given (RELION 30 Å; CryoSPARC its own default)
    repeat: int = 1
    resplit: bool = False
    workers: int | None = 1  # None: every job at once
    mask: str | None = None
    particle_diameter: float | None = None
    local: bool = False
    seed: int = 1


@dataclass(frozen=True)
class Outcome:
    """What a command did: the summary rows written (``None`` for a dry run) and, for a dry run, the plan."""

    summary: pd.DataFrame | None
    plan: list[str]


def _paths(output: str, suffixes: tuple[str, ...]) -> tuple[Path, ...]:
    root = output[: -len(".csv")]
    return (Path(output), *(Path(root + suffix) for suffix in suffixes))


def _check(settings: RefineSettings, outputs: tuple[Path, ...], folders: list[Path], minimum_per_half: int
           ) -> tuple[list[Path], jobs.JobSettings]:
    """Everything checked before any job starts; returns the inputs and the jobs' shared settings."""
    if not settings.output.endswith(".csv"):
        raise CryoSieveInputError(f"{setting('output')} {settings.output}: the summary must be a .csv file")
    for name, value in (("repeat", settings.repeat), ("workers", settings.workers)):
        if value is not None and value < 1:
            raise CryoSieveInputError(f"{setting(name)} {value}: must be at least 1")
    if settings.ini_high is not None and not (settings.ini_high > 0 and math.isfinite(settings.ini_high)):
        raise CryoSieveInputError(f"{setting('ini_high')} {settings.ini_high}: must be a positive resolution in Å")
    if settings.particle_diameter is not None and not settings.particle_diameter > 0:
        raise CryoSieveInputError(f"{setting('particle_diameter')} {settings.particle_diameter}: must be positive")
    if settings.directory and not os.path.isdir(settings.directory):
        raise CryoSieveInputError(f"{setting('directory')} {settings.directory}: not a folder")
    symmetry = canonical_name(settings.symmetry)
    paths = expand_inputs(settings.inputs)
    directory = Path(os.path.abspath(settings.directory)) if settings.directory else None
    inputs = [InputFile(path, f"{setting('inputs')}") for path in paths]
    for name, given in (("reference", settings.reference), ("mask", settings.mask)):
        if given is not None:
            if not os.path.isfile(given):
                raise CryoSieveInputError(f"{setting(name)} {given}: file not found")
            inputs.append(InputFile(Path(given), setting(name)))
    shape: tuple[int, float] | None = None
    for path in paths:
        particles = read_particle_file(path)
        inputs += [InputFile(stack, f"particle stack of {path}") for stack in stack_paths(particles, directory)]
        if particles.random_subset is None and not settings.resplit:
            raise CryoSieveInputError(f"{path}: column rlnRandomSubset missing; give {setting('resplit')} to split the "
                                      "particles into new half-sets")
        counts = [len(particles)] if settings.resplit or particles.random_subset is None else \
            [int(np.sum(particles.random_subset == value)) for value in (1, 2)]
        smallest = min(counts) // 2 if settings.resplit else min(counts)
        if smallest < minimum_per_half:
            raise CryoSieveInputError(
                f"{path}: {smallest} particles in its smaller half-set; at least {minimum_per_half} are needed, so "
                f"that every set refined keeps {MIN_PER_HALF_SET} per half-set (more particles"
                + (f", or fewer {setting('halves')})" if minimum_per_half > MIN_PER_HALF_SET else ")"))
        with StackReader(particles, directory) as reader:
            box = reader.validate()
        pixel = float(particles.pixel_size[0])
        if not all(pixel_sizes_agree(float(value), pixel) for value in np.unique(particles.pixel_size)):
            raise CryoSieveInputError(f"{path}: optics groups of different pixel sizes; refine them one by one")
        if shape is None:
            shape = (box, pixel)
        elif box != shape[0] or not pixel_sizes_agree(pixel, shape[1]):
            raise CryoSieveInputError(f"{path}: box {box} at {pixel:g} Å differs from the first input's "
                                      f"{shape[0]} at {shape[1]:g} Å (one reference and mask serve them all)")
    assert shape is not None
    box, pixel = shape
    if settings.reference is not None:
        reference = read_volume(settings.reference, what="reference map")
        if reference.data.shape != (box,) * 3:
            raise CryoSieveInputError(f"{settings.reference}: box {reference.data.shape[0]} does not match the "
                                      f"particles' {box}")
        if reference.voxel_size is not None and not pixel_sizes_agree(reference.voxel_size, pixel):
            raise CryoSieveInputError(f"{settings.reference}: voxel size {reference.voxel_size:g} Å does not match "
                                      f"the particles' {pixel:g} Å")
    if settings.mask is not None:
        check_mask(read_volume(settings.mask, what="mask"), (box,) * 3, pixel, against="the particles")
    check_outputs(outputs, inputs, [])
    for folder in folders:
        for item in inputs:
            if Path(os.path.realpath(item.path)).is_relative_to(os.path.realpath(folder)):
                raise CryoSieveInputError(f"{item.path}: an input inside the job folder {folder}; choose another "
                                          f"{setting('output')}")
    remove_stale_temporaries_of(outputs)
    return paths, jobs.JobSettings(
        directory=directory, symmetry=symmetry,
        reference=Path(os.path.abspath(settings.reference)) if settings.reference else None,
        ini_high=None if settings.ini_high is None else float(settings.ini_high),
        mask=Path(os.path.abspath(settings.mask)) if settings.mask else None,
        particle_diameter=settings.particle_diameter, local=settings.local)


def _job_name(index: int, path: Path) -> str:
    return f"{index + 1:02d}_{path.stem}"


def _mask(result: RefinementResult, folder: Path) -> str:
    """The mask of a job's post-processing, for the summary: a file given, or the job's own in ``folder``."""
    if not result.mask or os.path.isabs(result.mask):
        return result.mask
    return str(folder / result.mask)


def _median(values: list[float | None]) -> float:
    finite = [value for value in values if value is not None and math.isfinite(value)]
    return float(np.median(finite)) if finite else math.nan


def _value(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _prepare(refiner: Refiner, specs: list[jobs.JobSpec], dry_run: bool) -> None:
    """A remote refiner's checks of the inputs (and, unless ``dry_run``, of its server) before any job."""
    if is_remote(refiner):
        cast(RemoteRefiner, refiner).prepare(sorted({spec.source for spec in specs}), dry_run)


def _plan(specs: list[jobs.JobSpec], settings: RefineSettings, job_settings: jobs.JobSettings, refiner: Refiner,
          root: Path) -> list[str]:
    """The lines of a dry run: how many jobs, then each job's plan (a remote refiner does not connect)."""
    _prepare(refiner, specs, dry_run=True)
    at_once = "all" if settings.workers is None else f"up to {settings.workers}"
    return [f"{len(specs)} refinement jobs with {refiner.describe()}, {at_once} at once, in {root}",
            *jobs.plan(specs, job_settings, refiner, root)]


def _run(specs: list[jobs.JobSpec], settings: RefineSettings, job_settings: jobs.JobSettings, refiner: Refiner,
         root: Path, progress: ProgressFactory) -> dict[str, RefinementResult]:
    """Every job's result (running those not done yet), with a warning for fixed-pose estimates."""
    _prepare(refiner, specs, dry_run=False)
    if any(isinstance(refiner, kind) for kind in _FIXED):
        log.warning("fixed poses: the resolutions are optimistic (the poses were found with other particles)")
    return jobs.run(specs, job_settings, refiner, root, workers=settings.workers, progress=progress)


def refine_files(settings: RefineSettings, refiner: Refiner, *, dry_run: bool = False,
                 progress: ProgressFactory = no_progress) -> Outcome:
    """``cryosieve-refine``: each input refined ``repeat`` times; writes the summary (one row per input and
    trial, with the trials' medians) atomically. ``dry_run``: the plan only, nothing run or written."""
    (summary,) = _paths(settings.output, ())
    root = Path(os.path.abspath(settings.output[: -len(".csv")] + "_jobs"))
    paths, job_settings = _check(settings, (summary,), [root], MIN_PER_HALF_SET)
    per_input = [[_resplit(spec, settings) for spec in jobs.with_trials(
        [jobs.JobSpec(name=_job_name(index, path), source=path, trial=0, level=0, seed=settings.seed)],
        settings.repeat)] for index, path in enumerate(paths)]
    specs = [spec for trials in per_input for spec in trials]
    if dry_run:
        return Outcome(None, _plan(specs, settings, job_settings, refiner, root))
    results = _run(specs, settings, job_settings, refiner, root, progress)
    rows = []
    for path, trials in zip(paths, per_input, strict=True):
        resolutions = [results[spec.name].resolution_angstrom for spec in trials]
        bfactors: list[float | None] = [results[spec.name].bfactor for spec in trials]
        for spec in trials:
            result = results[spec.name]
            rows.append([str(path), result.particles, _value(result.resolution_angstrom), result.bfactor,
                         str(root / spec.name / result.alignment_star), spec.trial + 1, result.fixed_pose,
                         _median(resolutions), _median(bfactors), _mask(result, root / spec.name)])
    table = pd.DataFrame(rows, columns=REFINE_COLUMNS)
    with OutputGroup() as group:
        table.to_csv(group.path_for(summary), index=False, float_format="%.6g")
    return Outcome(table, [])


def _resplit(spec: jobs.JobSpec, settings: RefineSettings, count: int | None = None) -> jobs.JobSpec:
    """With ``resplit``, new seeded half-sets for the job's particles."""
    if not settings.resplit:
        return spec
    if count is None:
        count = len(spec.rows) if spec.rows is not None else len(read_particle_file(spec.source))
    return replace(spec, halves=random_halves(count, spec.seed))


def rhbfactor_files(settings: RefineSettings, refiner: Refiner, *, voltage: int = 300, halves: int = 4,
                    dry_run: bool = False, progress: ProgressFactory = no_progress) -> Outcome:
    """``cryosieve-rhbfactor``: each input and ``halves`` nested random halves of it, refined in ``repeat``
    trials; the Rosenthal-Henderson fit per input over all its refinements. Writes ``OUT.csv``,
    ``OUT_raw.csv`` and ``OUT_rh.png`` together. ``dry_run``: the plan only."""
    voltage_constant(voltage)
    if halves < 1:
        raise CryoSieveInputError(f"{setting('halves')} {halves}: must be at least 1")
    summary, raw, plot = _paths(settings.output, ("_raw.csv", "_rh.png"))
    root = Path(os.path.abspath(settings.output[: -len(".csv")] + "_jobs"))
    paths, job_settings = _check(settings, (summary, raw, plot), [root], MIN_PER_HALF_SET * 2 ** halves)
    per_input: list[list[jobs.JobSpec]] = []
    for index, path in enumerate(paths):
        particles = read_particle_file(path)
        specs: list[jobs.JobSpec] = []
        per_input.append(specs)
        for trial in range(settings.repeat):
            seed = settings.seed + trial
            subsets = nested_subsets(len(particles), particles.random_subset, halves, seed,
                                     settings.resplit or particles.random_subset is None)
            for level, subset in enumerate(subsets):
                spec = jobs.JobSpec(name=f"{_job_name(index, path)}_trial{trial + 1}_half{level}", source=path,
                                    trial=trial, level=level, seed=seed, rows=subset)
                specs.append(_resplit(spec, settings, len(subset)))
    specs = [spec for mine in per_input for spec in mine]
    if dry_run:
        return Outcome(None, _plan(specs, settings, job_settings, refiner, root))
    results = _run(specs, settings, job_settings, refiner, root, progress)
    order = group_order(job_settings.symmetry)
    raw_rows: list[list[object]] = []
    rows: list[list[object]] = []
    fits: list[tuple[str, RHFit, list[jobs.JobSpec]]] = []
    for path, mine in zip(paths, per_input, strict=True):
        for spec in mine:
            result = results[spec.name]
            raw_rows.append([str(path), spec.trial + 1, spec.level, result.particles,
                             _value(result.resolution_angstrom), result.bfactor,
                             str(root / spec.name / result.alignment_star), result.fixed_pose,
                             _mask(result, root / spec.name)])
        fit = fit_rh(np.array([_value(results[spec.name].resolution_angstrom) for spec in mine]),
                     np.array([results[spec.name].particles for spec in mine]), order, voltage)
        fits.append((str(path), fit, mine))
        full = [results[spec.name].resolution_angstrom for spec in mine if spec.level == 0]
        masks = sorted({_mask(results[spec.name], root / spec.name) for spec in mine})
        rows.append([str(path), _median(full), fit.bfactor, fit.classical_bfactor, settings.repeat,
                     all(results[spec.name].fixed_pose for spec in mine),
                     masks[0] if len(masks) == 1 else "; ".join(masks)])
    table = pd.DataFrame(rows, columns=RH_COLUMNS)
    with OutputGroup() as group:
        table.to_csv(group.path_for(summary), index=False, float_format="%.6g")
        pd.DataFrame(raw_rows, columns=RAW_COLUMNS).to_csv(group.path_for(raw), index=False, float_format="%.6g")
        _plot_rh(group.path_for(plot), [(name, fit, [(results[spec.name].resolution_angstrom,
                                                      results[spec.name].particles) for spec in mine])
                                        for name, fit, mine in fits], order, voltage,
                 fixed_pose=all(result.fixed_pose for result in results.values()),
                 mask=f"mask {Path(settings.mask).name}" if settings.mask else
                 "no mask given: each job's own (the mask column of the summary)")
    return Outcome(table, [])


def _plot_rh(path: Path, fits: list[tuple[str, RHFit, list[tuple[float | None, int]]]], order: int,
             voltage: int, fixed_pose: bool, mask: str) -> None:
    """``ln N`` against ``1 / d^2`` for each input, with both fits and their B-factors in the legend; the title
    says when the poses were the given ones, and which mask the resolutions were measured with."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    constant = voltage_constant(voltage)
    for index, (name, fit, points) in enumerate(fits):
        colour = f"C{index % 10}"
        measured = [(d, n) for d, n in points if d is not None and math.isfinite(d)]
        x = np.array([1 / d**2 for d, _ in measured])
        y = np.log([n for _, n in measured])
        axes.scatter(x, y, color=colour, s=18, label=f"{Path(name).name}")
        line = np.linspace(x.min() * 0.9, x.max() * 1.1, 100)
        d = 1 / np.sqrt(line)
        axes.plot(line, np.log(constant) + fit.a / (2 * d**2) - np.log(d) - np.log(order), color=colour,
                  label=f"fit of CryoSieve: B = {fit.bfactor:.0f} Å²")
        axes.plot(line, fit.classical_slope * line + fit.classical_intercept, color=colour, linestyle="--",
                  label=f"straight line: B = {fit.classical_bfactor:.0f} Å²")
    axes.set_xlabel("1 / resolution² (1/Å²)")
    axes.set_ylabel("ln(number of particles)")
    axes.set_title("Rosenthal-Henderson plot" + (" (fixed poses: optimistic)" if fixed_pose else "") + f"\n{mask}",
                   fontsize="medium")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(str(path), format="png")
