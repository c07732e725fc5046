"""Errors the library raises for its callers to report.

A :class:`CryoSieveInputError` names the file, column or setting at fault. A setting is
named by its field (``retention_ratio``, ``highpass_angstrom``...) through :func:`setting`;
a caller that knows the setting by another name, such as the command line by its flag
(``--frequency`` for ``highpass_angstrom``), shows the message with
:meth:`CryoSieveInputError.message_with`, so the library never speaks in flags.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_OPEN, _CLOSE = "\u27e8", "\u27e9"
_MARKED = re.compile(f"{_OPEN}([A-Za-z_][A-Za-z0-9_]*){_CLOSE}")


def setting(field: str) -> str:
    """A setting's name inside an error message, shown as the caller knows it."""
    return f"{_OPEN}{field}{_CLOSE}"


class CryoSieveInputError(ValueError):
    """Bad user input: the message names the file, column or setting at fault.

    ``str(error)`` names settings by their fields; :meth:`message_with` by the caller's names.
    """

    def __init__(self, message: str) -> None:
        self.raw_message = message
        super().__init__(self.message_with({}))

    def message_with(self, names: Mapping[str, str]) -> str:
        """The message with each setting named as in ``names`` (field -> name; others by field)."""
        return _MARKED.sub(lambda match: names.get(match.group(1), match.group(1)), self.raw_message)

    def fields(self) -> list[str]:
        """The settings the message names."""
        return _MARKED.findall(self.raw_message)


class ExternalCommandError(RuntimeError):
    """An external program exited with a non-zero status.

    Attributes
    ----------
    command:
        The command line (as a shell-quoted string).
    log_path:
        Where its standard output and error went.
    returncode:
        Its exit status (negative: killed by that signal).
    """

    def __init__(self, command: str, log_path: str, returncode: int) -> None:
        self.command = command
        self.log_path = log_path
        self.returncode = returncode
        super().__init__(f"{command!r} failed with exit code {returncode}; see {log_path}")

    def __reduce__(self) -> tuple[type, tuple[str, str, int]]:
        # pickled by the worker processes that run refinement jobs
        return (type(self), (self.command, self.log_path, self.returncode))


class JobError(RuntimeError):
    """A job of several processes (``torchrun``, :mod:`cryosieve.world`) lost one of them: the message says
    which rank, or what the communication library reported."""


class ServiceError(RuntimeError):
    """A service the command works with (a CryoSPARC server) failed it after the attempts it is given: the
    message names the service's address, the call and the cause."""


class JobEnded(BaseException):
    """This process of a job (:mod:`cryosieve.world`) stops because the job ends, and that has already been
    said in one line (by the rank that noticed why, or by rank 0 for a stop signal): nothing more to print,
    exit with ``exit_code``. A BaseException, so that no ``except Exception`` holds it up."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(exit_code)
        self.exit_code = exit_code
