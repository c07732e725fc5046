"""A selection given back to a running CryoSPARC: an External job whose outputs ``kept`` and
``sieved`` are the source job's own rows of those particles (``uid`` and every field kept), so that users
carry on in CryoSPARC without importing anything (``--cryosparc_project``, ``--cryosparc_workspace``).

:func:`prepare_return` checks everything (the input is a ``.cs`` file, the server answers, the
project, workspace and source job exist and hold every particle, read once from one slot of the source
output) before the sieve computes; :func:`give_back` makes the job once the files are written
(:meth:`cryosieve.cryosparc.session.Session.subset_job`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cryosieve.cryosparc.connection import Connection
from cryosieve.cryosparc.session import Session, connect
from cryosieve.cryosparc.source import source_job_of
from cryosieve.errors import CryoSieveInputError, setting
from cryosieve.io.particle_files import format_of

log = logging.getLogger("cryosieve")

OUTPUTS = ("kept", "sieved")


@dataclass(frozen=True)
class ReturnTarget:
    """Where a selection goes: ``project`` / ``workspace`` of the CryoSPARC at ``connection``; ``source_job``:
    the job (``J42[.output]``) the particles come from (read from the ``.cs`` path when ``None``);
    ``connector``: how to connect (:func:`cryosieve.cryosparc.session.connect` when ``None``)."""

    connection: Connection
    project: str
    workspace: str
    source_job: str | None = None
    connector: Callable[[Connection], Session] | None = None


@dataclass(frozen=True)
class PreparedReturn:
    """A checked target: the session and the source (job id, output)."""

    target: ReturnTarget
    session: Any
    source: tuple[str, str]


def prepare_return(target: ReturnTarget, particles_path: str | Path, uids: np.ndarray) -> PreparedReturn:
    """Check that the particles of ``particles_path`` (``uids``) can go back to CryoSPARC; refused in one line
    otherwise (nothing is made)."""
    path = Path(particles_path)
    if format_of(path) != "cs":
        raise CryoSieveInputError(f"{setting('cryosparc_project')}: a selection goes back to CryoSPARC for .cs "
                                  f"particles only, not {path}")
    source = source_job_of(path, target.source_job)
    session = (target.connector or connect)(target.connection)
    session.check_target(target.project, target.workspace, None)
    known = session.particle_uids(target.project, source[0], source[1])
    missing = np.setdiff1d(np.asarray(uids, dtype=np.uint64), known)
    if missing.size:
        raise CryoSieveInputError(f"{missing.size} of the {len(uids)} particles are not among the output {source[1]!r} "
                                  f"of CryoSPARC job {target.project} {source[0]}; give the job they came from with "
                                  f"{setting('source_job')}")
    return PreparedReturn(target, session, source)


def give_back(prepared: PreparedReturn, kept: np.ndarray, sieved: np.ndarray, title: str) -> str:
    """Make the External job with outputs ``kept`` and ``sieved`` (``uid`` arrays); returns its id."""
    target = prepared.target
    uid = prepared.session.subset_job(target.project, target.workspace, prepared.source,
                                      [(OUTPUTS[0], kept), (OUTPUTS[1], sieved)], title)
    log.info("selection given back to CryoSPARC: External job %s %s (outputs kept: %d, sieved: %d particles)",
             target.project, uid, len(kept), len(sieved))
    return str(uid)
