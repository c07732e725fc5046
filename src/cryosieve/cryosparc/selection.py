"""A selection given back to a running CryoSPARC: an External job whose outputs ``kept`` and
``sieved`` pass through the source job's particles (``uid`` kept), so that users carry on in
CryoSPARC without importing anything (``--cryosparc_project``, ``--cryosparc_workspace``).

:func:`prepare_return` checks everything (the input is a ``.cs`` file, the server answers, the
project, workspace and source job exist and hold every particle) before the sieve computes;
:func:`give_back` makes the job once the files are written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cryosieve.cryosparc.connection import Connection, connect
from cryosieve.cryosparc.session import check_job, check_target, subset_job
from cryosieve.cryosparc.source import source_job_of
from cryosieve.errors import CryoSieveInputError, setting
from cryosieve.io.particle_files import format_of

log = logging.getLogger("cryosieve")

OUTPUTS = ("kept", "sieved")


@dataclass(frozen=True)
class ReturnTarget:
    """Where a selection goes: ``project`` / ``workspace`` of the CryoSPARC at ``connection``; ``source_job``:
    the job (``J42[.output]``) the particles come from (read from the ``.cs`` path when ``None``);
    ``client_class``: ``cryosparc.tools.CryoSPARC`` (``None``) or a class with its interface."""

    connection: Connection
    project: str
    workspace: str
    source_job: str | None = None
    client_class: Any = None


@dataclass(frozen=True)
class PreparedReturn:
    """A checked target: the session and the source (job id, output)."""

    target: ReturnTarget
    client: Any
    source: tuple[str, str]


def prepare_return(target: ReturnTarget, particles_path: str | Path, uids: np.ndarray) -> PreparedReturn:
    """Check that the particles of ``particles_path`` (``uids``) can go back to CryoSPARC; refused in one line
    otherwise (nothing is made)."""
    path = Path(particles_path)
    if format_of(path) != "cs":
        raise CryoSieveInputError(f"{setting('cryosparc_project')}: a selection goes back to CryoSPARC for .cs "
                                  f"particles only, not {path}")
    source = source_job_of(path, target.source_job)
    client = connect(target.connection, target.client_class)
    check_target(client, target.project, target.workspace, None, target.connection.scrub)
    check_job(client, target.project, source[0], target.connection.scrub)
    prepared = PreparedReturn(target, client, source)
    _check_uids(prepared, uids)
    return prepared


def _check_uids(prepared: PreparedReturn, uids: np.ndarray) -> None:
    target, (job, output) = prepared.target, prepared.source
    try:
        known = np.asarray(prepared.client.find_job(target.project, job).load_output(output, slots=[])["uid"])
    except Exception as error:
        raise CryoSieveInputError(f"CryoSPARC job {target.project} {job}: no particles output {output!r} "
                                  f"({type(error).__name__})") from None
    missing = np.setdiff1d(np.asarray(uids, dtype=np.uint64), known.astype(np.uint64))
    if missing.size:
        raise CryoSieveInputError(f"{missing.size} of the {len(uids)} particles are not among the output {output!r} "
                                  f"of CryoSPARC job {target.project} {job}; give the job they came from with "
                                  f"{setting('source_job')}")


def give_back(prepared: PreparedReturn, kept: np.ndarray, sieved: np.ndarray, title: str) -> str:
    """Make the External job with outputs ``kept`` and ``sieved`` (``uid`` arrays); returns its id."""
    target = prepared.target
    job = subset_job(prepared.client, target.project, target.workspace, prepared.source, [kept, sieved],
                     list(OUTPUTS), title)
    log.info("selection given back to CryoSPARC: External job %s %s (outputs kept: %d, sieved: %d particles)",
             target.project, job.uid, len(kept), len(sieved))
    return str(job.uid)
