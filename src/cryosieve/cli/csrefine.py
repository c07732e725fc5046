"""``cryosieve-csrefine``: the original's command, refining each particle set with CryoSPARC."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cryosieve.cli._common import Parser, run_command
from cryosieve.cli.refine import FLAGS, add_refine_arguments, run_refine


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="cryosieve-csrefine",
        description="Automatic 3D refinement of each particle set by CryoSPARC (import or pass through the "
                    "particles, ab-initio or --ref, homogeneous or non-uniform refinement, optional local "
                    "refinement); the summary gives particles, resolution and B-factor of each. Same as "
                    "cryosieve-refine --backend cryosparc.")
    add_refine_arguments(parser, cryosparc_command="cryosieve_csrefine")
    return parser


def _main(argv: Sequence[str] | None) -> int:
    return run_refine(build_parser(), argv, "cryosieve-csrefine")


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("cryosieve-csrefine", _main, argv, FLAGS)


if __name__ == "__main__":
    sys.exit(main())
