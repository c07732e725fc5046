"""External RELION programs as reconstruction and post-processing back-ends.

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
  sharpening B-factor (``rlnBfactorUsedForSharpening``) and the FSC curves.

Standard output and standard error of every command go to a log file.  Outputs are
written under temporary names and renamed only when every process succeeded, so a run
killed while a program runs never leaves a half-written map under its final name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cryosieve.errors import CryoSieveInputError, ExternalCommandError
from cryosieve.io.atomic import temporary_name

log = logging.getLogger("cryosieve")


def split_command(option: str, command_line: str) -> list[str]:
    """Split a user-given program line into words and check that its program exists.

    Raises :class:`CryoSieveInputError` naming ``option`` for an empty line, unbalanced
    quotes or a program that is not found on ``PATH``.
    """
    try:
        words = shlex.split(command_line)
    except ValueError as error:
        raise CryoSieveInputError(f"{option} {command_line!r}: cannot be split into words ({error})") from None
    if not words:
        raise CryoSieveInputError(f"{option}: empty command")
    if shutil.which(words[0]) is None:
        raise CryoSieveInputError(f"{option} {command_line!r}: program {words[0]!r} not found")
    return words


def with_launcher(words: Sequence[str], num_procs: int | None) -> list[str]:
    """Prefix ``mpirun -n N`` (the published ``--num_procs``); ``None`` leaves the line as given."""
    if num_procs is None:
        return list(words)
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
            "--autob_lowres", "10", "--o", str(Path(root).absolute())]


def run_in_parallel(commands: Sequence[Sequence[str]], log_paths: Sequence[Path], cwd: Path | None = None) -> None:
    """Start every command at once, wait for all, raise for the first that failed.

    Each command's standard output and error are written to its log file (replaced).
    """
    processes = []
    handles = []
    try:
        for command, log_path in zip(commands, log_paths):
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            handle = open(log_path, "w")
            handles.append(handle)
            handle.write("$ " + shlex.join(command) + "\n")
            handle.flush()
            # Each program in a process group of its own, so that stopping it reaches every
            # process it started (the ranks under mpirun) and nothing else.
            processes.append(subprocess.Popen(list(command), stdout=handle, stderr=subprocess.STDOUT,
                                              cwd=str(cwd) if cwd is not None else None,
                                              start_new_session=os.name == "posix",
                                              preexec_fn=_die_with_parent if os.name == "posix" else None))
        for process in processes:
            process.wait()
    finally:
        _stop_all([process for process in processes if process.poll() is None])
        for handle in handles:
            handle.close()
    for command, log_path, process in zip(commands, log_paths, processes):
        if process.returncode != 0:
            raise ExternalCommandError(shlex.join(command), str(log_path), process.returncode)


#: Seconds a stopped program gets to end after SIGTERM before its group gets SIGKILL.
STOP_GRACE = 5.0


def _stop_all(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    """Interrupted while programs run: SIGTERM to each one's process group, SIGKILL after
    :data:`STOP_GRACE` seconds to what is left, so no orphan keeps running."""
    import signal

    def signal_group(process: subprocess.Popen[bytes], number: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.name == "posix":
                os.killpg(process.pid, number)
            else:  # pragma: no cover
                process.send_signal(number)

    for process in processes:
        signal_group(process, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            pass
    for process in processes:
        signal_group(process, signal.SIGKILL)
        process.wait()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: have the kernel kill the child when this process dies (no orphaned programs)."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def reconstruct_half_maps(program: Sequence[str], star: Path, outputs: tuple[Path, Path], angpix: float,
                          symmetry: str, log_paths: tuple[Path, Path], cwd: Path | None) -> None:
    """Reconstruct half-sets 1 and 2 of ``star`` in parallel into ``outputs`` (both or neither)."""
    temporaries = [temporary_name(Path(output)) for output in outputs]
    commands = [reconstruct_command(program, star, temporary, angpix, symmetry, subset)
                for subset, temporary in zip((1, 2), temporaries)]
    try:
        run_in_parallel(commands, log_paths, cwd)
        for temporary in temporaries:
            if not temporary.is_file():
                raise ExternalCommandError(shlex.join(commands[temporaries.index(temporary)]),
                                           str(log_paths[temporaries.index(temporary)]), 1)
        for temporary, output in zip(temporaries, outputs):
            os.replace(temporary, output)
    finally:
        for temporary in temporaries:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()


def run_postprocess(program: Sequence[str], half1: Path, half2: Path, mask: Path, angpix: float,
                    root: Path, log_path: Path) -> Path:
    """Post-process into ``root.*`` (in a folder the caller makes appear atomically).

    Returns the path of ``root.star``.
    """
    command = postprocess_command(program, half1, half2, mask, angpix, root)
    run_in_parallel([command], [log_path])
    star = root.with_name(root.name + ".star")
    if not star.is_file():
        raise ExternalCommandError(shlex.join(command), str(log_path), 1)
    return star


@dataclass
class PostprocessOutcome:
    """What a post-processing reports.

    ``resolution``: final resolution (Å); ``bfactor``: sharpening B-factor (Å^2, negative
    sharpens); ``frequency``: ``(m,)`` spatial frequency of each FSC shell (1/Å);
    ``fsc_corrected``: ``(m,)`` the corrected FSC the resolution was read from.
    """

    resolution: float
    bfactor: float
    frequency: np.ndarray
    fsc_corrected: np.ndarray


def read_postprocess_star(path: Path) -> PostprocessOutcome:
    """Read ``rlnFinalResolution``, ``rlnBfactorUsedForSharpening`` and the corrected FSC."""
    blocks = starfile.read(path, always_dict=True)
    general = blocks.get("general")
    if general is None or "fsc" not in blocks:
        raise CryoSieveInputError(f"{path}: no data_general or data_fsc block (not a relion_postprocess output)")
    if not isinstance(general, pd.DataFrame):
        general = pd.DataFrame([general])
    fsc = blocks["fsc"]
    resolution = float(general["rlnFinalResolution"].iloc[0])
    bfactor = float(general["rlnBfactorUsedForSharpening"].iloc[0]) \
        if "rlnBfactorUsedForSharpening" in general.columns else 0.0
    frequency = fsc["rlnSpectralIndex"].to_numpy(dtype=np.float64)
    angstrom = fsc["rlnAngstromResolution"].to_numpy(dtype=np.float64)
    # rlnResolution of shell 0 is a placeholder (RELION writes 999 Å there): use index / (box * voxel)
    with np.errstate(divide="ignore"):
        box_angstrom = np.median((frequency * angstrom)[1:])
    frequency = frequency / box_angstrom
    return PostprocessOutcome(resolution=resolution, bfactor=bfactor, frequency=frequency,
                              fsc_corrected=fsc["rlnFourierShellCorrelationCorrected"].to_numpy(dtype=np.float64))
