"""``cryosieve-refine``: resolution and B-factor of particle sets with their poses re-estimated."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from cryosieve.cli._common import add_device_argument, choose_device, progress_factory, run_command, setup_logging

#: The library's setting fields -> the flags of cryosieve-refine and cryosieve-rhbfactor.
FLAGS = {
    "inputs": "--i", "output": "--o", "directory": "--directory", "symmetry": "--sym", "reference": "--ref",
    "ini_high": "--ini_high", "repeat": "--repeat", "resplit": "--resplit", "workers": "--workers", "mask": "--mask",
    "particle_diameter": "--particle_diameter", "local": "--local", "relion_refine": "--relion_refine",
    "threads": "--j", "halves": "--halves", "voltage": "--voltage", "device": "--device",
}


def add_refine_arguments(parser: argparse.ArgumentParser) -> None:
    """The options cryosieve-refine and cryosieve-rhbfactor share (the original cryosieve-csrefine's, for RELION)."""
    parser.add_argument("--i", nargs="+", required=True,
                        help="input STAR file(s), wildcards (e.g. 'output/_iter?.star') or .txt files listing STAR "
                             "files.")
    parser.add_argument("--o", required=True, help="output summary CSV; the jobs' folders go beside it (OUT_jobs/).")
    parser.add_argument("--directory", default="", help="directory of particles, empty (current directory) by default.")
    parser.add_argument("--sym", default="C1", help="molecular symmetry, C1 by default.")
    parser.add_argument("--ref", default=None,
                        help="initial reference map; by default one is reconstructed from each input with its given "
                             "poses (low-passed to --ini_high by the refinement).")
    parser.add_argument("--ini_high", type=float, default=30.0, help="initial resolution (Å), 30 by default.")
    parser.add_argument("--repeat", type=int, default=1,
                        help="number of trials (different random seeds), 1 by default.")
    parser.add_argument("--resplit", action="store_true",
                        help="split the particles into new random half-sets (seeded) instead of keeping "
                             "rlnRandomSubset.")
    parser.add_argument("--workers", type=int, default=1, help="jobs run at once, 1 by default.")
    parser.add_argument("--mask", default=None,
                        help="mask for the post-processing; by default one is made around each refined map.")
    parser.add_argument("--particle_diameter", type=float, default=None,
                        help="particle diameter (Å) for RELION; 90 %% of the box by default.")
    parser.add_argument("--local", action="store_true",
                        help="local searches around the given poses only (RELION's local refinement).")
    parser.add_argument("--backend", choices=("relion", "fixed"), default="relion",
                        help="relion: a gold-standard 3D auto-refinement with relion_refine_mpi (default); fixed: no "
                             "re-refinement, the given poses' built-in reconstruction and post-processing (fast, "
                             "optimistic).")
    parser.add_argument("--relion_refine", default="mpirun -n 3 relion_refine_mpi",
                        help="the relion_refine command line, at least 3 MPI ranks (default: 'mpirun -n 3 "
                             "relion_refine_mpi'; as root add --allow-run-as-root to mpirun).")
    parser.add_argument("--j", type=int, default=1, help="threads per RELION rank (relion_refine --j), 1 by default.")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the planned jobs and their command lines, run nothing.")
    add_device_argument(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar or log lines.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cryosieve-refine",
        description="Refine each particle set (poses re-estimated by RELION, or the given poses with --backend "
                    "fixed) and report resolution and B-factor, as the original cryosieve-csrefine does with "
                    "CryoSPARC.")
    add_refine_arguments(parser)
    return parser


def settings_and_refiner(args: argparse.Namespace) -> tuple[Any, Any]:
    """The library's settings and refiner from the parsed arguments."""
    from cryosieve.backends.builtin import FixedPoseRefiner
    from cryosieve.backends.relion import RelionRefiner
    from cryosieve.refine import RefineSettings

    device = choose_device(args.device)
    refiner = FixedPoseRefiner(device) if args.backend == "fixed" else \
        RelionRefiner.from_command_line(args.relion_refine, args.j, device)
    settings = RefineSettings(inputs=tuple(args.i), output=args.o, directory=args.directory or None, symmetry=args.sym,
                              reference=args.ref, ini_high=args.ini_high, repeat=args.repeat, resplit=args.resplit,
                              workers=args.workers, mask=args.mask, particle_diameter=args.particle_diameter,
                              local=args.local)
    return settings, refiner


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(not args.quiet)
    settings, refiner = settings_and_refiner(args)

    from cryosieve.refine import refine_files

    outcome = refine_files(settings, refiner, dry_run=args.dry_run, progress=progress_factory(not args.quiet))
    return report(outcome, args, "cryosieve-refine: summary written to")


def report(outcome: Any, args: argparse.Namespace, written: str) -> int:
    """Print a dry run's plan, or where the summary went; the exit status."""
    print("\n".join(outcome.plan) if args.dry_run else f"{written} {args.o}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("cryosieve-refine", _main, argv, FLAGS)


if __name__ == "__main__":
    sys.exit(main())
