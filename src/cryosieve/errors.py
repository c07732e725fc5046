"""Errors the library raises for its callers to report.

The command-line layer turns a :class:`CryoSieveInputError` into a one-line message on
standard error and exit code 2, an :class:`ExternalCommandError` into one line naming the
program's log and its exit code.
"""


class CryoSieveInputError(ValueError):
    """Bad user input: the message names the file, column or option at fault."""


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
