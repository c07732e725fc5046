"""Where CryoSPARC is, who connects, and how often to try.

The location, in this order:

* ``CRYOSPARC_BASE_URL``: the address a web browser opens (``https://cryosparc.lab.org``, a path
  behind a reverse proxy, ``http://host:39000``); cryosparc-tools 5 reaches CryoSPARC v5 there;
* ``CRYOSPARC_MASTER_HOSTNAME`` with ``CRYOSPARC_BASE_PORT``, or with ``CRYOSPARC_COMMAND_CORE_PORT`` (the
  ``command_core`` port, base + 2, which the original CryoSieve 1.3.3 reads);
* each variable missing from the environment is taken from ``cryosparcm env`` (lines ``export "NAME=value"``),
  as 1.3.3 does.

Who: ``email`` (``--user``, the account's e-mail address), ``CRYOSPARC_PASSWORD`` and ``CRYOSPARC_LICENSE_ID``;
which of them a connection needs depends on the cryosparc-tools version (:mod:`cryosieve.cryosparc.clients`).

How often: an unreachable server or a server error is tried ``CRYOSPARC_COMMAND_RETRIES`` times (3),
``CRYOSPARC_COMMAND_RETRY_SECONDS`` apart (30), as 1.3.3 reads them; a job is looked at every
``CRYOSPARC_POLL_SECONDS`` (20); while a job is waited on, a lost connection is tried again with back-off
for ``CRYOSPARC_WAIT_RETRY_SECONDS`` (300).

The licence id and the password are secrets: they are never part of a message, a log line, a ``repr`` or
a file this package writes (:meth:`Connection.scrub`).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from cryosieve.errors import CryoSieveInputError

BASE_URL = "CRYOSPARC_BASE_URL"
HOST = "CRYOSPARC_MASTER_HOSTNAME"
BASE_PORT = "CRYOSPARC_BASE_PORT"
CORE_PORT = "CRYOSPARC_COMMAND_CORE_PORT"
LICENSE = "CRYOSPARC_LICENSE_ID"
PASSWORD = "CRYOSPARC_PASSWORD"
RETRIES = "CRYOSPARC_COMMAND_RETRIES"
RETRY_SECONDS = "CRYOSPARC_COMMAND_RETRY_SECONDS"
WAIT_RETRY_SECONDS = "CRYOSPARC_WAIT_RETRY_SECONDS"
POLL_SECONDS = "CRYOSPARC_POLL_SECONDS"

#: Attempts to reach a server that does not answer, and seconds between them (the original's defaults).
DEFAULT_RETRIES = 3
DEFAULT_RETRY_SECONDS = 30.0
#: Seconds a lost connection is tried again while a job is waited on.
DEFAULT_WAIT_RETRY_SECONDS = 300.0
#: Seconds between looks at a queued or running job (the original waits 20 to 40 s).
DEFAULT_POLL_SECONDS = 20.0

_EXPORT = re.compile(r'^export\s+"([^=]+)=(.*)"\s*$')
_WANTED = (BASE_URL, HOST, BASE_PORT, CORE_PORT, LICENSE, PASSWORD, RETRIES, RETRY_SECONDS, WAIT_RETRY_SECONDS,
           POLL_SECONDS)


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
    """How to reach CryoSPARC: ``url``, the address a browser opens (``http://host:39000``, or any https
    address or path behind a proxy); ``email`` of the CryoSPARC user; ``license`` and ``password`` (secrets,
    hidden from ``repr``); ``retries`` attempts ``retry_seconds`` apart while the server does not answer or
    answers with a server error; ``wait_retry_seconds`` of retrying a lost connection while a job is waited
    on; ``poll_seconds`` between looks at a job; ``origin``: the variables the location came from."""

    url: str
    email: str | None
    license: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    retries: int = DEFAULT_RETRIES
    retry_seconds: float = DEFAULT_RETRY_SECONDS
    wait_retry_seconds: float = DEFAULT_WAIT_RETRY_SECONDS
    poll_seconds: float = DEFAULT_POLL_SECONDS
    origin: str = BASE_URL

    @classmethod
    def at(cls, host: str, base_port: int, email: str | None, **options: Any) -> Connection:
        """The connection to ``http://host:base_port``."""
        return cls(f"http://{host}:{base_port}", email, origin=f"{HOST}, {BASE_PORT}", **options)

    @property
    def host_and_base_port(self) -> tuple[str, int] | None:
        """``(host, base port)`` when :attr:`url` is a plain ``http://host[:port]`` address (what
        cryosparc-tools 4 and CryoSPARC v4's command ports need), else ``None``."""
        parts = urlsplit(self.url)
        if parts.scheme != "http" or parts.path.strip("/") or not parts.hostname:
            return None
        try:
            port = parts.port
        except ValueError:
            return None
        return parts.hostname, port or 80

    def describe(self) -> str:
        """Where and as whom (no secret)."""
        return f"CryoSPARC at {self.url}" + (f" as {self.email}" if self.email else "")

    def scrub(self, text: str) -> str:
        """``text`` with the secrets replaced."""
        return scrub(text, (self.license, self.password))


def scrub(text: str, secrets: tuple[str | None, ...]) -> str:
    """``text`` with every non-empty secret (and its SHA-256, as cryosparc-tools 5 sends it) replaced by
    ``<hidden>``."""
    import hashlib

    for secret in secrets:
        if secret:
            for form in (secret, hashlib.sha256(secret.encode()).hexdigest()):
                text = text.replace(form, "<hidden>")
    return text


def _location_known(values: Mapping[str, str]) -> bool:
    return BASE_URL in values or (HOST in values and (BASE_PORT in values or CORE_PORT in values))


def connection_from_environment(email: str | None, environ: Mapping[str, str] | None = None,
                                cryosparcm_env: Callable[[], Mapping[str, str]] = read_cryosparcm_env
                                ) -> Connection:
    """The connection the environment describes, ``cryosparcm env`` filling what it lacks.

    Raises :class:`CryoSieveInputError` naming the variable when the location is missing or a value is bad.
    """
    environ = os.environ if environ is None else environ
    values = {name: environ[name] for name in _WANTED if environ.get(name)}
    if not _location_known(values) or LICENSE not in values:
        fallback = cryosparcm_env()
        values.update({name: fallback[name] for name in _WANTED if name not in values and fallback.get(name)})

    def number(name: str, default: float, kind: type, least: float) -> Any:
        try:
            value = kind(values[name]) if name in values else default
        except ValueError:
            raise CryoSieveInputError(f"{name}={values[name]!r}: not a number") from None
        if not value >= least:
            raise CryoSieveInputError(f"{name}={values[name]!r}: out of range (at least {least:g})")
        return value

    if BASE_URL in values:
        url, origin = values[BASE_URL].rstrip("/"), BASE_URL
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise CryoSieveInputError(f"{BASE_URL}={values[BASE_URL]!r}: not an http:// or https:// address")
    elif HOST in values and (BASE_PORT in values or CORE_PORT in values):
        if BASE_PORT in values:
            port, origin = number(BASE_PORT, 0, int, 1), f"{HOST}, {BASE_PORT}"
        else:  # the original's variable: command_core listens on the base port + 2
            port, origin = number(CORE_PORT, 0, int, 3) - 2, f"{HOST}, {CORE_PORT}"
        url = f"http://{values[HOST]}:{port}"
    else:
        missing = HOST if HOST not in values else f"{BASE_PORT} (or {CORE_PORT})"
        raise CryoSieveInputError(f"{missing} is not set and `cryosparcm env` did not give it; set {BASE_URL} to the "
                                  f"address CryoSPARC's web page has, or {HOST} and {BASE_PORT}")
    return Connection(url=url, email=email or None, license=values.get(LICENSE), password=values.get(PASSWORD),
                      retries=number(RETRIES, DEFAULT_RETRIES, int, 1),
                      retry_seconds=number(RETRY_SECONDS, DEFAULT_RETRY_SECONDS, float, 0),
                      wait_retry_seconds=number(WAIT_RETRY_SECONDS, DEFAULT_WAIT_RETRY_SECONDS, float, 0),
                      poll_seconds=number(POLL_SECONDS, DEFAULT_POLL_SECONDS, float, 0.001), origin=origin)


def first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""
