"""``cryosieve-csrhbfactor``: the original's command, the Rosenthal-Henderson B-factor with CryoSPARC."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cryosieve.cli._common import Parser, run_command
from cryosieve.cli.refine import FLAGS, add_refine_arguments
from cryosieve.cli.rhbfactor import add_rh_arguments, run_rhbfactor


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="cryosieve-csrhbfactor",
        description="Refine each particle set and nested random halves of it (--halves times) with CryoSPARC, and "
                    "fit the Rosenthal-Henderson B-factor. Writes OUT.csv, OUT_raw.csv and OUT_rh.png. Same as "
                    "cryosieve-rhbfactor --backend cryosparc.")
    add_refine_arguments(parser, cryosparc_command="cryosieve_csrhbfactor")
    add_rh_arguments(parser)
    return parser


def _main(argv: Sequence[str] | None) -> int:
    return run_rhbfactor(build_parser(), argv, "cryosieve-csrhbfactor")


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("cryosieve-csrhbfactor", _main, argv, FLAGS)


if __name__ == "__main__":
    sys.exit(main())
