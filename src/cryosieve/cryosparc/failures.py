"""What went wrong in a call to CryoSPARC, from the exceptions of either cryosparc-tools major version.

:func:`cause_of` reads an exception (and the exceptions it was raised from) as one of:

* ``unreachable``: nothing answered (connection refused, name not found, time-out, connection dropped):
  httpx's ``TransportError`` in 5.x; in 4.x a ``CommandError`` whose reason starts ``URL Error`` or
  ``Timeout Error``, or the socket's own error;
* ``refused``: the server refused the credentials: an HTTP 401 or 403 answer, cryosparc-tools 5's
  ``CryoSPARC authentication not provided or expired`` (no credentials at all), cryosparc-tools 4's
  assertions on the licence id, e-mail and password, or CryoSPARC v4's error answer to its login call;
* ``server``: any other HTTP status, or an answer that is not JSON (a web page, a proxy's error page);
* ``answer``: the server answered the call with an error of its own (an unknown job, a refused parameter).

5.x's ``APIError`` and JSON decoding errors are ``ValueError`` s, as are refused credentials: the cause is read
from the status and the exception types, never from the base class.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from cryosieve.cryosparc.connection import first_line

_HTTP_ERROR = re.compile(r"HTTP Error (\d{3})")
_CODE = re.compile(r"^\*\*\* (?:\[API\] )?\((?:(\w+) )?(\S*), code (\d+)\)")
#: The JSON-RPC functions CryoSPARC v4 identifies a user with (cryosparc-tools 4's tools.py, CryoSieve 1.3.3).
LOGIN_CALLS = ("get_id_by_email_password", "get_id_by_email")
_TRANSPORT_NAMES = {"ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout", "TimeoutException",
                    "RemoteProtocolError", "ReadError", "WriteError", "NetworkError", "TransportError",
                    "ConnectionError", "ConnectionRefusedError", "ConnectionResetError", "ConnectionAbortedError",
                    "RemoteDisconnected", "BrokenPipeError", "TimeoutError", "timeout", "URLError", "gaierror",
                    "IncompleteRead"}


@dataclass(frozen=True)
class Cause:
    """Why a call failed: ``kind`` (see the module docstring), the HTTP ``status`` and ``url`` where known, and
    ``reason``, one line (may hold secrets: scrub it before showing it)."""

    kind: str
    reason: str
    status: int | None = None
    url: str | None = None

    def describe(self) -> str:
        """The reason with the status and address, on one line."""
        where = " ".join(part for part in (f"HTTP {self.status}" if self.status else "",
                                           f"at {self.url}" if self.url else "") if part)
        return f"{self.reason} ({where})" if where else self.reason


def chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions it was raised from or while handling, outermost first."""
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _reason(item: BaseException) -> str:
    text = first_line(str(item))
    match = _CODE.match(text)
    if match:
        text = text[match.end():].strip()
    return text or type(item).__name__


def cause_of(error: BaseException) -> Cause:
    """The cause of a failed call (see the module docstring)."""
    items = chain(error)
    names = [type(item).__name__ for item in items]
    # cryosparc-tools 4: CommandError(reason, url=, code=) -- the innermost holds the reason of the request
    commands = [item for item in items if type(item).__name__ == "CommandError"]
    if commands:
        inner = commands[-1]
        text = str(inner)
        match = _CODE.match(text)
        url = match.group(2) if match else None
        reason = _reason(inner)
        if reason.startswith(("URL Error", "Timeout Error")):
            return Cause("unreachable", reason, None, url)
        http = _HTTP_ERROR.search(text)
        if http:
            code = int(http.group(1))
            return Cause("refused" if code in (401, 403) else "server", reason.split(";")[0], code, url)
        if "JSON response not received" in reason:
            return Cause("server", "the answer was not JSON", None, url)
        if any(f'"{call}"' in str(item) for item in commands for call in LOGIN_CALLS):
            return Cause("refused", _server_message(text), None, url)
        return Cause("answer", _server_message(text), None, url)
    for item in items:
        name = type(item).__name__
        if name == "HTTPStatusError":  # httpx: raise_for_status()
            response = getattr(item, "response", None)
            status: int | None = getattr(response, "status_code", None)
            url = str(getattr(getattr(item, "request", None), "url", "") or "") or None
            kind = "refused" if status in (401, 403) else "server"
            return Cause(kind, f"HTTP {status}", status, url)
        if name == "APIError":  # cryosparc-tools 5: an answer with an error status
            status = getattr(item, "code", None)
            match = _CODE.match(first_line(str(item)))
            url = match.group(2) if match else None
            detail = _api_detail(item)
            if status in (401, 403):
                return Cause("refused", detail or "not authorised", status, url)
            if isinstance(status, int) and (status >= 500 or status in (404, 405)) and not detail:
                return Cause("server", f"HTTP {status}", status, url)
            if isinstance(status, int) and status >= 500:
                return Cause("server", detail, status, url)
            return Cause("answer", detail or f"HTTP {status}", status, url)
    if any(name in _TRANSPORT_NAMES for name in names) or any(isinstance(item, (ConnectionError, TimeoutError))
                                                              for item in items):
        transport = next(item for item in reversed(items) if type(item).__name__ in _TRANSPORT_NAMES
                         or isinstance(item, (ConnectionError, TimeoutError)))
        return Cause("unreachable", _reason(transport))
    if any(isinstance(item, json.JSONDecodeError) for item in items) or \
            any(str(item).startswith("Error reading JSON response") for item in items):
        return Cause("server", "the answer was not JSON (a web page?)")
    if "ValidationError" in names:
        return Cause("server", "the answer was not what CryoSPARC answers")
    for item in items:
        text = str(item)
        if isinstance(item, AssertionError) and ("license" in text.lower() or "email" in text.lower()
                                                 or "password" in text.lower()):
            return Cause("refused", first_line(text))
        if isinstance(item, ValueError) and "authentication not provided" in text:
            return Cause("refused", "no credentials (password, login session or licence id)")
    return Cause("other", _reason(items[-1]))


def _server_message(text: str) -> str:
    """The message of a JSON-RPC error answer (cryosparc-tools 4 puts it on the line after its own, which
    also shows the call's parameters)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[1] if len(lines) > 1 else "the server answered with an error"


def _api_detail(error: BaseException) -> str:
    data = getattr(error, "data", None)
    if isinstance(data, dict):
        detail = data.get("detail")
        if isinstance(detail, str):
            return first_line(detail)
        if detail is not None:
            return first_line(json.dumps(detail))
    return ""
