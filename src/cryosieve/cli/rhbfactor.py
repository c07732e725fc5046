"""``cryosieve-rhbfactor``: the Rosenthal-Henderson B-factor of particle sets."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cryosieve.cli._common import Parser, progress_factory, run_command, setup_logging
from cryosieve.cli.refine import FLAGS, add_refine_arguments, report, settings_and_refiner


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="cryosieve-rhbfactor",
        description="Refine each particle set and nested random halves of it (--halves times), and fit the "
                    "Rosenthal-Henderson B-factor to resolution against particle count, as the original "
                    "cryosieve-csrhbfactor does with CryoSPARC. Writes OUT.csv, OUT_raw.csv and OUT_rh.png.")
    add_refine_arguments(parser)
    add_rh_arguments(parser)
    return parser


def add_rh_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the Rosenthal-Henderson commands."""
    parser.add_argument("--voltage", type=int, default=300,
                        help="acceleration voltage (kV), 300 by default; only 200 and 300 are supported.")
    parser.add_argument("--halves", type=int, default=4, help="number of halvings, 4 by default.")


def run_rhbfactor(parser: argparse.ArgumentParser, argv: Sequence[str] | None, program: str) -> int:
    """Parse, and fit the Rosenthal-Henderson B-factor of each input (``cryosieve-rhbfactor``,
    ``cryosieve-csrhbfactor``)."""
    args = parser.parse_args(argv)
    setup_logging(not args.quiet)
    settings, refiner = settings_and_refiner(args)

    from cryosieve.refine import rhbfactor_files

    outcome = rhbfactor_files(settings, refiner, voltage=args.voltage, halves=args.halves, dry_run=args.dry_run,
                              progress=progress_factory(not args.quiet, unit="job"))
    return report(outcome, args, f"{program}: written to")


def _main(argv: Sequence[str] | None) -> int:
    return run_rhbfactor(build_parser(), argv, "cryosieve-rhbfactor")


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("cryosieve-rhbfactor", _main, argv, FLAGS)


if __name__ == "__main__":
    sys.exit(main())
