"""A session with CryoSPARC: connecting, and every call the commands make, under one retry policy.

* :func:`connect`: the library's session (:mod:`cryosieve.cryosparc.clients`), tried ``retries`` times
  ``retry_seconds`` apart while the server does not answer or answers with a server error; refused
  credentials are refused at once; the server's version is read, and a cryosparc-tools of the other major
  version is refused in one line saying which to install (a server that does not speak the installed
  client's protocol is recognised by the other's);
* :meth:`Session.call`: one call, tried again as connecting is (calls that make something only when the
  request never left: a refused connection); a 5.x token that expired is renewed by logging in again;
* :meth:`Session.wait`: a job waited on until it completes; while it runs, a lost connection is tried again
  with back-off for ``wait_retry_seconds``, then the run stops in one line, the job left as it is; a job
  that failed or was killed is :class:`CryoSparcJobError`; a stop (another job failed, or an interruption)
  kills the job, unless the stop is a lost connection (:attr:`Session.lost`);
* :meth:`Session.make_job`, :meth:`Session.queue`, :meth:`Session.subset_job`: a job made and then failed is
  deleted, and the message names it.

Every message names the project, workspace, lane or job, and never holds a secret.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from cryosieve.cryosparc.clients import INSTALL, Client, JobMadeError, major_of, open_client, tools_version
from cryosieve.cryosparc.connection import PASSWORD, WAIT_RETRY_SECONDS, Connection
from cryosieve.cryosparc.failures import Cause, cause_of, chain
from cryosieve.errors import CryoSieveInputError, ExternalCommandError, ServiceError

log = logging.getLogger("cryosieve")

T = TypeVar("T")

DONE = "completed"
FAILED = ("failed", "killed")
#: The slot every particle output has (the images), declared on the External jobs' input and outputs.
PARTICLE_SLOT = "blob"
#: Seconds the probe of the other protocol waits for an answer.
PROBE_SECONDS = 10.0


class CryoSparcJobError(ExternalCommandError):
    """A CryoSPARC job failed or was killed: names the project and job id."""

    def __init__(self, project: str, job: str, kind: str, status: str) -> None:
        super().__init__(f"CryoSPARC job {project} {job} ({kind})", f"the job's event log in CryoSPARC ({status})", 1)
        self.project, self.job, self.kind, self.status = project, job, kind, status

    def __reduce__(self) -> tuple[type, tuple[str, str, str, str]]:  # type: ignore[override]
        return (type(self), (self.project, self.job, self.kind, self.status))


class CryoSparcError(ServiceError):
    """A call to CryoSPARC failed after its attempts: one line naming the server, the call and the cause."""


class Stopped(Exception):
    """The run was stopped (another job failed, the connection was lost, or the user interrupted) while a job
    ran."""


class CallFailed(Exception):
    """A call failed: its ``cause``, and the exception the library raised (``original``)."""

    def __init__(self, what: str, cause: Cause, original: BaseException, attempts: int) -> None:
        super().__init__(what)
        self.what, self.cause, self.original, self.attempts = what, cause, original, attempts


# --------------------------------------------------------------------------- connecting


def connect(connection: Connection, sleep: Callable[[float], None] = time.sleep,
            opener: Callable[[Connection], Client] = open_client) -> Session:
    """A session with CryoSPARC (see the module docstring); raises :class:`CryoSieveInputError` (one line, no
    secret) when it cannot be had."""
    tools = tools_version()
    tools_major = major_of(tools) or 0
    where = f"CryoSPARC at {connection.url} ({connection.origin})"
    client: Client | None = None
    version = ""
    for attempt in range(1, connection.retries + 1):
        try:
            client = opener(connection)
            version = client.server_version()
            break
        except CryoSieveInputError:
            raise
        except Exception as error:
            cause = cause_of(error)
            reason = connection.scrub(cause.describe())
            if cause.kind == "refused":
                raise CryoSieveInputError(
                    f"{where} refused the credentials (user {connection.email or '(none)'}; the password is "
                    f"{PASSWORD}, the licence id CRYOSPARC_LICENSE_ID): {reason}") from None
            if cause.kind == "server":
                other = probe_other_major(connection, tools_major)
                if other is not None:
                    raise CryoSieveInputError(_mismatch(where, other, tools)) from None
            if cause.kind in ("unreachable", "server"):
                if attempt < connection.retries:
                    log.warning("%s: %s (%s); attempt %d of %d, again in %g s", where,
                                "no answer" if cause.kind == "unreachable" else "server error", reason, attempt,
                                connection.retries, connection.retry_seconds)
                    sleep(connection.retry_seconds)
                    continue
                what = "cannot reach" if cause.kind == "unreachable" else "got server errors from"
                raise CryoSieveInputError(f"{what} {where} after {connection.retries} attempts: {reason}") from None
            raise CryoSieveInputError(f"cannot connect to {where}: {reason}") from None
    assert client is not None
    server_major = major_of(version) if version.startswith("v") else None
    if server_major is not None and server_major != tools_major:
        raise CryoSieveInputError(_mismatch(where, version, tools))
    session = Session(connection, client, version, sleep)
    account = client.account()
    log.info("connected to CryoSPARC %s at %s as %s (cryosparc-tools %s)", version or "(version unknown)",
             connection.url, account, tools)
    accounts = getattr(client, "accounts", None)
    if connection.email and accounts is not None and connection.email.lower() not in accounts():
        log.warning("CryoSPARC at %s: logged in as %s (the licence id), so the jobs are made by that account, not "
                    "by %s; set %s to that user's password, or log in once as that user with `python -m "
                    "cryosparc.tools login`", connection.url, account, connection.email, PASSWORD)
    return session


def _mismatch(where: str, server: str, tools: str) -> str:
    major = major_of(server)
    install = INSTALL.get(major or 0, "a cryosparc-tools of the same major version")
    return f"{where} is {server}, which cryosparc-tools {tools} does not speak to: {install}"


def probe_other_major(connection: Connection, tools_major: int) -> str | None:
    """The version of a server that speaks the other major version's protocol (``"v4.6.2"``, ``"v5"``), or
    ``None``: CryoSPARC v4's ``command_core`` answers JSON-RPC ``get_running_version`` on the base port + 2
    (as cryosparc-tools 4 and CryoSieve 1.3.3 call it); CryoSPARC v5 serves its API's OpenAPI description at
    ``/api/cmd/openapi.json`` (as cryosparc-tools 5 reads it)."""
    try:
        if tools_major == 5:
            address = connection.host_and_base_port
            if address is None:
                return None
            body = json.dumps({"jsonrpc": "2.0", "method": "get_running_version", "params": [], "id": "probe"})
            headers = {"Content-Type": "application/json", "Originator": "client"}
            if connection.license:
                headers["License-ID"] = connection.license
            request = urllib.request.Request(f"http://{address[0]}:{address[1] + 2}/api", data=body.encode(),
                                             headers=headers, method="POST")
            with urllib.request.urlopen(request, timeout=PROBE_SECONDS) as response:
                answer = json.loads(response.read())
            result = answer.get("result") if isinstance(answer, dict) else None
            return str(result) if isinstance(result, str) and result.startswith("v") else None
        if tools_major == 4:
            with urllib.request.urlopen(f"{connection.url}/api/cmd/openapi.json", timeout=PROBE_SECONDS) as response:
                schema = json.loads(response.read())
            if not (isinstance(schema, dict) and "openapi" in schema and "paths" in schema):
                return None
            version = str(schema.get("info", {}).get("version", ""))
            return version if version.startswith("v") and (major_of(version) or 0) >= 5 else "v5"
    except Exception:  # no answer, another answer: not the other protocol
        return None
    return None


# --------------------------------------------------------------------------- the session


class Session:
    """Calls to CryoSPARC through ``client`` (see the module docstring). Shared by the threads of a run:
    :attr:`lost` is set once one of them has given up on a lost connection."""

    def __init__(self, connection: Connection, client: Client, server_version: str,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> None:
        self.connection = connection
        self.client = client
        self.server_version = server_version
        self.sleep = sleep
        self.clock = clock
        self.lost = threading.Event()
        self._login_lock = threading.Lock()
        self._logins = 0

    @property
    def where(self) -> str:
        return f"CryoSPARC at {self.connection.url}"

    def reason(self, cause: Cause) -> str:
        return self.connection.scrub(cause.describe())

    def _relogin(self, seen: int) -> bool:
        """Log in again, once for all the threads that saw the same expired token."""
        with self._login_lock:
            if self._logins != seen:
                return True  # another thread already did
            try:
                renewed = self.client.relogin()
            except Exception as error:
                raise CryoSieveInputError(f"{self.where}: the login expired and logging in again failed: "
                                          f"{self.reason(cause_of(error))}") from None
            if renewed:
                self._logins += 1
                log.info("%s: the login expired; logged in again", self.where)
            return renewed

    def call(self, what: str, function: Callable[..., T], *args: Any, idempotent: bool = True, **kwargs: Any) -> T:
        """``function(*args, **kwargs)``, tried again (``retries`` attempts, ``retry_seconds`` apart) while the
        server does not answer or answers with a server error; a call that is not ``idempotent`` only when its
        connection was refused (the request never left). Raises :class:`CallFailed`."""
        attempt, relogged = 1, False
        while True:
            seen = self._logins
            try:
                return function(*args, **kwargs)
            except (CryoSieveInputError, KeyboardInterrupt):
                raise
            except Exception as error:
                cause = cause_of(error)
                if cause.kind == "refused" and cause.status == 401 and not relogged and self._relogin(seen):
                    relogged = True
                    continue
                again = cause.kind in ("unreachable", "server") and (idempotent or _never_sent(error))
                if again and attempt < self.connection.retries:
                    log.warning("%s: %s: %s; attempt %d of %d, again in %g s", self.where, what, self.reason(cause),
                                attempt, self.connection.retries, self.connection.retry_seconds)
                    self.sleep(self.connection.retry_seconds)
                    attempt += 1
                    continue
                raise CallFailed(what, cause, error, attempt) from None

    def failure(self, failed: CallFailed, input_error: bool = False) -> Exception:
        """The one-line error of a failed call: an input error when the server refused what was asked
        (``input_error``, or refused credentials), else :class:`CryoSparcError`."""
        cause = failed.cause
        text = f"{self.where}: {failed.what}: {self.reason(cause)}"
        if cause.kind in ("unreachable", "server") and failed.attempts > 1:
            text += f" (after {failed.attempts} attempts)"
        if cause.kind == "refused" or (input_error and cause.kind == "answer"):
            return CryoSieveInputError(text)
        return CryoSparcError(text)

    def watch(self, what: str, function: Callable[[], T], stop: threading.Event) -> T:
        """``function()`` while a job is waited on: a lost connection or a server error is tried again with
        back-off for ``wait_retry_seconds``; then :attr:`lost` is set and :class:`CryoSparcError` raised.
        :class:`Stopped` when ``stop`` is set meanwhile."""
        deadline: float | None = None
        delay = min(1.0, max(self.connection.wait_retry_seconds / 16, 0.005))
        relogged = False
        while True:
            seen = self._logins
            try:
                value = function()
            except (CryoSieveInputError, KeyboardInterrupt):
                raise
            except Exception as error:
                cause = cause_of(error)
                if cause.kind == "refused" and cause.status == 401 and not relogged and self._relogin(seen):
                    relogged = True
                    continue
                if cause.kind not in ("unreachable", "server"):
                    raise CallFailed(what, cause, error, 1) from None
                now = self.clock()
                if deadline is None:
                    deadline = now + self.connection.wait_retry_seconds
                    log.warning("%s does not answer (%s) while %s; trying again for up to %g s (%s)", self.where,
                                self.reason(cause), what, self.connection.wait_retry_seconds, WAIT_RETRY_SECONDS)
                if now >= deadline:
                    self.lost.set()
                    raise CryoSparcError(
                        f"{self.where} did not answer for {self.connection.wait_retry_seconds:g} s "
                        f"({WAIT_RETRY_SECONDS}) while {what}: {self.reason(cause)}; the jobs are left as they are"
                    ) from None
                if stop.wait(min(delay, max(deadline - now, 0.0))):
                    raise Stopped(what) from None
                delay = min(delay * 2, 60.0)
                continue
            if deadline is not None:
                log.info("%s answers again", self.where)
            return value

    # ----------------------------------------------------------------------- looking up

    def check_target(self, project: str, workspace: str, lane: str | None) -> None:
        """Refuse (one line) an unknown ``project``, ``workspace`` of it, or ``lane``."""
        try:
            self.call(f"project {project}", self.client.find_project, project)
        except CallFailed as failed:
            raise self._not_found(failed, f"CryoSPARC project {project}: not found or not accessible") from None
        try:
            self.call(f"workspace {workspace} of project {project}", self.client.find_workspace, project, workspace)
        except CallFailed as failed:
            raise self._not_found(failed, f"CryoSPARC workspace {workspace} of project {project}: not found") from None
        if lane is not None:
            names = self.lane_names()
            if lane not in names:
                raise CryoSieveInputError(f"CryoSPARC lane {lane!r}: not found (lanes: {', '.join(names) or 'none'})")

    def _not_found(self, failed: CallFailed, text: str) -> Exception:
        if failed.cause.kind == "answer":
            return CryoSieveInputError(f"{text} ({self.reason(failed.cause)})")
        return self.failure(failed)

    def lane_names(self) -> list[str]:
        try:
            return self.call("the scheduler lanes", self.client.lane_names)
        except CallFailed as failed:
            raise self.failure(failed) from None

    def find_job(self, project: str, job: str) -> Any:
        """The job ``job`` of ``project``; refused (one line) when there is none."""
        try:
            return self.call(f"job {project} {job}", self.client.find_job, project, job)
        except CallFailed as failed:
            raise self._not_found(failed, f"CryoSPARC job {project} {job}: not found") from None

    def output_results(self, job: Any, project: str, output: str) -> list[tuple[str, bool, bool]]:
        try:
            return self.call(f"the outputs of job {project} {job.uid}", self.client.output_results, job, output)
        except CallFailed as failed:
            raise self.failure(failed) from None

    def particle_uids(self, project: str, job_uid: str, output: str) -> np.ndarray:
        """The ``uid`` of the particles of output ``output`` of job ``job_uid``, from one slot's data."""
        job = self.find_job(project, job_uid)
        results = self.output_results(job, project, output)
        if not results:
            raise CryoSieveInputError(f"CryoSPARC job {project} {job_uid}: no output {output!r}")
        names = [name for name, passthrough, has_data in results if has_data and not passthrough] or \
            [name for name, _, has_data in results if has_data]
        if not names:
            raise CryoSieveInputError(f"CryoSPARC job {project} {job_uid}: its output {output!r} holds no data yet")
        if PARTICLE_SLOT not in [name for name, _, _ in results]:
            raise CryoSieveInputError(f"CryoSPARC job {project} {job_uid}: its output {output!r} has no "
                                      f"{PARTICLE_SLOT} slot (particle images)")
        try:
            dataset = self.call(f"output {output} of job {project} {job_uid}", self.client.load_output, job, output,
                                names[:1])
        except CallFailed as failed:
            raise self.failure(failed) from None
        return np.asarray(dataset["uid"], dtype=np.uint64)

    def load_output(self, job: Any, project: str, output: str, slots: Sequence[str]) -> Any:
        try:
            return self.call(f"output {output} of job {project} {job.uid}", self.client.load_output, job, output,
                             slots)
        except CallFailed as failed:
            raise self.failure(failed) from None

    def download_mrc(self, project: str, path: str) -> np.ndarray:
        try:
            return self.call(f"file {path} of project {project}", self.client.download_mrc, project, path)
        except CallFailed as failed:
            raise self.failure(failed) from None

    # ----------------------------------------------------------------------- making and running

    def delete(self, project: str, job_uid: str) -> bool:
        """Delete a job this run made and could not use; whether it was."""
        try:
            self.call(f"deleting job {project} {job_uid}", self.client.delete, project, job_uid)
            return True
        except CallFailed as failed:
            log.warning("%s: job %s %s could not be deleted (%s)", self.where, project, job_uid,
                        self.reason(failed.cause))
            return False

    def _deleted(self, project: str, job_uid: str) -> str:
        return "it was deleted" if self.delete(project, job_uid) else f"delete it in CryoSPARC ({project} {job_uid})"

    def make_job(self, project: str, workspace: str, kind: str, connections: Mapping[str, tuple[str, str]],
                 params: Mapping[str, Any], title: str) -> Any:
        """A new job of type ``kind`` with its inputs connected (input -> (job id, output)) and its parameters;
        a job made whose inputs could not be connected is deleted."""
        try:
            return self.call(f"making a {kind} job in {project} {workspace}", self.client.create_job, project,
                             workspace, kind, connections, params, title, idempotent=False)
        except CallFailed as failed:
            made = next((item for item in chain(failed.original) if isinstance(item, JobMadeError)), None)
            failure = self.failure(failed, input_error=True)
            if made is None:
                raise failure from None
            raise type(failure)(f"{failure}; the job {project} {made.uid} was made, and "
                                f"{self._deleted(project, made.uid)}") from None

    def queue(self, job: Any, project: str, kind: str, lane: str | None) -> None:
        """Queue ``job`` on ``lane`` (``None``: on the master, as imports run); a job that cannot be queued is
        deleted."""
        where = f" on lane {lane}" if lane else ""
        try:
            self.call(f"queueing job {project} {job.uid} ({kind}){where}", self.client.queue, job, lane,
                      idempotent=False)
        except CallFailed as failed:
            failure = self.failure(failed, input_error=True)
            raise type(failure)(f"{failure}; {self._deleted(project, str(job.uid))}") from None
        log.info("CryoSPARC job %s %s (%s) queued%s", project, job.uid, kind, where)

    def wait(self, job: Any, project: str, kind: str, stop: threading.Event) -> None:
        """Wait until ``job`` completes (see the module docstring)."""
        what = f"job {project} {job.uid} ({kind}) runs"
        while True:
            try:
                status = self.watch(what, lambda: self.client.status(job), stop)
            except CallFailed as failed:
                raise self.failure(failed) from None
            except Stopped:
                self._stop(job, project)
                raise
            if status == DONE:
                return
            if status in FAILED:
                raise CryoSparcJobError(project, str(job.uid), kind, status)
            if stop.wait(self.connection.poll_seconds):
                self._stop(job, project)
                raise Stopped(what)

    def _stop(self, job: Any, project: str) -> None:
        """Kill ``job`` because the run stops, unless it stops on a lost connection."""
        if self.lost.is_set():
            return
        try:
            self.call(f"killing job {project} {job.uid}", self.client.kill, job)
            log.info("CryoSPARC job %s %s killed", project, job.uid)
        except CallFailed as failed:  # already over, or the server went away: say so, do not mask the stop
            log.warning("%s: job %s %s could not be killed (%s)", self.where, project, job.uid,
                        self.reason(failed.cause))

    def subset_job(self, project: str, workspace: str, source: tuple[str, str],
                   selections: Sequence[tuple[str, np.ndarray]], title: str) -> str:
        """An External job whose input ``particles`` is ``source`` (job id, output) and whose outputs (name,
        uids) are the source's own rows of those particles: a declared ``blob`` slot saved from the input's
        rows, every other slot passed through. Returns its id; a job that fails is deleted, and named."""
        source_job = self.find_job(project, source[0])
        results = self.output_results(source_job, project, source[1])
        if PARTICLE_SLOT not in [name for name, _, _ in results]:
            raise CryoSieveInputError(f"CryoSPARC job {project} {source[0]}: its output {source[1]!r} has no "
                                      f"{PARTICLE_SLOT} slot (particle images)")
        try:
            job = self.call(f"making an External job in {project} {workspace}", self.client.create_external_job,
                            project, workspace, title, idempotent=False)
        except CallFailed as failed:
            raise self.failure(failed, input_error=True) from None
        uid = str(job.uid)
        step = "making it"
        try:
            client = self.client
            self.call(f"job {project} {uid}: adding its input", client.add_input, job, "particles", "particle",
                      [PARTICLE_SLOT])
            self.call(f"job {project} {uid}: connecting {source[0]}.{source[1]}", client.connect, job, "particles",
                      source, idempotent=False)
            for name, _ in selections:
                self.call(f"job {project} {uid}: adding output {name}", client.add_output, job, name, "particle",
                          [PARTICLE_SLOT], "particles")
            step = "saving its outputs"
            with client.running(job):
                rows = self.call(f"job {project} {uid}: its input", client.load_input, job, "particles",
                                 [PARTICLE_SLOT])
                present = np.asarray(rows["uid"], dtype=np.uint64)
                for name, uids in selections:
                    wanted = np.unique(np.asarray(uids, dtype=np.uint64))
                    keep = np.isin(present, wanted)
                    if int(keep.sum()) != len(wanted):
                        raise CryoSieveInputError(
                            f"{len(wanted) - int(keep.sum())} of the {len(wanted)} particles of output {name} are not "
                            f"among the output {source[1]!r} of CryoSPARC job {project} {source[0]}")
                    self.call(f"job {project} {uid}: saving output {name}", client.save_output, job, name,
                              rows.mask(keep))
        except CryoSieveInputError as error:
            raise CryoSieveInputError(f"{error.raw_message}; the External job {project} {uid} was made, and "
                                      f"{self._deleted(project, uid)}") from None
        except CallFailed as failed:
            failure = self.failure(failed)
            raise type(failure)(f"{failure}; the External job {project} {uid} failed while {step}, and "
                                f"{self._deleted(project, uid)}") from None
        except Exception as failure:  # the library's own checks, or its marking the job completed or failed
            cause = cause_of(failure)
            raise CryoSparcError(f"{self.where}: External job {project} {uid} failed while {step}: "
                                 f"{self.reason(cause)}; {self._deleted(project, uid)}") from None
        return uid


def _never_sent(error: BaseException) -> bool:
    """Whether the request surely never reached the server (its connection was refused or not made)."""
    for item in chain(error):
        name = type(item).__name__
        if name in ("ConnectError", "ConnectionRefusedError", "gaierror"):
            return True
        if name == "CommandError" and "URL Error" in str(item) and "refused" in str(item).lower():
            return True
    return False
