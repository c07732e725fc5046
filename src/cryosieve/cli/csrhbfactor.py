"""``cryosieve-csrhbfactor``: the original's command, the Rosenthal-Henderson B-factor with CryoSPARC."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cryosieve.cli._common import progress_factory, run_command, setup_logging
from cryosieve.cli.refine import FLAGS, add_refine_arguments, report, settings_and_refiner
from cryosieve.cli.rhbfactor import add_rh_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cryosieve-csrhbfactor",
        description="Refine each particle set and nested random halves of it (--halves times) with CryoSPARC, and "
                    "fit the Rosenthal-Henderson B-factor. Writes OUT.csv, OUT_raw.csv and OUT_rh.png. Same as "
                    "cryosieve-rhbfactor --backend cryosparc.")
    add_refine_arguments(parser, cryosparc_command="cryosieve_csrhbfactor")
    add_rh_arguments(parser)
    return parser


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(not args.quiet)
    settings, refiner = settings_and_refiner(args)

    from cryosieve.refine import rhbfactor_files

    outcome = rhbfactor_files(settings, refiner, voltage=args.voltage, halves=args.halves, dry_run=args.dry_run,
                              progress=progress_factory(not args.quiet))
    return report(outcome, args, "cryosieve-csrhbfactor: written to")


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("cryosieve-csrhbfactor", _main, argv, FLAGS)


if __name__ == "__main__":
    sys.exit(main())
