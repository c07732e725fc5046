"""Where CryoSPARC is, who connects, and a connection with bounded retries.

As the original ``cryosieve-csrefine`` 1.3.3 finds them: ``CRYOSPARC_MASTER_HOSTNAME``,
``CRYOSPARC_BASE_PORT`` and ``CRYOSPARC_LICENSE_ID`` from the environment, each missing one from
the output of ``cryosparcm env`` (lines ``export "NAME=value"``). The user is the CryoSPARC
account's e-mail address; ``CRYOSPARC_PASSWORD`` is used when set (cryosparc-tools 4 needs it with
the licence id; 5 takes a password, a ``python -m cryosparc.tools login`` session or, deprecated,
the licence id).

The licence id and the password are secrets: they are never part of a message, a log line, a
``repr`` or a file this package writes (:func:`scrub`).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryosieve.errors import CryoSieveInputError

log = logging.getLogger("cryosieve")

HOST = "CRYOSPARC_MASTER_HOSTNAME"
BASE_PORT = "CRYOSPARC_BASE_PORT"
LICENSE = "CRYOSPARC_LICENSE_ID"
PASSWORD = "CRYOSPARC_PASSWORD"
RETRIES = "CRYOSPARC_COMMAND_RETRIES"
RETRY_SECONDS = "CRYOSPARC_COMMAND_RETRY_SECONDS"

#: Attempts to reach an unreachable server, and seconds between them (the original's defaults).
DEFAULT_RETRIES = 3
DEFAULT_RETRY_SECONDS = 30.0

_EXPORT = re.compile(r'^export\s+"([^=]+)=(.*)"\s*$')


def parse_cryosparcm_env(text: str) -> dict[str, str]:
    """The variables ``cryosparcm env`` prints, one ``export "NAME=value"`` per line (others ignored)."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        match = _EXPORT.match(line.strip())
        if match:
            found[match.group(1)] = match.group(2)
    return found


def read_cryosparcm_env() -> dict[str, str]:
    """The variables of ``cryosparcm env``; empty when the program is missing or fails."""
    try:
        completed = subprocess.run(["cryosparcm", "env"], capture_output=True, text=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return {}
    return parse_cryosparcm_env(completed.stdout)


@dataclass(frozen=True)
class Connection:
    """How to reach CryoSPARC: ``host`` and ``base_port`` (the web port; the API is on ``base_port + 2``),
    ``email`` of the CryoSPARC user, ``license`` and ``password`` (secrets, hidden from ``repr``),
    ``retries`` attempts ``retry_seconds`` apart while the server cannot be reached."""

    host: str
    base_port: int
    email: str | None
    license: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    retries: int = DEFAULT_RETRIES
    retry_seconds: float = DEFAULT_RETRY_SECONDS

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.base_port}"

    def describe(self) -> str:
        """Where and as whom (no secret)."""
        return f"CryoSPARC at {self.url}" + (f" as {self.email}" if self.email else "")

    def scrub(self, text: str) -> str:
        """``text`` with the secrets replaced."""
        return scrub(text, (self.license, self.password))


def scrub(text: str, secrets: tuple[str | None, ...]) -> str:
    """``text`` with every non-empty secret replaced by ``<hidden>``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<hidden>")
    return text


def connection_from_environment(email: str | None, environ: Mapping[str, str] | None = None,
                                cryosparcm_env: Callable[[], Mapping[str, str]] = read_cryosparcm_env
                                ) -> Connection:
    """The connection the environment describes, ``cryosparcm env`` filling what it lacks.

    Raises :class:`CryoSieveInputError` naming the variable when the host or the port is missing or bad.
    """
    environ = os.environ if environ is None else environ
    wanted = (HOST, BASE_PORT, LICENSE, PASSWORD, RETRIES, RETRY_SECONDS)
    values = {name: environ[name] for name in wanted if environ.get(name)}
    if HOST not in values or BASE_PORT not in values or LICENSE not in values:
        fallback = cryosparcm_env()
        values.update({name: fallback[name] for name in wanted if name not in values and fallback.get(name)})
    for name in (HOST, BASE_PORT):
        if name not in values:
            raise CryoSieveInputError(f"{name} is not set and `cryosparcm env` did not give it; set it to where "
                                      "CryoSPARC runs")

    def number(name: str, default: float, kind: type) -> Any:
        try:
            value = kind(values[name]) if name in values else default
        except ValueError:
            raise CryoSieveInputError(f"{name}={values[name]!r}: not a number") from None
        if value < (1 if kind is int else 0):
            raise CryoSieveInputError(f"{name}={values[name]!r}: out of range")
        return value

    return Connection(host=values[HOST], base_port=number(BASE_PORT, 39000, int), email=email or None,
                      license=values.get(LICENSE), password=values.get(PASSWORD),
                      retries=number(RETRIES, DEFAULT_RETRIES, int),
                      retry_seconds=number(RETRY_SECONDS, DEFAULT_RETRY_SECONDS, float))


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _status_of(error: BaseException) -> int | None:
    for item in _chain(error):
        for candidate in (getattr(item, "status_code", None), getattr(item, "code", None),
                          getattr(getattr(item, "response", None), "status_code", None)):
            if isinstance(candidate, int) and 100 <= candidate < 600:
                return candidate
    return None


def unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the server could not be reached (worth another try): 5.x raises httpx's
    transport errors, 4.x a ``CommandError`` whose text starts with its ``URL Error`` or ``Timeout Error``."""
    chain = _chain(error)
    names = {type(item).__name__ for item in chain}
    if names & {"ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "RemoteProtocolError",
                "ConnectionError", "ConnectionRefusedError", "TimeoutError", "URLError", "gaierror"}:
        return True
    return any(type(item).__name__ == "CommandError" and ("URL Error" in str(item) or "Timeout Error" in str(item))
               for item in chain)


def refused(error: BaseException) -> bool:
    """Whether ``error`` says the credentials were refused or missing (HTTP 401/403; 4.x asserts that the
    licence id, e-mail and password are given and fails its authentication call; 5.x raises ``ValueError``
    without credentials)."""
    chain = _chain(error)
    return _status_of(error) in (401, 403) or any(
        isinstance(item, (AssertionError, ValueError)) or "authentication" in str(item).lower() for item in chain)


def first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def connect(connection: Connection, client_class: Any = None, sleep: Callable[[float], None] = time.sleep) -> Any:
    """A ``cryosparc.tools.CryoSPARC`` session (``client_class``: that class or one with its interface).

    An unreachable server is tried ``connection.retries`` times, ``retry_seconds`` apart. Raises
    :class:`CryoSieveInputError` (one line, no secret) when it stays unreachable, when it refuses the
    credentials, or when cryosparc-tools is not installed.
    """
    if client_class is None:
        try:
            from cryosparc.tools import CryoSPARC
        except ImportError:
            raise CryoSieveInputError('the CryoSPARC commands need cryosparc-tools: pip install '
                                      '"cryosieve[cryosparc]"') from None
        client_class = CryoSPARC
    arguments: dict[str, Any] = {"host": connection.host, "base_port": connection.base_port}
    if connection.email:
        arguments["email"] = connection.email
    if connection.password:
        arguments["password"] = connection.password
    if connection.license:
        arguments["license"] = connection.license  # cryosparc-tools 4 needs it; 5 takes it when no password
    for attempt in range(1, connection.retries + 1):
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # 5.x: the licence argument is deprecated
                return client_class(**arguments)
        except Exception as error:  # the client raises RuntimeError, ValueError or its own errors
            reason = connection.scrub(first_line(str(_chain(error)[-1])) or type(error).__name__)
            if unreachable(error):
                if attempt < connection.retries:
                    log.warning("%s: cannot be reached (%s); attempt %d of %d, again in %g s", connection.url,
                                reason, attempt, connection.retries, connection.retry_seconds)
                    sleep(connection.retry_seconds)
                    continue
                raise CryoSieveInputError(
                    f"cannot reach CryoSPARC at {connection.url} ({HOST}, {BASE_PORT}) after {connection.retries} "
                    f"attempts: {reason}") from None
            if refused(error):
                raise CryoSieveInputError(
                    f"CryoSPARC at {connection.url} refused the credentials (the user "
                    f"{connection.email or '(none)'}, {LICENSE} or {PASSWORD}): {reason}") from None
            raise CryoSieveInputError(f"cannot connect to CryoSPARC at {connection.url}: {reason}") from None
    raise CryoSieveInputError(f"{RETRIES}: must be at least 1")
