"""The calls the commands make, as cryosparc-tools 4.x and 5.x each accept them.

:func:`open_client` opens a session with the installed ``cryosparc-tools`` and returns a :class:`Client`
whose methods are the only calls the package makes; :class:`Tools4` and :class:`Tools5` are the two
majors (cryosparc-tools 4.4-4.7 speak to CryoSPARC v4.4-4.7, 5.x to CryoSPARC v5):

* the session: 5.x takes the base URL (``host`` and ``base_port`` given as ``None``, so that
  ``CRYOSPARC_BASE_URL`` read at its import cannot clash with them), an e-mail and password (sent as its
  SHA-256), else a ``python -m cryosparc.tools login`` session, else the licence id (logging in as the licence's
  account); 4.x needs the licence id, the e-mail and the password, or, without a password, the session
  CryoSieve 1.3.3 opens: the licence id in a ``License-ID`` header and the user looked up by e-mail
  (``get_id_by_email``);
* 4.x retries each request itself (``CRYOSPARC_COMMAND_RETRIES`` read at its import, ``time.sleep``
  between); its module variables are set so that each request is made once, and the package's own policy
  (:mod:`cryosieve.cryosparc.session`) decides about another attempt;
* External jobs are made with declared slots: an input ``particles`` requiring the ``blob`` slot, outputs
  that pass it through with their own ``blob`` slot saved from the input's own rows (5.x refuses inputs and
  outputs without slots; 4.x cannot allocate an output that has only passed-through results);
* ``load_output`` is always given the names of the slots wanted (5.x drops an empty list and loads the
  server's default slots, 4.x loads every slot for it);
* jobs are deleted with ``api.jobs.delete`` (5.x) or the ``delete_job`` function of CryoSPARC v4's
  ``command_core`` (4.x).

The library's own warnings (its retries, its version notices, its deprecations) are kept off the console
(:func:`silence_library_warnings`): the package reports each failure once, in its own words.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from cryosieve.cryosparc.connection import LICENSE, Connection
from cryosieve.errors import CryoSieveInputError

#: The cryosparc-tools majors the package speaks, and the CryoSPARC versions each reaches.
SUPPORTED = {4: "CryoSPARC v4.4 to v4.7", 5: "CryoSPARC v5"}
#: What to install for a CryoSPARC major version.
INSTALL = {4: 'pip install "cryosparc-tools>=4.4,<5"  (or "cryosieve[cryosparc4]")',
           5: 'pip install "cryosparc-tools>=5,<6"  (or "cryosieve[cryosparc]")'}

_FILTER_LOCK = threading.Lock()
_FILTERS = (r"cryosparc(\..*)?$", r"cryosieve\.cryosparc(\..*)?$")


def silence_library_warnings() -> None:
    """Ignore the warnings cryosparc-tools issues, and those it attributes to its caller (this package's
    CryoSPARC modules): its retry notices, version notices and deprecations would print before, and beside,
    the one line the package reports."""
    with _FILTER_LOCK:
        present = {(action, getattr(module, "pattern", None)) for action, _, _, module, _ in warnings.filters}
        for pattern in _FILTERS:
            if ("ignore", pattern) not in present:
                warnings.filterwarnings("ignore", module=pattern)


def tools_version() -> str:
    """The installed cryosparc-tools version; an input error when it is not installed."""
    try:
        import cryosparc
    except ImportError:
        raise CryoSieveInputError('the CryoSPARC commands need cryosparc-tools: pip install "cryosieve[cryosparc]" '
                                  '(CryoSPARC v5) or "cryosieve[cryosparc4]" (CryoSPARC v4)') from None
    return str(getattr(cryosparc, "__version__", "0"))


def major_of(version: str) -> int | None:
    """The major number of a version (``"v4.7.1+250814"``, ``"5.0.3"``), or ``None``."""
    text = version.strip().lstrip("v")
    head = text.split(".")[0]
    return int(head) if head.isdigit() else None


class Client:
    """A session with CryoSPARC through one cryosparc-tools major version; ``cs`` is the library's
    ``CryoSPARC`` object."""

    major = 0

    def __init__(self, connection: Connection, cs: Any) -> None:
        self.connection = connection
        self.cs = cs

    # -- the session
    def server_version(self) -> str:
        raise NotImplementedError

    def account(self) -> str:
        """Who the jobs are made by (an e-mail address, or the account's name)."""
        raise NotImplementedError

    def relogin(self) -> bool:
        """Log in again (an expired token); ``False`` when the session cannot."""
        return False

    # -- looking up
    def find_project(self, project: str) -> None:
        self.cs.find_project(project)

    def find_workspace(self, project: str, workspace: str) -> None:
        self.cs.find_workspace(project, workspace)

    def lane_names(self) -> list[str]:
        raise NotImplementedError

    def find_job(self, project: str, job: str) -> Any:
        return self.cs.find_job(project, job)

    def status(self, job: Any) -> str:
        """The job's scheduling status, refreshed."""
        job.refresh()
        return str(job.status)

    def output_results(self, job: Any, output: str) -> list[tuple[str, bool, bool]]:
        """The results (slots) of output ``output`` of ``job``, refreshed: ``(name, passed through, has data)``;
        empty when there is no such output."""
        raise NotImplementedError

    def load_output(self, job: Any, output: str, slots: Sequence[str]) -> Any:
        """The dataset of ``slots`` (never empty) of ``job``'s output ``output``."""
        assert slots, "slots must be named"
        return job.load_output(output, slots=list(slots))

    def download_mrc(self, project: str, path: str) -> np.ndarray:
        _, data = self.cs.download_mrc(project, path)
        return np.asarray(data)

    # -- making and running
    def create_job(self, project: str, workspace: str, kind: str, connections: Mapping[str, tuple[str, str]],
                   params: Mapping[str, Any], title: str) -> Any:
        raise NotImplementedError

    def queue(self, job: Any, lane: str | None) -> None:
        job.queue(lane)

    def kill(self, job: Any) -> None:
        job.kill()

    def delete(self, project: str, job: str) -> None:
        raise NotImplementedError

    def create_external_job(self, project: str, workspace: str, title: str) -> Any:
        return self.cs.create_external_job(project, workspace, title=title)

    def add_input(self, job: Any, name: str, kind: str, slots: Sequence[str]) -> None:
        job.add_input(kind, name, min=1, slots=list(slots))

    def connect(self, job: Any, name: str, source: tuple[str, str]) -> None:
        job.connect(name, source[0], source[1])

    def add_output(self, job: Any, name: str, kind: str, slots: Sequence[str], passthrough: str) -> None:
        job.add_output(kind, name, slots=list(slots), passthrough=passthrough)

    @contextlib.contextmanager
    def running(self, job: Any) -> Iterator[None]:
        """The External job marked running, then completed (failed when the block raises)."""
        with job.run():
            yield

    def load_input(self, job: Any, name: str, slots: Sequence[str]) -> Any:
        return job.load_input(name, slots=list(slots))

    def save_output(self, job: Any, name: str, dataset: Any) -> None:
        job.save_output(name, dataset)


class Tools5(Client):
    """cryosparc-tools 5.x (CryoSPARC v5): REST under ``/api``."""

    major = 5

    @classmethod
    def open(cls, connection: Connection) -> Tools5:
        from cryosparc.tools import CryoSPARC

        return cls(connection, CryoSPARC(**cls._arguments(connection)))

    @staticmethod
    def _arguments(connection: Connection) -> dict[str, Any]:
        use_license = connection.license if not connection.password else None
        return {"base_url": connection.url, "host": None, "base_port": None, "email": connection.email,
                "password": connection.password if connection.email else None, "license": use_license}

    def server_version(self) -> str:
        return str(self.cs.api.config.get_version())

    def account(self) -> str:
        user = self.cs.user
        emails = [str(getattr(email, "address", "")) for email in (getattr(user, "emails", None) or [])]
        return emails[0] if emails else str(getattr(user, "name", "") or "?")

    def accounts(self) -> set[str]:
        user = self.cs.user
        return {str(getattr(email, "address", "")).lower() for email in (getattr(user, "emails", None) or [])}

    def relogin(self) -> bool:
        if not (self.connection.password and self.connection.email) and not self.connection.license:
            return False  # a stored login session: nothing to log in again with
        from cryosparc.tools import CryoSPARC

        fresh = CryoSPARC(**self._arguments(self.connection))
        self.cs.api = fresh.api  # every job object reaches the server through cs.api
        return True

    def lane_names(self) -> list[str]:
        return [str(lane.name) for lane in self.cs.get_lanes()]

    def output_results(self, job: Any, output: str) -> list[tuple[str, bool, bool]]:
        job.refresh()
        outputs = job.model.spec.outputs.root
        if output not in outputs:
            return []
        return [(str(result.name), bool(result.passthrough), bool(result.metafiles)) for result in
                outputs[output].results]

    def create_job(self, project: str, workspace: str, kind: str, connections: Mapping[str, tuple[str, str]],
                   params: Mapping[str, Any], title: str) -> Any:
        job = self.cs.create_job(project, workspace, kind, params=dict(params), title=title)
        try:
            for name, (source_job, source_output) in connections.items():
                job.connect(name, source_job, source_output)
        except BaseException as error:
            raise JobMadeError(str(job.uid)) from error
        return job

    def delete(self, project: str, job: str) -> None:
        self.cs.api.jobs.delete(project, job)


class Tools4(Client):
    """cryosparc-tools 4.x (CryoSPARC v4): JSON-RPC to ``command_core`` (base port + 2) and ``command_vis``
    (+ 3)."""

    major = 4

    @classmethod
    def open(cls, connection: Connection) -> Tools4:
        # cryosparc.command reads CRYOSPARC_COMMAND_RETRIES and CRYOSPARC_COMMAND_RETRY_SECONDS at its import (as
        # integers: a fraction of a second, which the package takes, would fail its import) and retries each
        # request itself: each request is made once (MAX_ATTEMPTS 1 would make none), with no sleep of its own.
        with _environment({"CRYOSPARC_COMMAND_RETRIES": "2", "CRYOSPARC_COMMAND_RETRY_SECONDS": "0"}):
            import cryosparc.command
            from cryosparc.tools import CryoSPARC
        cryosparc.command.MAX_ATTEMPTS = 2
        cryosparc.command.RETRY_INTERVAL = 0
        address = connection.host_and_base_port
        if address is None:
            raise CryoSieveInputError(
                f"cryosparc-tools 4 reaches CryoSPARC v4 on its command ports (http://HOST:BASE_PORT+2), which "
                f"{connection.url} ({connection.origin}) does not give; set CRYOSPARC_MASTER_HOSTNAME and "
                "CRYOSPARC_BASE_PORT, or install cryosparc-tools 5 for CryoSPARC v5")
        if not connection.license:
            raise CryoSieveInputError(f"cryosparc-tools 4 needs the licence id: set {LICENSE}")
        if not connection.email:
            raise CryoSieveInputError("cryosparc-tools 4 needs the CryoSPARC user's e-mail address")
        host, base_port = address
        if connection.password:
            return cls(connection, CryoSPARC(license=connection.license, host=host, base_port=base_port,
                                             email=connection.email, password=connection.password))
        return cls(connection, _session_by_email(CryoSPARC, connection.license, host, base_port, connection.email))

    def server_version(self) -> str:
        return str(self.cs.cli.get_running_version())

    def account(self) -> str:
        return str(self.connection.email)

    def lane_names(self) -> list[str]:
        return [str(lane["name"]) for lane in self.cs.get_lanes()]

    def output_results(self, job: Any, output: str) -> list[tuple[str, bool, bool]]:
        job.refresh()
        return [(str(result["name"]), bool(result.get("passthrough")), bool(result.get("metafiles")))
                for result in job.doc.get("output_results", []) if result.get("group_name") == output]

    def create_job(self, project: str, workspace: str, kind: str, connections: Mapping[str, tuple[str, str]],
                   params: Mapping[str, Any], title: str) -> Any:
        # One make_job call makes the job with its connections (nothing is left half-made).
        return self.cs.create_job(project, workspace, kind, connections=dict(connections), params=dict(params),
                                  title=title)

    def delete(self, project: str, job: str) -> None:
        self.cs.cli.delete_job(project_uid=project, job_uid=job)


def _session_by_email(cryosparc_class: Any, license: str, host: str, base_port: int, email: str) -> Any:
    """A cryosparc-tools 4 session without a password, as CryoSieve 1.3.3 opens one: the command services
    with the licence id in their ``License-ID`` header (as the library's constructor makes them) and the
    user's id from ``get_id_by_email``."""
    from cryosparc.command import CommandClient

    cs = cryosparc_class.__new__(cryosparc_class)
    headers = {"License-ID": license}
    cs.cli = CommandClient(service="command_core", host=host, port=base_port + 2, headers=headers)
    cs.vis = CommandClient(service="command_vis", host=host, port=base_port + 3, headers=headers)
    cs.user_id = cs.cli.get_id_by_email(email)
    return cs


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` while a library module is imported, restored after."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class JobMadeError(Exception):
    """A job was made and then a later step of making it failed: ``uid`` names it (to delete)."""

    def __init__(self, uid: str) -> None:
        super().__init__(uid)
        self.uid = uid


def open_client(connection: Connection) -> Client:
    """A session with the installed cryosparc-tools (4.x or 5.x); raises what the library raises."""
    version = tools_version()
    major = major_of(version)
    silence_library_warnings()
    if major == 5:
        return Tools5.open(connection)
    if major == 4:
        return Tools4.open(connection)
    raise CryoSieveInputError(f"cryosparc-tools {version} is not supported: {INSTALL[5]} for CryoSPARC v5, or "
                              f"{INSTALL[4]} for CryoSPARC v4")

