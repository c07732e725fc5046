"""Errors raised by the library for bad input.

The command-line layer turns a :class:`CryoSieveInputError` into a one-line
message on standard error and exit code 2.
"""


class CryoSieveInputError(ValueError):
    """Bad user input: the message names the file, column or option at fault."""
