"""The iterative CryoSieve pipeline: reconstruct, post-process, sieve, repeat.

Round ``i`` (0 .. ``num_iters - 1``), as the published CryoSieve runs it:

1. reconstruct the two half maps of ``PREFIX_iter{i}.star`` ->
   ``PREFIX_iter{i}_half1.mrc`` and ``PREFIX_iter{i}_half2.mrc``;
2. post-process them -> ``PREFIX_postprocess_iter{i}/iter{i}.*``;
3. sieve ``PREFIX_iter{i}.star`` with those half maps and the mask at the high-pass
   cut-off ``F_i`` -> ``PREFIX_iter{i+1}.star`` (kept), ``PREFIX_iter{i+1}_sieved.star``
   (removed) and ``PREFIX_iter{i+1}_scores.csv``.

``F_i = 1 / linspace(1 / frequency_start, 1 / frequency_end, num_iters)[i]`` Å, rounded to
0.001 Å as the published program passes it on.  ``PREFIX_iter0.star`` is the input (a
byte copy, or with ``balance`` the subset that makes both half-sets equally large).
As in the published program, the last kept set ``PREFIX_iter{num_iters}.star`` is not
reconstructed.

Resuming: ``PREFIX_state.json`` (written atomically) holds the arguments that determine
the outputs and the list of completed steps; each step writes its outputs atomically
before it is recorded.  A run started again with ``resume=True`` skips every recorded
step, so an interrupted run ends with the same files as an uninterrupted one.  Every
random choice is seeded.

The library never prints: it logs to the ``cryosieve`` logger (and, while running, to
``PREFIX_pipeline.log``) and reports progress through a caller-given factory.
"""

from __future__ import annotations

import contextlib
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
from typing import Any

import numpy as np
import pandas as pd
import torch

from cryosieve.backends.relion import (
    reconstruct_half_maps,
    run_postprocess,
    split_command,
    with_launcher,
)
from cryosieve.band import HighPass
from cryosieve.errors import CryoSieveInputError
from cryosieve.io.atomic import (
    OutputGroup,
    atomic_path,
    remove_stale_temporaries,
    write_text_atomic,
)
from cryosieve.io.lock import exclusive_lock
from cryosieve.io.mrc import Volume, read_volume, write_volume_to
from cryosieve.io.paths import InputFile, check_outputs
from cryosieve.io.stack import StackReader, stack_paths
from cryosieve.io.star import read_particles
from cryosieve.particles import ParticleSet
from cryosieve.mask import check_mask
from cryosieve.progress import ProgressFactory, no_progress
from cryosieve.report import ReportPaths, RoundSummary, report_paths, write_report
from cryosieve.sieve import (
    SieveSettings,
    check_geometry,
    check_settings,
    half_sets,
    sieve,
    sieve_output_paths,
    write_sieve_outputs,
)
from cryosieve.symmetry import canonical_name
from cryosieve.tolerances import pixel_sizes_agree

log = logging.getLogger("cryosieve")

STATE_FORMAT = 2
BALANCE_SEED = 0


@dataclass(frozen=True)
class PipelineSettings:
    """Arguments of one run (the command line of ``cryosieve``).

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
        Point group for reconstruction (RELION's names).
    num_iters, frequency_start, frequency_end, retention_ratio, balance:
        As in the published CryoSieve (cut-offs in Å).
    reconstruct_software, postprocess_software:
        External command lines, or ``None`` for the built-in back-ends.
    num_procs:
        The published ``--num_procs``: prefix ``mpirun -n N`` to the reconstruction
        command; ``None`` runs the command line as given.
    num_gpus:
        Scoring processes (one per GPU on CUDA).
    device:
        Where the built-in steps compute.
    batch_size, projector, reference_weighting:
        Passed to the sieving engine.
    reconstruct_batch_size:
        Images per batch of the built-in reconstruction.
    report:
        Write the plots and the HTML page (the summary CSV is always written).
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
    retention_ratio: float = 0.8
    balance: bool = False
    reconstruct_software: str | None = None
    postprocess_software: str | None = None
    num_procs: int | None = None
    num_gpus: int = 1
    device: str | torch.device = "cpu"
    batch_size: int = 256
    projector: str = "fourier"
    reference_weighting: str = "auto"
    reconstruct_batch_size: int = 128
    report: bool = True


@dataclass(frozen=True)
class OutputNames:
    """Every output path of a run, from its prefix (string concatenation, as published)."""

    prefix: str

    def _path(self, suffix: str) -> Path:
        return Path(self.prefix + suffix)

    def star(self, iteration: int) -> Path:
        return self._path(f"_iter{iteration}.star")

    def sieved(self, iteration: int) -> Path:
        return self._path(f"_iter{iteration}_sieved.star")

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
                      self.postprocess_log(iteration), *sieve_output_paths(self.star(iteration + 1))]
        report = report_paths(self.prefix)
        paths += [report.summary_csv, report.resolution_plot, report.fsc_plot, report.scores_plot, report.html]
        return paths

    def folders(self, num_iters: int) -> list[Path]:
        """The post-processing folders of a run (each replaced as a whole)."""
        return [self.postprocess_directory(iteration) for iteration in range(num_iters)]

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
    """High-pass cut-off (Å) of each round: ``1 / linspace(1/start, 1/end, n)``, rounded to 0.001 Å.

    The published program (1.3.3) passes ``f"{F:.3f}"`` to the sieve (its log shows
    ``F:.2f``), so the rounding is part of the result.  Returns ``(num_iters,)`` float64.
    """
    exact = 1.0 / np.linspace(1.0 / frequency_start, 1.0 / frequency_end, num_iters)
    return np.array([float(f"{value:.3f}") for value in exact], dtype=np.float64)


def step_names(num_iters: int) -> list[str]:
    """Every step of a run, in order."""
    names = ["prepare"]
    for iteration in range(num_iters):
        names += [f"reconstruct {iteration}", f"postprocess {iteration}", f"sieve {iteration}"]
    return names


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
    table: ParticleSet  # the input, as read
    rows0: np.ndarray  # rows of ``table`` in PREFIX_iter0.star
    box: int
    angpix: float  # Å, of the particles and every map
    symmetry: str  # canonical name
    mask: Volume
    cutoffs: np.ndarray
    device: torch.device
    reconstruct_program: list[str] | None
    postprocess_program: list[str] | None
    arguments: dict[str, Any]


def _positive(option: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise CryoSieveInputError(f"{option} {value}: must be a positive number")


def _check_numbers(settings: PipelineSettings) -> None:
    if settings.angpix is not None:
        _positive("--angpix", settings.angpix)
    if not isinstance(settings.num_iters, int) or settings.num_iters < 1:
        raise CryoSieveInputError(f"--num_iters {settings.num_iters}: must be at least 1")
    _positive("--frequency_start", settings.frequency_start)
    _positive("--frequency_end", settings.frequency_end)
    if not (0.0 < settings.retention_ratio <= 1.0):
        raise CryoSieveInputError(f"--retention_ratio {settings.retention_ratio}: must be in (0, 1]")
    if settings.num_procs is not None and settings.num_procs < 1:
        raise CryoSieveInputError(f"--num_procs {settings.num_procs}: must be at least 1")
    if settings.reconstruct_batch_size < 1:
        raise CryoSieveInputError(f"--batch_size {settings.reconstruct_batch_size}: must be at least 1")
    if not settings.output_prefix or not settings.output_prefix.strip():
        raise CryoSieveInputError("--o: empty output prefix")
    check_settings(_sieve_settings(settings, settings.frequency_start))


def _sieve_settings(settings: PipelineSettings, cutoff: float) -> SieveSettings:
    return SieveSettings(retention_ratio=settings.retention_ratio, highpass_angstrom=float(cutoff),
                         projector=settings.projector, reference_weighting=settings.reference_weighting,
                         batch_size=settings.batch_size, device=settings.device, num_processes=settings.num_gpus,
                         balance=settings.balance)


def _pixel_size(settings: PipelineSettings, table: ParticleSet) -> float:
    """The one pixel size (Å) of the run: ``--angpix`` (checked against the file by
    :func:`read_particles`) or the file's own."""
    if settings.angpix is not None:
        return float(settings.angpix)
    sizes = np.unique(table.pixel_size)
    if any(not pixel_sizes_agree(float(size), float(sizes[0])) for size in sizes):
        raise CryoSieveInputError(
            f"{settings.input_star}: optics groups of different pixel sizes ({', '.join(f'{v:g}' for v in sizes)} Å); "
            "the maps need one: give --angpix")
    return float(sizes[0])


def _inputs(settings: PipelineSettings, table: ParticleSet) -> list[InputFile]:
    inputs = [InputFile(Path(settings.input_star), "--i, the particle STAR file"),
              InputFile(Path(settings.mask), "--mask")]
    inputs += [InputFile(path, f"particle stack of {settings.input_star}")
               for path in stack_paths(table, settings.directory or None)]
    return inputs


def prepare(settings: PipelineSettings) -> _Prepared:
    """Read and check every input; raises :class:`CryoSieveInputError` before anything is written."""
    _check_numbers(settings)
    symmetry = canonical_name(settings.symmetry)  # unknown names are an input error
    reconstruct_program = None
    if settings.reconstruct_software is not None:
        reconstruct_program = with_launcher(split_command("--reconstruct_software", settings.reconstruct_software),
                                            settings.num_procs)
        if settings.num_procs is not None:
            split_command("--num_procs", "mpirun")
    postprocess_program = None
    if settings.postprocess_software is not None:
        postprocess_program = split_command("--postprocess_software", settings.postprocess_software)
    if settings.directory and not os.path.isdir(settings.directory):
        raise CryoSieveInputError(f"--directory {settings.directory}: not a folder")
    if not os.path.isfile(settings.input_star):
        raise CryoSieveInputError(f"--i {settings.input_star}: file not found")
    if not settings.input_star.endswith(".star"):
        raise CryoSieveInputError(f"--i {settings.input_star}: not a STAR file (name must end in .star)")
    if not os.path.isfile(settings.mask):
        raise CryoSieveInputError(f"--mask {settings.mask}: file not found")
    table = read_particles(settings.input_star, settings.angpix)
    names = OutputNames(settings.output_prefix)
    check_outputs(names.files(settings.num_iters), _inputs(settings, table), names.folders(settings.num_iters))
    if table.random_subset is None:
        raise CryoSieveInputError(f"{settings.input_star}: column rlnRandomSubset missing (half-sets 1 and 2 needed)")
    present = sorted(set(table.random_subset.tolist()))
    if present != [1, 2]:
        raise CryoSieveInputError(
            f"{settings.input_star}: rlnRandomSubset must hold half-sets 1 and 2, found {present}")
    angpix = _pixel_size(settings, table)
    with StackReader(table, settings.directory or None) as reader:
        box = reader.validate()
    mask = read_volume(settings.mask, what="mask")
    check_mask(mask, (box, box, box), angpix, against="the particles")
    for option, value in (("--frequency_start", settings.frequency_start),
                          ("--frequency_end", settings.frequency_end)):
        HighPass(value).check(box, float(np.max(table.pixel_size)), option)
    cutoffs = cutoff_frequencies(settings.frequency_start, settings.frequency_end, settings.num_iters)
    for cutoff in cutoffs:
        HighPass(float(cutoff)).check(box, float(np.max(table.pixel_size)),
                                      f"--frequency_end {settings.frequency_end} (a round's cut-off, rounded to 0.001 Å)")
    rows0 = balanced_rows(table.random_subset) if settings.balance else np.arange(len(table))
    device = torch.device(settings.device)
    arguments = {
        "--i": os.path.abspath(settings.input_star),
        "--i (contents, sha256)": _sha256(settings.input_star),
        "--mask": os.path.abspath(settings.mask),
        "--mask (contents, sha256)": _sha256(settings.mask),
        "--directory": os.path.abspath(settings.directory or "."),
        "--angpix": angpix,
        "--sym": symmetry,
        "--num_iters": int(settings.num_iters),
        "--frequency_start": float(settings.frequency_start),
        "--frequency_end": float(settings.frequency_end),
        "--retention_ratio": float(settings.retention_ratio),
        "--balance": bool(settings.balance),
        "--reconstruct_software": settings.reconstruct_software,
        "--postprocess_software": settings.postprocess_software,
        "--num_procs": settings.num_procs,
        "--projector": settings.projector,
        "--reference_weighting": settings.reference_weighting,
    }
    return _Prepared(settings=settings, names=names, table=table, rows0=rows0, box=box, angpix=angpix,
                     symmetry=symmetry, mask=mask, cutoffs=cutoffs, device=device,
                     reconstruct_program=reconstruct_program, postprocess_program=postprocess_program,
                     arguments=arguments)


# --------------------------------------------------------------------------- state


class _State:
    """``PREFIX_state.json``: arguments and completed steps, rewritten atomically."""

    def __init__(self, path: Path, arguments: dict[str, Any], completed: list[str]) -> None:
        self.path = path
        self.arguments = arguments
        self.completed = completed

    def save(self) -> None:
        document = {"program": "cryosieve", "format": STATE_FORMAT, "arguments": self.arguments,
                    "completed": self.completed}
        write_text_atomic(self.path, json.dumps(document, indent=2) + "\n")

    def done(self, step: str) -> bool:
        return step in self.completed

    def record(self, step: str) -> None:
        self.completed.append(step)
        self.save()


def _open_state(prepared: _Prepared, resume: bool) -> _State:
    """Load (``resume``) or refuse to overwrite the state of an earlier run; nothing is written."""
    path = prepared.names.state
    if not path.exists():
        if resume:
            log.info("--continue: no %s yet, starting from the beginning", path)
        return _State(path, prepared.arguments, [])
    if not resume:
        raise CryoSieveInputError(
            f"--o {prepared.settings.output_prefix}: {path} exists (an earlier run); add --continue to resume it "
            "or choose another --o")
    try:
        document = json.loads(path.read_text())
        recorded = document["arguments"]
        completed = [str(step) for step in document["completed"]]
        version = int(document.get("format", 1))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CryoSieveInputError(f"{path}: not a readable state file ({error})") from None
    if version != STATE_FORMAT:
        raise CryoSieveInputError(
            f"--continue: {path} was written by another version of cryosieve (state format {version}, this one "
            f"reads {STATE_FORMAT}); start a new run with another --o")
    for option, value in prepared.arguments.items():
        if option not in recorded:
            raise CryoSieveInputError(f"--continue: {path} does not record {option}; start a new run")
        if recorded[option] != value:
            if option.endswith("(contents, sha256)"):
                raise CryoSieveInputError(
                    f"--continue: {option.split()[0]} file changed since the run recorded in {path}")
            raise CryoSieveInputError(
                f"--continue: {option} changed ({recorded[option]!r} in {path}, now {value!r})")
    unknown = [step for step in completed if step not in step_names(prepared.settings.num_iters)]
    if unknown:
        raise CryoSieveInputError(f"{path}: unknown step {unknown[0]!r}")
    return _State(path, prepared.arguments, completed)


# --------------------------------------------------------------------------- steps


def _write_iter0(prepared: _Prepared) -> None:
    target = prepared.names.star(0)
    source = Path(prepared.settings.input_star)
    if not prepared.settings.balance:
        with atomic_path(target) as temporary:
            shutil.copyfile(source, temporary)
    else:
        prepared.table.subset(prepared.rows0).write(target)


def _reconstruct_builtin(prepared: _Prepared, table: ParticleSet, iteration: int,
                         progress: ProgressFactory) -> None:
    from cryosieve.reconstruct import reconstruct_subsets

    settings = prepared.settings
    with StackReader(table, settings.directory or None) as reader, \
            progress(f"iter {iteration}: reconstruct", len(table)) as update:
        maps = reconstruct_subsets(table, reader, subsets=(1, 2), symmetry=prepared.symmetry, apply_ctf=True,
                                   batch_size=settings.reconstruct_batch_size, device=prepared.device,
                                   progress=update)
    names = prepared.names
    with OutputGroup() as group:
        for subset in (1, 2):
            write_volume_to(group.path_for(names.half_map(iteration, subset)), maps[subset], prepared.angpix)


def _reconstruct_external(prepared: _Prepared, iteration: int) -> None:
    names = prepared.names
    assert prepared.reconstruct_program is not None
    directory = Path(prepared.settings.directory) if prepared.settings.directory else Path.cwd()
    reconstruct_half_maps(prepared.reconstruct_program, names.star(iteration).absolute(),
                          (names.half_map(iteration, 1), names.half_map(iteration, 2)),
                          prepared.angpix, prepared.symmetry,
                          (names.reconstruct_log(iteration, 1), names.reconstruct_log(iteration, 2)),
                          cwd=directory.absolute())


def _report_paths(folder: Path, root_name: str) -> dict[str, Path]:
    from cryosieve.postprocess import REPORT_FILES, output_paths

    paths = output_paths(folder / root_name)
    return {key: Path(paths[key]) for key in REPORT_FILES}


def _postprocess_builtin(prepared: _Prepared, iteration: int) -> None:
    from cryosieve.postprocess import postprocess, write_postprocess

    names = prepared.names
    half1 = read_volume(names.half_map(iteration, 1))
    half2 = read_volume(names.half_map(iteration, 2))
    result = postprocess(half1.data, half2.data, prepared.mask.data, prepared.angpix, auto_bfactor=True,
                         autob_lowres=AUTOB_LOWRES, device=prepared.device)
    with OutputGroup() as group:
        folder = group.folder_for(names.postprocess_directory(iteration))
        write_postprocess(result, str(folder / names.postprocess_root_name(iteration)), prepared.angpix)


def _postprocess_external(prepared: _Prepared, iteration: int) -> None:
    """The external program's files, and ours made from its STAR file beside them, so that
    every back-end leaves the same files for the report."""
    from cryosieve.postprocess import report_from_relion, write_report_files

    names = prepared.names
    assert prepared.postprocess_program is not None
    with OutputGroup() as group:
        folder = group.folder_for(names.postprocess_directory(iteration))
        root = folder / names.postprocess_root_name(iteration)
        star = run_postprocess(prepared.postprocess_program, names.half_map(iteration, 1),
                               names.half_map(iteration, 2), Path(prepared.settings.mask), prepared.angpix,
                               root, names.postprocess_log(iteration))
        report = report_from_relion(star, prepared.box, prepared.angpix, autob_lowres=AUTOB_LOWRES)
        write_report_files(report, _report_paths(folder, names.postprocess_root_name(iteration)), prepared.angpix)


#: Lowest resolution (Å) of the automatic B-factor fit, as the published program runs RELION.
AUTOB_LOWRES = 10.0


def read_postprocess_outcome(names: OutputNames, iteration: int, voxel_size: float
                             ) -> tuple[float, float, np.ndarray, np.ndarray]:
    """``(resolution Å, B-factor Å^2, frequency 1/Å (m,), corrected FSC (m,))`` of round ``iteration``,
    from ``iter{i}.json`` and ``iter{i}_fsc.csv`` in ``PREFIX_postprocess_iter{i}`` (every back-end writes them)."""
    paths = _report_paths(names.postprocess_directory(iteration), names.postprocess_root_name(iteration))
    try:
        document = json.loads(paths["summary"].read_text())
        table = pd.read_csv(paths["fsc_csv"])
        box = int(document.get("box") or 2 * (len(table) - 1))
        frequency = table["shell"].to_numpy(dtype=np.float64) / (box * voxel_size)
        resolution = document["final_resolution_angstrom"]
        return (float(resolution) if resolution is not None else math.nan, float(document["bfactor"]),
                frequency, table["fsc_corrected"].to_numpy(dtype=np.float64))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CryoSieveInputError(f"{paths['summary'].parent}: post-processing output missing or unreadable "
                                  f"({type(error).__name__}: {error}); start a new run") from None


def _sieve_round(prepared: _Prepared, table: ParticleSet, iteration: int, progress: ProgressFactory) -> np.ndarray:
    """Sieve the particles of round ``iteration``; writes the next set; returns the kept mask ``(n,)``."""
    settings = prepared.settings
    names = prepared.names
    cutoff = float(prepared.cutoffs[iteration])
    sieve_settings = _sieve_settings(settings, cutoff)
    volumes = [read_volume(names.half_map(iteration, subset)) for subset in (1, 2)]
    half_set = half_sets(table, 2)
    check_geometry(table, prepared.box, volumes, cutoff)
    with StackReader(table, settings.directory or None) as reader, \
            progress(f"iter {iteration}: sieve at {cutoff:.2f} Å", len(table)) as update:
        result = sieve(table, reader, volumes, prepared.mask, half_set, sieve_settings, progress=update)
    write_sieve_outputs(table, result, names.star(iteration + 1))
    return result.kept


def _kept_from_scores(names: OutputNames, iteration: int, table: ParticleSet) -> np.ndarray:
    """Kept mask of sieve ``iteration`` read back from ``PREFIX_iter{i+1}_scores.csv`` (to resume)."""
    path = names.scores(iteration + 1)
    if not path.is_file():
        raise CryoSieveInputError(f"{path}: missing, but its sieve is recorded as done; start a new run")
    scores = pd.read_csv(path, keep_default_na=False, dtype={"rlnImageName": str})
    if len(scores) != len(table) or not np.array_equal(scores["rlnImageName"].to_numpy(dtype=object),
                                                       table.image_name.astype(str)):
        raise CryoSieveInputError(f"{path}: does not list the particles of {names.star(iteration)}")
    return scores["kept"].to_numpy(dtype=np.int64).astype(bool)


# --------------------------------------------------------------------------- report data


def _round_summary(prepared: _Prepared, iteration: int, table: ParticleSet, state: _State) -> RoundSummary:
    names = prepared.names
    summary = RoundSummary(
        iteration=iteration,
        cutoff_angstrom=float(prepared.cutoffs[iteration]) if iteration < prepared.settings.num_iters else None,
        particles_half1=int(np.sum(table.random_subset == 1)),
        particles_half2=int(np.sum(table.random_subset == 2)),
    )
    if state.done(f"postprocess {iteration}"):
        resolution, bfactor, frequency, fsc = read_postprocess_outcome(names, iteration, prepared.angpix)
        summary.resolution_angstrom = resolution
        summary.bfactor = bfactor
        summary.fsc_frequency = frequency
        summary.fsc_corrected = fsc
    if state.done(f"sieve {iteration}"):
        scores = pd.read_csv(names.scores(iteration + 1), keep_default_na=False, dtype={"rlnImageName": str})
        summary.scores = scores["score"].to_numpy(dtype=np.float64)
        summary.half_set = scores["half_set"].to_numpy(dtype=np.int64)
        summary.kept = scores["kept"].to_numpy(dtype=np.int64).astype(bool)
    return summary


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
        The run's arguments.
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
        arguments with it (all before any output is written).
    cryosieve.errors.ExternalCommandError
        An external program failed (the run can be continued after fixing the cause).
    """
    progress = progress or no_progress
    checkpoint = checkpoint or (lambda: None)
    prepared = prepare(settings)
    _open_state(prepared, resume)  # refuse early, before the output folder is made
    names = prepared.names
    folder = names.state.parent
    made_folder = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive_lock(names.lock, f"--o {settings.output_prefix}"):
            state = _open_state(prepared, resume)  # again, now that no other run can change it
            if not state.path.exists():
                state.save()
            made_folder = False
            return _run_steps(prepared, state, resume, progress, checkpoint)
    finally:
        if made_folder:
            with contextlib.suppress(OSError):
                folder.rmdir()


def _run_steps(prepared: _Prepared, state: _State, resume: bool, progress: ProgressFactory,
               checkpoint: Callable[[], None]) -> PipelineResult:
    settings, names = prepared.settings, prepared.names
    computed: list[str] = []
    skipped: list[str] = []

    def run_step(step: str, action: Callable[[], None]) -> None:
        if state.done(step):
            skipped.append(step)
            return
        checkpoint()
        started = time.perf_counter()
        action()
        state.record(step)
        computed.append(step)
        log.info("%s: done in %.1f s", step, time.perf_counter() - started)

    with _log_to_file(names.log):
        log.info("cryosieve %s: %s", "continuing" if resume else "starting",
                 " ".join(f"{key}={value}" for key, value in prepared.arguments.items() if "sha256" not in key))
        if state.completed:
            log.info("already done: %s", ", ".join(state.completed))
        # Under the lock no other run writes here: every temporary of ours is left by a killed run.
        for path in remove_stale_temporaries(names.state.parent, names.owns, any_owner=True):
            log.info("removed %s, left by an interrupted run", path)
        run_step("prepare", lambda: _write_iter0(prepared))
        table = prepared.table.subset(prepared.rows0) if settings.balance else prepared.table
        rounds: list[RoundSummary] = []
        for iteration in range(settings.num_iters):
            cutoff = float(prepared.cutoffs[iteration])
            log.info("[ITER %d] %d particles (half-sets %d + %d); cut-off %.2f Å", iteration, len(table),
                     int(np.sum(table.random_subset == 1)), int(np.sum(table.random_subset == 2)), cutoff)
            if prepared.reconstruct_program is None:
                run_step(f"reconstruct {iteration}",
                         lambda: _reconstruct_builtin(prepared, table, iteration, progress))
            else:
                run_step(f"reconstruct {iteration}", lambda: _reconstruct_external(prepared, iteration))
            if prepared.postprocess_program is None:
                run_step(f"postprocess {iteration}", lambda: _postprocess_builtin(prepared, iteration))
            else:
                run_step(f"postprocess {iteration}", lambda: _postprocess_external(prepared, iteration))
            resolution, bfactor, _, _ = read_postprocess_outcome(names, iteration, prepared.angpix)
            log.info("[ITER %d] resolution %.2f Å, B-factor %.1f Å^2", iteration, resolution, bfactor)
            step = f"sieve {iteration}"
            if state.done(step):
                kept = _kept_from_scores(names, iteration, table)
                skipped.append(step)
            else:
                checkpoint()
                started = time.perf_counter()
                kept = _sieve_round(prepared, table, iteration, progress)
                state.record(step)
                computed.append(step)
                log.info("%s: done in %.1f s", step, time.perf_counter() - started)
            rounds.append(_round_summary(prepared, iteration, table, state))
            table = table.subset(kept)
            log.info("[ITER %d] kept %d particles (half-sets %d + %d)", iteration, len(table),
                     int(np.sum(table.random_subset == 1)), int(np.sum(table.random_subset == 2)))
            checkpoint()
            write_report(names.prefix, rounds + [_round_summary(prepared, iteration + 1, table, state)],
                         plots=settings.report)
        rounds.append(_round_summary(prepared, settings.num_iters, table, state))
        report = write_report(names.prefix, rounds, plots=settings.report)
        best = min((summary for summary in rounds if summary.resolution_angstrom is not None),
                   key=lambda summary: summary.resolution_angstrom)
        log.info("best resolution %.2f Å at iteration %d (%d particles); summary %s", best.resolution_angstrom,
                 best.iteration, best.particles, report.summary_csv)
    return PipelineResult(rounds=rounds, report=report, computed_steps=computed, skipped_steps=skipped)
