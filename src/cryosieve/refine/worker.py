"""``python -m cryosieve.refine.worker FOLDER``: run one refinement job (see :mod:`cryosieve.refine.jobs`)."""

from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path

from cryosieve.refine.jobs import work


def main(argv: list[str]) -> int:
    """``FOLDER [REPORT_FD]``: the job's folder, and the pipe its error goes to (see :func:`work`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the command that started this job decides when to stop
    try:
        work(Path(argv[0]), int(argv[1]) if len(argv) > 1 else None)
    except BaseException as error:  # reported to the command; one line in this job's log where it can be written
        with contextlib.suppress(OSError):
            print(f"refinement job failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
