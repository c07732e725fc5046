"""``cryosieve``: the iterative pipeline (drop-in for the published CryoSieve's ``cryosieve``)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from cryosieve.cli._common import (
    Parser,
    add_device_argument,
    add_orientation_argument,
    add_retention_argument,
    check_interrupt,
    choose_device,
    command_line,
    progress_factory,
    return_target,
    run_command,
    setup_logging,
)
from cryosieve.cli.refine import add_cryosparc_arguments, add_search_arguments, cryosparc_refiner, search_settings
from cryosieve.errors import CryoSieveInputError

log = logging.getLogger("cryosieve")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="cryosieve",
        description="CryoSieve: reconstruct the half maps of a refined particle stack, post-process them, keep the "
                    "lowest-scoring fraction of each half-set at a high-pass cut-off going from --frequency_start to "
                    "--frequency_end, and repeat --num_iters times.",
    )
    parser.add_argument("--i", required=True,
                        help="input particles: a RELION STAR file, or a CryoSPARC .cs file (then every set is written "
                             "as .cs, with every field and uid of its rows).")
    parser.add_argument("--passthrough", nargs="+", default=[],
                        help="for a .cs input: further .cs files of the same particles, whose fields the main file "
                             "lacks are taken by uid.")
    parser.add_argument("--o", required=True, help="output path prefix (e.g. output/ gives output/_iter0.star ...).")
    parser.add_argument("--angpix", type=float, default=None,
                        help="pixelsize in Angstrom (needed for RELION 3.0 STAR files; 3.1+ files carry it).")
    parser.add_argument("--mask", required=True, help="mask file path.")
    parser.add_argument("--reconstruct_software", default=None,
                        help="command line of the reconstruction program, e.g. relion_reconstruct or "
                             "\"mpirun -n 5 relion_reconstruct_mpi --j 4\" (default: the built-in reconstruction).")
    parser.add_argument("--postprocess_software", default=None,
                        help="command line of the post-processing program, e.g. relion_postprocess (default: the "
                             "built-in post-processing).")
    parser.add_argument("--num_procs", type=int, default=None,
                        help="run the reconstruction command under mpirun -n NUM_PROCS (as the published "
                             "program); default: run it as given.")
    parser.add_argument("--directory", default="", help="directory of particles, empty (current directory) by default.")
    parser.add_argument("--sym", default="C1", help="molecular symmetry, C1 by default.")
    parser.add_argument("--num_iters", type=int, default=10, help="number of iterations for applying CryoSieve.")
    parser.add_argument("--frequency_start", type=float, default=50.0,
                        help="starting threshold frequency, in Angstrom.")
    parser.add_argument("--frequency_end", type=float, default=3.0, help="ending threshold frequency, in Angstrom.")
    add_retention_argument(parser, "fraction of retained particles in each iteration, 0.8 by default;")
    parser.add_argument("--balance", action="store_true",
                        help="make remaining particles in different subsets in same size.")
    parser.add_argument("--num_gpus", type=int, default=1,
                        help="number of processes (one per GPU) to score with, 1 by default.")
    add_device_argument(parser)
    parser.add_argument("--continue", dest="resume", action="store_true",
                        help="resume an interrupted run with the same arguments (PREFIX_state.json).")
    parser.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                        help="write the plots and the HTML report after every round (default); --no-report "
                             "writes only the summary table PREFIX_summary.csv.")
    parser.add_argument("--batch_size", type=int, default=256, help="particles per scoring batch, 256 by default.")
    parser.add_argument("--projector", choices=("fourier", "realspace"), default="fourier",
                        help="sieving projector: fourier (default) or realspace (the published one).")
    parser.add_argument("--reference_weighting", choices=("auto", "fsc", "none"), default="auto",
                        help="weighting of the half maps for scoring (see cryosieve-core).")
    parser.add_argument("--validate", choices=("none", "builtin", "fixed", "relion", "cryosparc"), default="none",
                        help="also refine every set with its poses re-estimated (builtin: the built-in gold-standard "
                             "local refinement; relion: relion_refine_mpi; "
                             "cryosparc: CryoSPARC's refinement, see --cryosparc_*; fixed: the given poses, built-in) "
                             "and report that resolution beside the fixed-pose one (default none).")
    parser.add_argument("--patience", type=int, default=None,
                        help="stop once the resolution (re-estimated with --validate, else with the given poses) has "
                             "not improved for this many rounds, --num_iters being the most; by default every round "
                             "runs. The best set is marked and copied to PREFIX_best.star either way.")
    parser.add_argument("--realign", type=int, nargs="?", const=2, default=0,
                        help="before each sieve, re-estimate the poses of the set by the built-in gold-standard local "
                             "refinement (this many iterations, 2 if given alone): the sieve scores the particles "
                             "against their corrected poses, and the next set carries them (default 0: the given "
                             "poses).")
    add_search_arguments(parser.add_argument_group("local searches of --realign and --validate builtin"))
    add_orientation_argument(parser)
    parser.add_argument("--resplit", action="store_true",
                        help="split the particles into two new random half-sets (seeded) before the first round, "
                             "written as rlnRandomSubset in PREFIX_iter0.star: for particles without half-sets.")
    parser.add_argument("--validate_rh", action="store_true",
                        help="with --validate, also the Rosenthal-Henderson B-factor of every set (4 halvings).")
    parser.add_argument("--relion_refine", default="mpirun -n 3 relion_refine_mpi",
                        help="the relion_refine command line of --validate relion (at least 3 MPI ranks).")
    parser.add_argument("--j", type=int, default=1, help="threads per RELION rank of --validate relion.")
    add_cryosparc_arguments(parser, required=False, prefix="cryosparc_")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log lines.")
    return parser


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(not args.quiet)
    device = choose_device(args.device)

    from cryosieve.backends.relion import RelionPostProcessor, RelionReconstructor
    from cryosieve.pipeline import PipelineSettings, run_pipeline
    from cryosieve.settings import SieveSettings

    if args.num_gpus < 1:
        raise CryoSieveInputError(f"--num_gpus {args.num_gpus}: must be at least 1")
    if args.num_procs is not None and args.reconstruct_software is None:
        raise CryoSieveInputError("--num_procs: give --reconstruct_software to run under mpirun")
    reconstructor = None if args.reconstruct_software is None else \
        RelionReconstructor.from_command_line(args.reconstruct_software, args.num_procs)
    postprocessor = None if args.postprocess_software is None else \
        RelionPostProcessor.from_command_line(args.postprocess_software)
    search = search_settings(args)
    validator: Any = None
    if args.validate == "fixed":
        from cryosieve.backends.builtin import FixedPoseRefiner

        validator = FixedPoseRefiner(device)
    elif args.validate == "builtin":
        from cryosieve.backends.builtin import BuiltinRefiner

        validator = BuiltinRefiner(search_settings(args, device=device))
        validator.check()
    elif args.validate == "relion":
        from cryosieve.backends.relion import RelionRefiner

        validator = RelionRefiner.from_command_line(args.relion_refine, args.j, device)
    elif args.validate == "cryosparc":
        validator = cryosparc_refiner(args, device, prefix="cryosparc_")
    sieve = SieveSettings(retention_ratio=args.retention_ratio, highpass_angstrom=args.frequency_start,
                          projector=args.projector, reference_weighting=args.reference_weighting,
                          batch_size=args.batch_size, device=device, balance=args.balance,
                          keep_orientations=args.keep_orientations)
    settings = PipelineSettings(
        input_star=args.i, output_prefix=args.o, mask=args.mask, sieve=sieve, angpix=args.angpix,
        directory=args.directory or None, symmetry=args.sym, num_iters=args.num_iters,
        frequency_start=args.frequency_start, frequency_end=args.frequency_end, reconstructor=reconstructor,
        postprocessor=postprocessor, report=args.report, validator=validator, validate_rh=args.validate_rh,
        passthrough=tuple(args.passthrough), return_to=return_target(args), patience=args.patience,
        resplit=args.resplit, command_line=command_line("cryosieve", argv), realign=args.realign,
        search=search,
    )
    result = run_pipeline(settings, resume=args.resume, progress=progress_factory(not args.quiet, leave=False),
                          checkpoint=check_interrupt)
    if args.report:
        print(f"cryosieve: report written to {result.report.html} (table: {result.report.summary_csv})")
    else:
        print(f"cryosieve: summary written to {result.report.summary_csv}")
    return 0


#: The library's setting fields -> this command's flags.
FLAGS = {
    "input_star": "--i", "output_prefix": "--o", "angpix": "--angpix", "mask": "--mask", "directory": "--directory",
    "symmetry": "--sym", "num_iters": "--num_iters", "frequency_start": "--frequency_start",
    "frequency_end": "--frequency_end", "retention_ratio": "--retention_ratio", "balance": "--balance",
    "reconstructor": "--reconstruct_software", "postprocessor": "--postprocess_software", "num_procs": "--num_procs",
    "device": "--device", "batch_size": "--batch_size", "projector": "--projector",
    "reference_weighting": "--reference_weighting", "resume": "--continue", "highpass_angstrom": "--frequency_start",
    "validator": "--validate", "validate_rh": "--validate_rh", "passthrough": "--passthrough",
    "relion_refine": "--relion_refine", "threads": "--j", "cryosparc_project": "--cryosparc_project",
    "source_job": "--cryosparc_source_job", "patience": "--patience", "resplit": "--resplit",
    "keep_orientations": "--keep_orientations", "realign": "--realign", "search_range": "--search_range",
    "angular_step": "--angular_step", "shift_range": "--shift_range",
}


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("cryosieve", _main, argv, FLAGS, build_parser)


if __name__ == "__main__":
    sys.exit(main())
