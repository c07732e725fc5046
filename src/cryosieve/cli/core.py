"""``cryosieve-core``: one sieve of a refined particle stack (drop-in for the original)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from cryosieve.cli._common import (
    Parser,
    add_device_argument,
    add_orientation_argument,
    add_retention_argument,
    add_return_arguments,
    choose_device,
    progress_factory,
    return_target,
    run_command,
    setup_logging,
)
from cryosieve.errors import CryoSieveInputError

log = logging.getLogger("cryosieve")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="cryosieve-core",
        description="CryoSieve core: score each particle against the masked half map of its half-set "
                    "and keep the lowest-scoring fraction.",
    )
    parser.add_argument("--i", required=True, help="input particles: a RELION STAR file, or a CryoSPARC .cs file.")
    parser.add_argument("--passthrough", nargs="+", default=[],
                        help="for a .cs input: further .cs files of the same particles (e.g. the _passthrough "
                             "file), whose fields the main file lacks are taken by uid.")
    parser.add_argument("--o", required=True,
                        help="output particle file (kept particles), .star or .cs (a format other than the "
                             "input's converts); OUT_sieved.EXT and OUT_scores.csv are written beside it.")
    parser.add_argument("--directory", default="", help="directory of particles, empty (current directory) by default.")
    parser.add_argument("--angpix", type=float, default=None,
                        help="pixelsize in Angstrom (needed for RELION 3.0 STAR files; 3.1+ files carry it).")
    parser.add_argument("--volume", action="append", required=True,
                        help="list of volume file paths, one per half-set (rlnRandomSubset 1, 2, ...).")
    parser.add_argument("--mask", default=None, help="mask file path (none: no masking).")
    add_retention_argument(parser, "fraction of retained particles, 0.8 by default;")
    parser.add_argument("--frequency", type=float, required=True,
                        help="cut-off highpass frequency, in Angstrom (frequencies below 1/F are ignored).")
    parser.add_argument("--balance", action="store_true",
                        help="make retained particles in different subsets in same size.")
    parser.add_argument("--num_gpus", type=int, default=1,
                        help="number of processes (one per GPU; CPU processes with --device cpu) to score with, 1 by "
                             "default: one job of that many processes on this machine, the same answer as one.")
    add_device_argument(parser)
    parser.add_argument("--batch_size", type=int, default=256, help="particles per batch, 256 by default.")
    parser.add_argument("--projector", choices=("fourier", "realspace"), default="fourier",
                        help="fourier: central slices of the map's transform (fast, default); realspace: the "
                             "published real-space projector, to reproduce earlier selections.")
    parser.add_argument("--reference_weighting", choices=("auto", "fsc", "none"), default="auto",
                        help="weight each half map by sqrt(2 FSC/(1+FSC)) of the two half maps (fsc), or not "
                             "(none, the published behaviour); auto: fsc with two half maps and the fourier "
                             "projector, else none.")
    add_orientation_argument(parser)
    add_return_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar or log lines.")
    return parser


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(not args.quiet)
    started = time.perf_counter()
    device = choose_device(args.device)

    from cryosieve.settings import SieveSettings
    from cryosieve.sieve import retention_path, sieve_star_file

    if args.num_gpus < 1:
        raise CryoSieveInputError(f"--num_gpus {args.num_gpus}: must be at least 1")
    settings = SieveSettings(retention_ratio=args.retention_ratio, highpass_angstrom=args.frequency,
                             projector=args.projector, reference_weighting=args.reference_weighting,
                             batch_size=args.batch_size, device=device, balance=args.balance,
                             keep_orientations=args.keep_orientations)
    result, paths = sieve_star_file(args.i, args.o, args.volume, settings, directory=args.directory or None,
                                    mask_path=args.mask, angpix=args.angpix, passthrough=tuple(args.passthrough),
                                    progress=progress_factory(not args.quiet), return_to=return_target(args))
    written = [*paths, *([retention_path(args.o)] if result.retention is not None else [])]
    log.info("wrote %s in %.2f s", ", ".join(str(path) for path in written), time.perf_counter() - started)
    return 0


#: The library's setting fields -> this command's flags.
FLAGS = {
    "input_star": "--i", "output": "--o", "directory": "--directory", "angpix": "--angpix", "volumes": "--volume",
    "mask": "--mask", "retention_ratio": "--retention_ratio", "highpass_angstrom": "--frequency",
    "balance": "--balance", "device": "--device", "batch_size": "--batch_size",
    "projector": "--projector", "reference_weighting": "--reference_weighting", "passthrough": "--passthrough",
    "cryosparc_project": "--cryosparc_project", "source_job": "--cryosparc_source_job",
    "keep_orientations": "--keep_orientations",
}


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("cryosieve-core", _main, argv, FLAGS, build_parser)


if __name__ == "__main__":
    sys.exit(main())
