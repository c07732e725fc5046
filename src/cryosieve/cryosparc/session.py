"""The client calls the CryoSPARC commands make, in one place.

They follow cryosparc-tools 4.4-4.7 (CryoSPARC v4) and 5.0 (CryoSPARC v5); where the two
differ, this module is the only one that knows:

* the session: 4.x needs the licence id, e-mail and password, 5.x takes an e-mail and password
  (or a stored login) and accepts the licence id as a deprecated fallback
  (:func:`cryosieve.cryosparc.connection.connect` passes what it has and reads either's errors);
* ``get_lanes()`` gives dictionaries in 4.x and models with attributes in 5.x (:func:`lane_names`);
* a job's ``status`` is a document field in 4.x and a model field in 5.x, both refreshed by
  ``refresh()`` (:func:`status_of`);
* ``load_output(name, slots=[])`` gives the ``uid`` column alone in 5.x and every slot in 4.x (only
  ``uid`` is read);
* External jobs are made, started and stopped the same way in both (``create_external_job``,
  ``add_input``, ``connect``, ``add_output``, ``alloc_output``, ``save_output`` inside ``run()``).

Every call that fails is turned into one line naming the project, workspace, lane or job, with
no secret in it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from cryosieve.cryosparc.connection import first_line
from cryosieve.errors import CryoSieveInputError, ExternalCommandError

log = logging.getLogger("cryosieve")

#: Seconds between looks at a queued or running job (the original waits 20 to 40 s).
POLL_SECONDS = 20.0

DONE = "completed"
FAILED = ("failed", "killed")


class CryoSparcJobError(ExternalCommandError):
    """A CryoSPARC job failed or was killed: names the project and job id."""

    def __init__(self, project: str, job: str, kind: str, status: str) -> None:
        super().__init__(f"CryoSPARC job {project} {job} ({kind})", f"the job's event log in CryoSPARC ({status})", 1)
        self.project, self.job, self.kind, self.status = project, job, kind, status


class Stopped(Exception):
    """The run was stopped (another job failed, or the user interrupted) while a job ran."""


def _reason(error: BaseException, scrub: Callable[[str], str]) -> str:
    return scrub(first_line(str(error)) or type(error).__name__)


def check_target(client: Any, project: str, workspace: str, lane: str | None,
                 scrub: Callable[[str], str] = str) -> None:
    """Refuse (one line) an unknown ``project``, ``workspace`` of it, or ``lane``."""
    try:
        client.find_project(project)
    except Exception as error:
        raise CryoSieveInputError(f"CryoSPARC project {project}: not found or not accessible "
                                  f"({_reason(error, scrub)})") from None
    try:
        client.find_workspace(project, workspace)
    except Exception as error:
        raise CryoSieveInputError(f"CryoSPARC workspace {workspace} of project {project}: not found "
                                  f"({_reason(error, scrub)})") from None
    if lane is not None:
        names = lane_names(client)
        if lane not in names:
            raise CryoSieveInputError(f"CryoSPARC lane {lane!r}: not found (lanes: {', '.join(names) or 'none'})")


def lane_names(client: Any) -> list[str]:
    """The names of the scheduler lanes (4.x: dictionaries; 5.x: models)."""
    names = []
    for lane in client.get_lanes():
        names.append(str(lane["name"] if isinstance(lane, Mapping) else lane.name))
    return names


def check_job(client: Any, project: str, job: str, scrub: Callable[[str], str] = str) -> Any:
    """The job ``job`` of ``project``; refused (one line) when there is none."""
    try:
        return client.find_job(project, job)
    except Exception as error:
        raise CryoSieveInputError(f"CryoSPARC job {project} {job}: not found ({_reason(error, scrub)})") from None


def status_of(job: Any) -> str:
    """The job's scheduling status, refreshed."""
    job.refresh()
    return str(job.status)


def create_job(client: Any, project: str, workspace: str, kind: str, connections: Mapping[str, tuple[str, str]],
               params: Mapping[str, Any], title: str) -> Any:
    """A new job of type ``kind`` with its inputs connected (input -> (job id, output)) and its parameters."""
    return client.create_job(project, workspace, kind, connections=dict(connections), params=dict(params), title=title)


def queue_and_wait(job: Any, project: str, kind: str, lane: str | None, stop: threading.Event,
                   poll_seconds: float = POLL_SECONDS) -> None:
    """Queue ``job`` on ``lane`` (``None``: on the master, as imports run) and wait until it completes.

    Raises :class:`CryoSparcJobError` when it fails or is killed, :class:`Stopped` (after killing it)
    when ``stop`` is set first.
    """
    job.queue(lane)
    log.info("CryoSPARC job %s %s (%s) queued%s", project, job.uid, kind, f" on lane {lane}" if lane else "")
    while True:
        status = status_of(job)
        if status == DONE:
            return
        if status in FAILED:
            raise CryoSparcJobError(project, str(job.uid), kind, status)
        if stop.wait(poll_seconds):
            try:
                job.kill()
            except Exception as error:  # already over, or the server went away: say so, do not mask the stop
                log.warning("CryoSPARC job %s %s: could not be killed (%s)", project, job.uid, first_line(str(error)))
            raise Stopped(f"CryoSPARC job {project} {job.uid} stopped")


def subset_job(client: Any, project: str, workspace: str, source: tuple[str, str],
               uids: np.ndarray | Sequence[np.ndarray],
               names: Sequence[str], title: str) -> Any:
    """An External job whose input is ``source`` (job id, output name) and whose outputs ``names`` pass
    through those of its particles whose ``uid`` are in ``uids`` (one array per output, or one for all):
    the particles stay CryoSPARC's own, nothing is imported again.

    Refused (one line) before anything is made when a uid is not among the source's particles.
    Returns the job.
    """
    selections = list(uids) if isinstance(uids, (list, tuple)) else [uids]
    if len(selections) == 1 and len(names) > 1:
        selections = selections * len(names)
    try:
        known = np.asarray(client.find_job(project, source[0]).load_output(source[1], slots=[])["uid"])
    except Exception as error:
        raise CryoSieveInputError(f"CryoSPARC job {project} {source[0]}: no particles output {source[1]!r} "
                                  f"({first_line(str(error)) or type(error).__name__})") from None
    for selection in selections:
        missing = np.setdiff1d(np.asarray(selection, dtype=np.uint64), known.astype(np.uint64))
        if missing.size:
            raise CryoSieveInputError(
                f"{missing.size} of the {len(selection)} particles are not among the output {source[1]!r} of "
                f"CryoSPARC job {project} {source[0]} (uid {int(missing[0])}...); give the job the particles "
                "came from")
    job = client.create_external_job(project, workspace, title=title)
    job.add_input("particle", "particles")
    job.connect("particles", source[0], source[1])
    for name in names:
        job.add_output("particle", name, passthrough="particles")
    with job.run():
        for name, selection in zip(names, selections, strict=True):
            job.save_output(name, job.alloc_output(name, np.asarray(selection, dtype=np.uint64)))
    return job
