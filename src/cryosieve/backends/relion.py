"""RELION's programs as the pipeline's reconstruction and post-processing back-ends.

The command lines are the published CryoSieve's:

* reconstruction, both half-sets launched at once (two processes in parallel)::

      CMD --i STAR --o HALF.mrc --angpix A --sym SYM --ctf true --subset 1|2

  ``CMD`` is split with :func:`shlex.split`, so a whole launcher line such as
  ``"mpirun -n 5 relion_reconstruct_mpi --j 4"`` works.  The working directory is the
  particle directory (RELION resolves ``rlnImageName`` against it); every path given to
  the program is absolute.

* post-processing::

      CMD --i HALF1 --i2 HALF2 --mask MASK --angpix A --auto_bfac --autob_lowres 10 --o ROOT

  whose ``ROOT.star`` gives the final resolution (``rlnFinalResolution``), the
  sharpening B-factor (``rlnBfactorUsedForSharpening``), the FSC curves and the Guinier
  plot, from which :func:`report_from_relion_star` makes the report files every
  post-processing back-end leaves.

Standard output and standard error of every command go to a log file.  Outputs are
written under temporary names and renamed only when every process succeeded, so a run
killed while a program runs never leaves a half-written map under its final name; the
programs run in process groups of their own and are stopped with the run
(:mod:`cryosieve.processes`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import shlex
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryosieve import processes
from cryosieve.backends import HalfMapJob, PostprocessJob, RefinementJob, RefinementResult
from cryosieve.backends.builtin import AUTOB_LOWRES, measure_half_maps, result_of
from cryosieve.errors import CryoSieveInputError, ExternalCommandError, setting
from cryosieve.io.atomic import OutputGroup, temporary_name
from cryosieve.io.mrc import write_volume
from cryosieve.io.paths import disk_full, no_space_error
from cryosieve.io.stack import StackReader
from cryosieve.postprocess.files import output_paths, write_report_files
from cryosieve.postprocess.report import REPORT_FILES, PostprocessReport
from cryosieve.progress import ProgressFactory

log = logging.getLogger("cryosieve")

#: Seconds a stopped program gets to end after SIGTERM before its group gets SIGKILL.
STOP_GRACE = 5.0


def split_command(field: str, command_line: str) -> list[str]:
    """Split a user-given program line into words and check that its program exists.

    Raises :class:`CryoSieveInputError` naming the setting ``field`` for an empty line,
    unbalanced quotes or a program that is not found on ``PATH``.
    """
    try:
        words = shlex.split(command_line)
    except ValueError as error:
        raise CryoSieveInputError(f"{setting(field)} {command_line!r}: cannot be split into words ({error})") from None
    if not words:
        raise CryoSieveInputError(f"{setting(field)}: empty command")
    if shutil.which(words[0]) is None:
        raise CryoSieveInputError(f"{setting(field)} {command_line!r}: program {words[0]!r} not found")
    return words


def with_launcher(words: Sequence[str], num_procs: int | None) -> list[str]:
    """Prefix ``mpirun -n N`` (the published ``--num_procs``); ``None`` leaves the line as given."""
    if num_procs is None:
        return list(words)
    if num_procs < 1:
        raise CryoSieveInputError(f"{setting('num_procs')} {num_procs}: must be at least 1")
    split_command("num_procs", "mpirun")
    return ["mpirun", "-n", str(int(num_procs)), *words]


def reconstruct_command(program: Sequence[str], star: Path, output: Path, angpix: float, symmetry: str,
                        subset: int) -> list[str]:
    """``relion_reconstruct`` arguments for one half-set (absolute paths)."""
    return [*program, "--i", str(Path(star).absolute()), "--o", str(Path(output).absolute()),
            "--angpix", repr(float(angpix)), "--sym", symmetry, "--ctf", "true", "--subset", str(int(subset))]


def postprocess_command(program: Sequence[str], half1: Path, half2: Path, mask: Path, angpix: float,
                        root: Path) -> list[str]:
    """``relion_postprocess`` arguments (absolute paths), as the published CryoSieve runs it."""
    return [*program, "--i", str(Path(half1).absolute()), "--i2", str(Path(half2).absolute()),
            "--mask", str(Path(mask).absolute()), "--angpix", repr(float(angpix)), "--auto_bfac",
            "--autob_lowres", f"{AUTOB_LOWRES:g}", "--o", str(Path(root).absolute())]


def run_in_parallel(commands: Sequence[Sequence[str]], log_paths: Sequence[Path], cwd: Path | None = None) -> None:
    """Start every command at once, wait for all, raise for the first that failed.

    Each command's standard output and error are written to its log file (replaced). If
    this process is interrupted meanwhile, every program is stopped before the exception
    goes on.
    """
    import subprocess

    started: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as handles:  # the logs are closed after every program is stopped
        try:
            for command, log_path in zip(commands, log_paths, strict=True):
                Path(log_path).parent.mkdir(parents=True, exist_ok=True)
                handle = handles.enter_context(open(log_path, "w"))
                handle.write("$ " + shlex.join(command) + "\n")
                handle.flush()
                started.append(processes.start(command, stdout=handle, stderr=subprocess.STDOUT,
                                               cwd=str(cwd) if cwd is not None else None))
            for process in started:
                process.wait()
        finally:
            processes.stop(started, STOP_GRACE)
    for command, log_path, process in zip(commands, log_paths, started, strict=True):
        if process.returncode != 0:
            folder = Path(log_path).parent
            if disk_full(folder):  # the program's own message could not be written either
                raise no_space_error(folder, f"{Path(command[0]).name} ... failed with exit code {process.returncode}; "
                                             f"its output, as far as it could be written, is in {log_path}")
            raise ExternalCommandError(shlex.join(command), str(log_path), process.returncode)


@dataclass(frozen=True)
class RelionReconstructor:
    """``relion_reconstruct`` (or a program with its command line) for both half-sets at once.

    ``program``: the command's words, launcher included (:meth:`from_command_line`).
    """

    program: tuple[str, ...]

    @classmethod
    def from_command_line(cls, command_line: str, num_procs: int | None = None) -> RelionReconstructor:
        """From the user's command line (``reconstructor``) and the published ``--num_procs``."""
        return cls(tuple(with_launcher(split_command("reconstructor", command_line), num_procs)))

    def describe(self) -> str:
        return shlex.join(self.program)

    def reconstruct_half_maps(self, job: HalfMapJob, progress: ProgressFactory) -> None:
        temporaries = [temporary_name(Path(output)) for output in job.outputs]
        commands = [reconstruct_command(self.program, job.star, temporary, job.pixel_size, job.symmetry, subset)
                    for subset, temporary in zip((1, 2), temporaries, strict=True)]
        cwd = (job.directory or Path.cwd()).absolute()
        try:
            run_in_parallel(commands, job.logs, cwd)
            for command, temporary, log_path in zip(commands, temporaries, job.logs, strict=True):
                if not temporary.is_file():
                    raise ExternalCommandError(shlex.join(command), str(log_path), 1)
            for temporary, output in zip(temporaries, job.outputs, strict=True):
                os.replace(temporary, output)
        finally:
            for temporary in temporaries:
                with contextlib.suppress(FileNotFoundError):
                    temporary.unlink()


@dataclass(frozen=True)
class RelionPostProcessor:
    """``relion_postprocess`` (or a program with its command line); the report files of every
    back-end are made from its STAR file beside its own files."""

    program: tuple[str, ...]

    @classmethod
    def from_command_line(cls, command_line: str) -> RelionPostProcessor:
        """From the user's command line (``postprocessor``)."""
        return cls(tuple(split_command("postprocessor", command_line)))

    def describe(self) -> str:
        return shlex.join(self.program)

    def postprocess(self, job: PostprocessJob) -> PostprocessReport:
        with OutputGroup() as group:
            folder = group.folder_for(job.folder)
            root = folder / job.root_name
            command = postprocess_command(self.program, *job.half_maps, Path(job.mask.path), job.pixel_size, root)
            run_in_parallel([command], [job.log])
            star = root.with_name(root.name + ".star")
            if not star.is_file():
                raise ExternalCommandError(shlex.join(command), str(job.log), 1)
            report = report_from_relion_star(star, int(job.mask.data.shape[0]), job.pixel_size,
                                             autob_lowres=AUTOB_LOWRES)
            paths = output_paths(root)
            write_report_files(report, {key: Path(paths[key]) for key in REPORT_FILES}, job.pixel_size)
        return report


#: Fewest MPI ranks of a gold-standard ``relion_refine_mpi`` (a leader and one follower per half-set).
MIN_MPI_RANKS = 3
#: relion_refine's --ini_high (Å) when the command is given none.
DEFAULT_INI_HIGH = 30.0


def _ranks(program: Sequence[str]) -> int | None:
    """The ``-n``/``-np`` of an ``mpirun``/``mpiexec``/``srun`` launcher at the head of ``program``,
    ``None`` without a launcher."""
    if not program or Path(program[0]).name not in ("mpirun", "mpiexec", "srun"):
        return None
    for flag, value in itertools.pairwise(program):
        if flag in ("-n", "-np", "--np", "-N", "--ntasks") and value.isdigit():
            return int(value)
    return None


@dataclass(frozen=True)
class RelionRefiner:
    """A gold-standard 3D auto-refinement with ``relion_refine_mpi`` (RELION 3.1's command line),
    then the built-in post-processing of its unfiltered half maps.

    ``program``: the launcher and program (``mpirun -n 3 relion_refine_mpi`` at least: one leader and
    one follower per half-set); ``threads``: its ``--j``; ``device``: where the built-in steps
    compute (a reference made from the particles, the post-processing).
    """

    program: tuple[str, ...]
    threads: int = 1
    device: Any = "cpu"

    @classmethod
    def from_command_line(cls, command_line: str, threads: int = 1, device: Any = "cpu") -> RelionRefiner:
        """From the user's command line (``relion_refine``), e.g. ``"mpirun -n 3 relion_refine_mpi"``."""
        words = split_command("relion_refine", command_line)
        ranks = _ranks(words)
        if ranks is None or ranks < MIN_MPI_RANKS:
            raise CryoSieveInputError(
                f"{setting('relion_refine')} {command_line!r}: a gold-standard refinement needs "
                f"relion_refine_mpi under mpirun with at least {MIN_MPI_RANKS} ranks, e.g. "
                f"\"mpirun -n {MIN_MPI_RANKS} relion_refine_mpi\"")
        programs = [word for word in words[1:] if "relion_refine" in Path(word).name]
        if not programs:
            raise CryoSieveInputError(f"{setting('relion_refine')} {command_line!r}: names no relion_refine_mpi "
                                      "program")
        if shutil.which(programs[0]) is None:
            raise CryoSieveInputError(f"{setting('relion_refine')} {command_line!r}: program {programs[0]!r} not "
                                      "found")
        if threads < 1:
            raise CryoSieveInputError(f"{setting('threads')} {threads}: must be at least 1")
        return cls(tuple(words), threads, device)

    def describe(self) -> str:
        return f"{shlex.join(self.program)} --j {self.threads}"

    def command(self, job: RefinementJob, reference: Path) -> list[str]:
        """The ``relion_refine`` command line of ``job`` (absolute paths) from the map ``reference``."""
        diameter = job.particle_diameter if job.particle_diameter is not None else 0.9 * job.box * job.pixel_size
        ini_high = DEFAULT_INI_HIGH if job.ini_high is None else job.ini_high
        words = [*self.program, "--o", str((job.folder / "run").absolute()), "--auto_refine", "--split_random_halves",
                 "--i", str(job.particles_star.absolute()), "--ref", str(reference.absolute()),
                 "--ini_high", f"{ini_high:g}", "--dont_combine_weights_via_disc", "--pool", "30", "--pad", "2",
                 "--ctf", "--particle_diameter", f"{diameter:g}", "--flatten_solvent", "--zero_mask",
                 "--oversampling", "1", "--offset_step", "1" if job.local else "2", "--sym", job.symmetry,
                 "--low_resol_join_halves", "40", "--norm", "--scale", "--j", str(self.threads),
                 "--random_seed", str(job.seed),
                 # cross-correlation in the first iteration: without it RELION 3.1 assigned confident but wrong
                 # poses (median error > 50 degrees) to simulated particles of SNR 0.3 from a correct reference;
                 # with it they were found (median error 10 degrees in the first iteration)
                 "--firstiter_cc"]
        if job.local:  # local searches around the given poses from the start
            words += ["--healpix_order", "4", "--auto_local_healpix_order", "4", "--sigma_ang", "2",
                      "--offset_range", "3"]
        else:
            words += ["--healpix_order", "2", "--auto_local_healpix_order", "4", "--offset_range", "5"]
        return words

    def plan(self, job: RefinementJob) -> list[str]:
        reference = job.reference if job.reference is not None else job.folder / "reference.mrc"
        steps = [] if job.reference is not None else [
            f"built-in reconstruction of {job.particles_star} with its given poses -> {reference}"]
        return [*steps, shlex.join(self.command(job, reference)),
                "built-in post-processing of run_half1_class001_unfil.mrc and run_half2_class001_unfil.mrc"]

    def refine(self, job: RefinementJob, progress: ProgressFactory) -> RefinementResult:
        from cryosieve.io.star import read_particles

        reference = job.reference
        if reference is None:
            from cryosieve.reconstruct import reconstruct

            particles = read_particles(job.particles_star)
            reference = job.folder / "reference.mrc"
            with StackReader(particles, job.directory) as reader, progress("reference", len(particles)) as update:
                volume = reconstruct(particles, reader, symmetry=job.symmetry, apply_ctf=True, device=self.device,
                                     progress=update)
            write_volume(reference, volume, job.pixel_size)
        run_in_parallel([self.command(job, reference)], [job.log], (job.directory or Path.cwd()).absolute())
        half_maps = (job.folder / "run_half1_class001_unfil.mrc", job.folder / "run_half2_class001_unfil.mrc")
        data_star = job.folder / "run_data.star"
        for path in (*half_maps, data_star):
            if not path.is_file():
                raise ExternalCommandError(shlex.join(self.program), str(job.log), 1)
        report = measure_half_maps(half_maps, job, self.device, around=job.folder / "run_class001.mrc")
        return result_of(report, len(read_particles(data_star)), data_star.name, fixed_pose=False)


def report_from_relion_star(star: str | os.PathLike[str], box: int, voxel_size: float,
                       autob_lowres: float = 10.0) -> PostprocessReport:
    """The :class:`PostprocessReport` of a ``relion_postprocess`` run, from its ``ROOT.star``.

    RELION 3.1's blocks: ``data_general`` (``rlnFinalResolution``,
    ``rlnBfactorUsedForSharpening``, ``rlnRandomiseFrom``, ``rlnFittedSlopeGuinierPlot``,
    ``rlnFittedInterceptGuinierPlot``, ``rlnCorrelationFitGuinierPlot``), ``data_fsc`` (one
    row per shell) and ``data_guinier`` (one row per shell, -99 where no amplitude). The
    shells of the automatic fit are those from ``autob_lowres`` on whose weighted amplitude
    is not zero, as RELION fits them with ``--autob_highres 0``.
    """
    import starfile

    path = str(star)
    try:
        blocks = starfile.read(path, always_dict=True)
        general = blocks["general"]
        general = general if isinstance(general, pd.DataFrame) else pd.DataFrame([general])
        fsc, guinier = blocks["fsc"], blocks["guinier"]

        def number(name: str) -> float | None:
            if name not in general.columns:
                return None
            value = float(general[name].iloc[0])
            return value if math.isfinite(value) else None

        resolution = number("rlnFinalResolution")
        shells = fsc["rlnSpectralIndex"].to_numpy(dtype=np.int64)
        table = pd.DataFrame({
            "shell": shells,
            "resolution_angstrom": np.where(shells > 0, box * voxel_size / np.maximum(shells, 1), np.inf),
            "fsc_unmasked": fsc["rlnFourierShellCorrelationUnmaskedMaps"].to_numpy(dtype=np.float64),
            "fsc_masked": fsc["rlnFourierShellCorrelationMaskedMaps"].to_numpy(dtype=np.float64),
            "fsc_phase_randomised": fsc["rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps"]
            .to_numpy(dtype=np.float64),
            "fsc_corrected": fsc["rlnFourierShellCorrelationCorrected"].to_numpy(dtype=np.float64),
        })
        inverse_squared = guinier["rlnResolutionSquared"].to_numpy(dtype=np.float64)

        def amplitude(name: str) -> np.ndarray:
            values = guinier[name].to_numpy(dtype=np.float64)
            return np.where(values <= -99, np.nan, values)

        guinier_shells = np.rint(np.sqrt(inverse_squared) * box * voxel_size).astype(np.int64)
        with np.errstate(divide="ignore"):
            guinier_resolution = np.where(inverse_squared > 0, 1 / np.sqrt(np.maximum(inverse_squared, 1e-300)), np.inf)
        guinier_table = pd.DataFrame({
            "shell": guinier_shells,
            "resolution_angstrom": guinier_resolution,
            "inverse_resolution_squared": inverse_squared,
            "log_amplitude_original": amplitude("rlnLogAmplitudesOriginal"),
            "log_amplitude_weighted": amplitude("rlnLogAmplitudesWeighted"),
            "log_amplitude_sharpened": amplitude("rlnLogAmplitudesSharpened"),
            "in_fit": (guinier_shells >= box * voxel_size / autob_lowres - 1e-6)
            & np.isfinite(amplitude("rlnLogAmplitudesWeighted")),
        })
    except (KeyError, ValueError, TypeError, OSError) as error:
        raise CryoSieveInputError(f"{path}: not a relion_postprocess output ({type(error).__name__}: {error})") \
            from None
    randomise = number("rlnRandomiseFrom")
    fitted = guinier_table.loc[guinier_table["in_fit"], "resolution_angstrom"]
    summary: dict[str, object] = {
        "program": "relion_postprocess",
        "final_resolution_angstrom": resolution,
        "final_resolution_shell": round(box * voxel_size / resolution) if resolution else 0,
        "bfactor": number("rlnBfactorUsedForSharpening") or 0.0,
        "bfactor_source": "auto",
        "bfactor_fit_lowres_angstrom": float(fitted.max()) if len(fitted) else None,
        "bfactor_fit_highres_angstrom": float(fitted.min()) if len(fitted) else None,
        "guinier_fit_slope": number("rlnFittedSlopeGuinierPlot"),
        "guinier_fit_intercept": number("rlnFittedInterceptGuinierPlot"),
        "guinier_fit_correlation": number("rlnCorrelationFitGuinierPlot"),
        "randomise_from_angstrom": randomise,
        "randomise_from_shell": round(box * voxel_size / randomise) if randomise else 0,
        "voxel_size_angstrom": float(voxel_size),
        "box": int(box),
    }
    return PostprocessReport(fsc_table=table, guinier=guinier_table, summary=summary, box=int(box))


