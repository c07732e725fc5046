"""``python -m cryosieve.refine.worker FOLDER``: run one refinement job (see :mod:`cryosieve.refine.jobs`)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from cryosieve.refine.jobs import work


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the command that started this job decides when to stop
    try:
        work(Path(argv[0]))
    except BaseException as error:  # recorded in error.pkl for the command; one line in this job's log
        print(f"refinement job failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
