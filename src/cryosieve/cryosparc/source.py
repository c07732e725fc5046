"""Which CryoSPARC job the particles of a ``.cs`` file come from.

A ``.cs`` file that CryoSPARC wrote lies in its job's folder and is named after the job and the
output: ``.../J42/J42_particles.cs``, ``.../J42/J42_passthrough_particles.cs``,
``.../J42/J42_008_particles.cs`` (job J42, output ``particles``). Anything else (a subset this
package wrote) needs the job named: ``J42`` or ``J42.OUTPUT``.
"""

from __future__ import annotations

import re
from pathlib import Path

from cryosieve.errors import CryoSieveInputError, setting

_JOB_ID = re.compile(r"^J\d+$")
#: A .cs file in a CryoSPARC job folder: ``.../J42/J42_[NNN_][passthrough_]OUTPUT.cs``.
_JOB_FILE = re.compile(r"^(J\d+)_(?:\d+_)?(?:passthrough_)?(.+)\.cs$")


def parse_source_job(text: str) -> tuple[str, str]:
    """``J42`` or ``J42.output`` -> (job id, output name; ``particles`` by default)."""
    job, _, output = text.partition(".")
    if not _JOB_ID.match(job) or (_ and not output):
        raise CryoSieveInputError(f"{setting('source_job')} {text}: not a CryoSPARC job id (J42, or J42.particles)")
    return job, output or "particles"


def source_of_path(path: Path) -> tuple[str, str] | None:
    """The job and output a ``.cs`` file of a CryoSPARC job folder belongs to (``.../J42/J42_particles.cs``),
    or ``None`` when its name does not tell."""
    match = _JOB_FILE.match(path.name)
    if match is None or path.resolve().parent.name != match.group(1):
        return None
    return match.group(1), match.group(2)


def source_job_of(path: Path, given: str | None) -> tuple[str, str]:
    """The CryoSPARC job and output the particles of the ``.cs`` file ``path`` come from: ``given``
    (``J42[.output]``), else read from the path; refused (one line) when neither tells."""
    if given:
        return parse_source_job(given)
    found = source_of_path(path)
    if found is None:
        raise CryoSieveInputError(f"{path}: not in a CryoSPARC job folder, so the job its particles come from is "
                                  f"unknown; give it with {setting('source_job')} (e.g. J42 or J42.particles)")
    return found
