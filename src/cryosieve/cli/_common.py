"""Shared command-line plumbing: device choice, console logging, signals, error reporting.

Every command runs its body through :func:`run_command`, which turns every failure into
one line ``COMMAND: error: ...`` on standard error and an exit code, never a traceback:

* 2: bad input or arguments (:class:`~cryosieve.errors.CryoSieveInputError`), found before
  anything is written;
* 1: a failure of the machine (a read or write that the system refused, a full disk, no
  memory), of a service (a CryoSPARC server that stopped answering), or an unexpected error (set
  ``CRYOSIEVE_DEBUG=1`` for its traceback);
* an external program's own exit code when it failed (:class:`~cryosieve.errors.ExternalCommandError`);
* 130 after Ctrl-C (SIGINT), 143 after SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import FrameType
from typing import Any

from tqdm import tqdm

from cryosieve.errors import CryoSieveInputError, ExternalCommandError, JobEnded, JobError, ServiceError
from cryosieve.processes import forget_caught_interrupts, handling_stop_signals
from cryosieve.progress import ProgressFactory

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1

#: Device nodes of a GPU driver that torch can use as "cuda" (NVIDIA; AMD ROCm's /dev/kfd).
_GPU_DRIVER_NODES = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")


def _cuda_available() -> bool:
    # Importing torch takes about a second; on Linux without any GPU driver node there can be
    # no CUDA device, so commands that run their CPU path without torch (cryosieve-reconstruct)
    # skip that import.
    if sys.platform.startswith("linux") and not any(os.path.exists(node) for node in _GPU_DRIVER_NODES):
        return False
    import torch

    return bool(torch.cuda.is_available())


def _mps_available() -> bool:
    if sys.platform != "darwin":  # Apple's GPUs exist on macOS only; no torch import elsewhere
        return False
    import torch

    return bool(torch.backends.mps.is_available())


def choose_device_name(name: str) -> str:
    """``auto``: ``"cuda"`` when a CUDA device is present, else ``"cpu"``; ``cpu``; ``cuda`` or ``mps``
    (an input error without such a GPU). ``auto`` never picks ``mps``: Apple's GPUs lack float64
    (:mod:`cryosieve.precision`), so they are used only when asked for."""
    if name == "auto":
        return "cuda" if _cuda_available() else "cpu"
    if name == "cuda" and not _cuda_available():
        raise CryoSieveInputError("--device cuda: no CUDA device is available")
    if name == "mps" and not _mps_available():
        raise CryoSieveInputError("--device mps: no Apple GPU (Metal Performance Shaders) is available")
    return name


def choose_device(name: str) -> str:
    """:func:`choose_device_name` (the library takes a device by its name, so no command loads torch to parse
    its arguments)."""
    return choose_device_name(name)


def add_device_argument(parser: argparse.ArgumentParser, mps: bool = True) -> None:
    """``--device``; with ``mps``, Apple's GPUs are offered too (commands whose per-particle work runs
    in float32 there, :mod:`cryosieve.precision`)."""
    choices = ("auto", "cpu", "cuda", "mps") if mps else ("auto", "cpu", "cuda")
    parser.add_argument("--device", choices=choices, default="auto",
                        help="where to compute: auto (CUDA when present, else CPU), cpu, cuda"
                             + (" or mps (an Apple GPU: float32 sums, maps finished on the CPU)." if mps else "."))


# --------------------------------------------------------------------------- parsing


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that answers a misspelled flag with the nearest one (``did you mean
    --frequency?``), before it checks for missing ones (a misspelled required flag would otherwise be
    reported as missing)."""

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        words = list(sys.argv[1:] if args is None else args)
        known = [option for action in self._actions for option in action.option_strings]
        for word in words:
            if word == "--":
                break
            flag = word.split("=", 1)[0]
            if not flag.startswith("--") or any(option.startswith(flag) for option in known):
                continue  # a value, a flag, or an abbreviation argparse takes
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else f" (see {self.prog} -h)"
            self.error(f"unrecognised option {flag}{hint}")
        return super().parse_known_args(args, namespace)


def command_line(program: str, argv: Sequence[str] | None) -> str:
    """The command as the user typed it (quoted for a shell), for reports."""
    import shlex

    return " ".join(shlex.quote(word) for word in [program, *(sys.argv[1:] if argv is None else argv)])


# --------------------------------------------------------------------------- console


class _ConsoleHandler(logging.Handler):
    """Log lines through the progress bar's writer, so a line never lands on a bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def setup_logging(verbose: bool = True) -> None:
    """Log the package's INFO lines (only warnings unless ``verbose``) to the console.

    Only the ``cryosieve`` logger is shown: other libraries' messages (e.g. matplotlib's
    font cache) stay off the console. Debug lines go only to handlers that ask for them
    (the pipeline's log file).
    """
    logger = logging.getLogger("cryosieve")
    for handler in [handler for handler in logger.handlers if isinstance(handler, _ConsoleHandler)]:
        logger.removeHandler(handler)
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    handler.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False


def progress_bar(description: str, total: int, enabled: bool, leave: bool = True, unit: str = "particle") -> tqdm:
    """A progress bar on standard error, counting ``unit`` (particles, or jobs)."""
    return tqdm(total=total, unit=unit, desc=description, disable=not enabled, file=sys.stderr, leave=leave)


def progress_factory(enabled: bool, leave: bool = True, unit: str = "particle") -> ProgressFactory:
    """A :data:`~cryosieve.progress.ProgressFactory` drawing progress bars of ``unit`` (none unless
    ``enabled``); its updates stop the work when the command was interrupted."""

    @contextlib.contextmanager
    def progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
        with progress_bar(description, total, enabled, leave, unit) as bar:
            yield checked(bar.update)

    return progress


# --------------------------------------------------------------------------- signals


class _Signals:
    """The first SIGINT or SIGTERM received while a command runs (``None``: none)."""

    received: int | None = None


def interrupted() -> bool:
    """Whether the running command has received SIGINT or SIGTERM."""
    return _Signals.received is not None


def check_interrupt() -> None:
    """Raise :class:`KeyboardInterrupt` if the command was interrupted.

    A KeyboardInterrupt raised while Python runs a finaliser is printed and swallowed
    ("Exception ignored in ..."); the progress callbacks call this, so an interrupt stops
    the work at the next batch whatever happened to the first exception.
    """
    if _Signals.received is not None:
        raise KeyboardInterrupt


def checked(update: Callable[[int], object]) -> Callable[[int], None]:
    """A progress callback that first checks for an interrupt."""

    def call(count: int) -> None:
        check_interrupt()
        update(count)

    return call


def _on_signal(number: int, _frame: FrameType | None) -> None:
    if _Signals.received is None:
        _Signals.received = number
    raise KeyboardInterrupt


def _quiet_interrupts(previous: Callable[[Any], object]) -> Callable[[Any], None]:
    """An unraisable-exception hook that drops the KeyboardInterrupt of a received stop signal.

    Python cannot raise an exception out of a C callback (numba's compiler calls one back on every
    kernel it compiles) or a finaliser: it prints "Exception ignored ..." with a traceback instead.
    The signal is remembered in :class:`_Signals`, and :func:`check_interrupt` raises it again at the
    next batch, so that print would only break the promise of one line on stderr.
    """

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and interrupted():
            return
        previous(unraisable)

    return hook


@contextlib.contextmanager
def _signal_handlers() -> Iterator[None]:
    _Signals.received = None
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _quiet_interrupts(previous_hook)
    try:
        with handling_stop_signals(_on_signal):
            yield
    finally:
        sys.unraisablehook = previous_hook
        forget_caught_interrupts()


# --------------------------------------------------------------------------- errors


def one_line(text: object) -> str:
    """``text`` on one line."""
    return " ".join(str(text).split())


def _os_error_message(error: OSError) -> str:
    reason = error.strerror or str(error)
    if error.filename is not None:
        target = f"{error.filename}" + (f" -> {error.filename2}" if error.filename2 is not None else "")
        return f"{target}: {reason}"
    return reason


def _exit_code_of(returncode: int) -> int:
    if 0 < returncode < 256:
        return returncode
    return 128 - returncode if returncode < 0 else EXIT_FAILURE


def retention_ratio(text: str) -> float | str:
    """``--retention_ratio``: a number, or ``auto`` (checked by the library, which names the flag)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor auto") from None


def add_retention_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--retention_ratio R|auto``, 0.8 by default."""
    parser.add_argument("--retention_ratio", type=retention_ratio, default=0.8, metavar="R|auto",
                        help=help_text + " 'auto' chooses it in each sieve: the fraction whose half maps, "
                        "reconstructed with the given poses, hold the most information (written to "
                        "*_retention.csv).")


def add_orientation_argument(parser: argparse.ArgumentParser) -> None:
    """``--keep_orientations [FACTOR]``."""
    parser.add_argument("--keep_orientations", type=float, nargs="?", const=1.5, default=None, metavar="FACTOR",
                        help="within each half-set, no well-populated viewing direction (72 equal-area bins) loses "
                             "more than FACTOR (1.5 when not given) times the average share; its best-scoring "
                             "sieved particles are kept back. Off by default.")


def add_return_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that give a selection back to CryoSPARC as an External job."""
    group = parser.add_argument_group(
        "giving the selection back to CryoSPARC (a .cs input; where: CRYOSPARC_BASE_URL, or "
        "CRYOSPARC_MASTER_HOSTNAME with CRYOSPARC_BASE_PORT or CRYOSPARC_COMMAND_CORE_PORT, else `cryosparcm env`; "
        "who: --cryosparc_user, CRYOSPARC_PASSWORD, CRYOSPARC_LICENSE_ID)")
    group.add_argument("--cryosparc_project", default=None,
                       help="project UID (P3): make an External job there with outputs kept and sieved, passing "
                            "through the source job's particles.")
    group.add_argument("--cryosparc_workspace", default=None, help="workspace UID (W1) of that job.")
    group.add_argument("--cryosparc_source_job", default=None,
                       help="the job whose particles the .cs input holds (J42, or J42.OUTPUT); read from the "
                            "input's path (.../J42/J42_particles.cs) by default.")
    group.add_argument("--cryosparc_user", default=None,
                       help="e-mail address of the CryoSPARC user (its password from CRYOSPARC_PASSWORD; see the "
                            "README for what each cryosparc-tools version needs).")


def return_target(args: argparse.Namespace) -> Any:
    """The :class:`~cryosieve.cryosparc.selection.ReturnTarget` of the parsed options, or ``None``."""
    if not args.cryosparc_project and not args.cryosparc_workspace:
        return None
    if not (args.cryosparc_project and args.cryosparc_workspace):
        raise CryoSieveInputError("--cryosparc_project and --cryosparc_workspace go together")
    from cryosieve.cryosparc.connection import connection_from_environment
    from cryosieve.cryosparc.selection import ReturnTarget

    return ReturnTarget(connection_from_environment(args.cryosparc_user), args.cryosparc_project,
                        args.cryosparc_workspace, args.cryosparc_source_job)


def _value_asked(argv: Sequence[str] | None, flag: str) -> str | None:
    """The value of ``flag`` on a command line (``None`` when absent), read before the command parses it:
    the backend of a ``torchrun`` job and the size of a local one are chosen first."""
    words = list(sys.argv[1:] if argv is None else argv)
    value = None
    for index, word in enumerate(words):
        if word == flag and index + 1 < len(words):
            value = words[index + 1]
        elif word.startswith(flag + "="):
            value = word.split("=", 1)[1]
    return value


def _device_asked(argv: Sequence[str] | None) -> str:
    """The ``--device`` of a command line (``auto`` when absent), for the backend of a job."""
    return choose_device_name(_value_asked(argv, "--device") or "auto")


def _processes_asked(argv: Sequence[str] | None) -> int:
    """``--num_gpus N``: the processes of a job on this machine (1 when absent or not a number; the
    command's own parser refuses a bad value)."""
    value = _value_asked(argv, "--num_gpus")
    try:
        return int(value) if value is not None else 1
    except ValueError:
        return 1


def _in_job(program: str, body: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None,
            parser: Callable[[], argparse.ArgumentParser] | None = None) -> int | None:
    """``body(argv)``: in one process; under ``torchrun`` (:mod:`cryosieve.world`) on rank 0 only, the other
    ranks serving it; with ``--num_gpus N`` as rank 0 of a job of ``N`` processes on this machine, started
    here (:func:`cryosieve.world.local_job`), the same code as under ``torchrun``."""
    from cryosieve import world

    launched = world.launched_by_torchrun()
    processes = _processes_asked(argv)
    if not launched and processes <= 1:
        return body(argv)
    if parser is not None:  # a mistyped option is answered before any process starts
        parser().parse_args(argv)
    device = _device_asked(argv)
    if device == "mps":
        raise CryoSieveInputError("--device mps: runs in one process; start the command without torchrun or "
                                  "--num_gpus")
    if launched and processes > 1:
        raise CryoSieveInputError("--num_gpus: the job's processes are torchrun's; leave --num_gpus out")
    if not launched and device == "cuda":
        import torch

        if torch.cuda.device_count() < processes:
            raise CryoSieveInputError(
                f"--num_gpus {processes}: only {torch.cuda.device_count()} CUDA devices present")
    try:
        if launched:
            with world.joined(device, program) as joined:
                return body(argv) if joined.is_root else world.serve(joined)
        with world.local_job(processes, device, program):
            return body(argv)
    except KeyboardInterrupt as error:  # the job's watchdog interrupts the main thread when the job ends
        ended = world.interrupted(error)
        if ended is error and os.environ.get("RANK", "0") != "0":  # a stop before joining: rank 0 says it
            ended = JobEnded(128 + int(_Signals.received or signal.SIGINT))
        raise ended from None


def run_command(program: str, body: Callable[[Sequence[str] | None], int | None],
                argv: Sequence[str] | None = None, flags: Mapping[str, str] | None = None,
                parser: Callable[[], argparse.ArgumentParser] | None = None) -> int:
    """Run ``body(argv)`` and turn every failure into one line on stderr and an exit code
    (see the module docstring). ``flags`` maps the library's setting fields to the command's
    flags, so that an input error names the flag the user typed; ``parser``: the command's parser, for a
    command that may start a job of several processes (its arguments are parsed before they start)."""

    def say(message: str) -> None:
        print(f"{program}: {message}", file=sys.stderr, flush=True)

    with _signal_handlers():
        try:
            try:
                code = int(_in_job(program, body, argv, parser) or 0)
            except JobEnded as ended:  # a job of several processes ended, and why has been said
                return ended.exit_code
            except CryoSieveInputError as error:
                if not interrupted():
                    say(f"error: {one_line(error.message_with(flags or {}))}")
                    return EXIT_BAD_INPUT
            except (JobError, ServiceError) as error:
                if not interrupted():
                    say(f"error: {one_line(error)}")
                    return EXIT_FAILURE
            except ExternalCommandError as error:
                if not interrupted():
                    say(f"error: command {error.command!r} failed with exit code {error.returncode}; "
                        f"its output is in {error.log_path}")
                    return _exit_code_of(error.returncode)
            except OSError as error:
                if not interrupted():
                    say(f"error: {one_line(_os_error_message(error))}")
                    return EXIT_FAILURE
            except MemoryError:
                say("error: out of memory (try a smaller --batch_size)")
                return EXIT_FAILURE
            except KeyboardInterrupt:
                pass
            except Exception as error:  # a bug: one line, the traceback on request
                if not interrupted():
                    if os.environ.get("CRYOSIEVE_DEBUG"):
                        traceback.print_exc()
                    say(f"error: internal error ({type(error).__name__}: {one_line(error)}); "
                        "set CRYOSIEVE_DEBUG=1 for details")
                    return EXIT_FAILURE
            else:
                if not interrupted():
                    return code
        except KeyboardInterrupt:  # a second signal while the first was being handled
            pass
        number = _Signals.received or signal.SIGINT
        say("interrupted" if number == signal.SIGINT else "terminated")
        return 128 + int(number)
