"""``cryosieve-csrefine``: the original's command, refining each particle set with CryoSPARC."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cryosieve.cli._common import progress_factory, run_command, setup_logging
from cryosieve.cli.refine import FLAGS, add_refine_arguments, report, settings_and_refiner


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cryosieve-csrefine",
        description="Automatic 3D refinement of each particle set by CryoSPARC (import or pass through the "
                    "particles, ab-initio or --ref, homogeneous or non-uniform refinement, optional local "
                    "refinement); the summary gives particles, resolution and B-factor of each. Same as "
                    "cryosieve-refine --backend cryosparc.")
    add_refine_arguments(parser, cryosparc_command="cryosieve_csrefine")
    return parser


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(not args.quiet)
    settings, refiner = settings_and_refiner(args)

    from cryosieve.refine import refine_files

    outcome = refine_files(settings, refiner, dry_run=args.dry_run, progress=progress_factory(not args.quiet))
    return report(outcome, args, "cryosieve-csrefine: summary written to")


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("cryosieve-csrefine", _main, argv, FLAGS)


if __name__ == "__main__":
    sys.exit(main())
