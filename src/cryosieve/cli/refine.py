"""``cryosieve-refine``: resolution and B-factor of particle sets with their poses re-estimated."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cryosieve.cli._common import (
    Parser,
    add_device_argument,
    choose_device,
    progress_factory,
    run_command,
    setup_logging,
)

if TYPE_CHECKING:
    from cryosieve.align.settings import SearchSettings

#: The library's setting fields -> the flags of cryosieve-refine and cryosieve-rhbfactor.
FLAGS = {
    "inputs": "--i", "output": "--o", "directory": "--directory", "symmetry": "--sym", "reference": "--ref",
    "ini_high": "--ini_high", "repeat": "--repeat", "resplit": "--resplit", "workers": "--workers", "mask": "--mask",
    "particle_diameter": "--particle_diameter", "local": "--local", "relion_refine": "--relion_refine",
    "threads": "--j", "halves": "--halves", "voltage": "--voltage", "device": "--device",
    "source_job": "--source_job", "project": "--project", "workspace": "--workspace", "lane": "--lane",
    "user": "--user", "min_angular_step": "--min_angular_step", "search_range": "--search_range",
    "angular_step": "--angular_step", "shift_range": "--shift_range", "iterations": "--iterations",
    "batch_size": "--batch_size",
}


def add_refine_arguments(parser: argparse.ArgumentParser, cryosparc_command: str | None = None) -> None:
    """The options cryosieve-refine and cryosieve-rhbfactor share (the original cryosieve-csrefine's), and those of
    the original's CryoSPARC commands when ``cryosparc_command`` names one (its summary's default name)."""
    parser.add_argument("--i", nargs="+", required=True,
                        help="input STAR or .cs file(s), wildcards (e.g. 'output/_iter?.star') or .txt files listing "
                             "them.")
    if cryosparc_command:
        parser.add_argument("--o", default=f"{cryosparc_command}.csv",
                            help=f"output summary CSV ({cryosparc_command}.csv by default); the jobs' folders go "
                                 "beside it (OUT_jobs/).")
    else:
        parser.add_argument("--o", required=True,
                            help="output summary CSV; the jobs' folders go beside it (OUT_jobs/).")
    parser.add_argument("--directory", default="", help="directory of particles, empty (current directory) by default.")
    parser.add_argument("--sym", default="C1", help="molecular symmetry, C1 by default.")
    parser.add_argument("--ref", default=None,
                        help="initial reference map; by default RELION starts from a map reconstructed from each input "
                             "with its given poses (low-passed to --ini_high), CryoSPARC from an ab-initio job.")
    parser.add_argument("--ini_high", type=float, default=None,
                        help="initial resolution (Å); by default RELION's --ini_high is 30 and CryoSPARC's refinement "
                             "gets no refine_res_init (its own default), as the original; the built-in refinement "
                             "always compares up to at least this resolution (30 by default).")
    parser.add_argument("--repeat", type=int, default=1,
                        help="number of trials (different random seeds), 1 by default.")
    parser.add_argument("--resplit", action="store_true",
                        help="split the particles into new random half-sets (seeded) instead of keeping "
                             "rlnRandomSubset.")
    parser.add_argument("--workers", type=int, default=None if cryosparc_command else 1,
                        help="jobs run at once, " + ("unlimited by default." if cryosparc_command else "1 by default."))
    parser.add_argument("--mask", default=None,
                        help="mask for the post-processing; by default CryoSPARC's FSC mask, or one made around each "
                             "map RELION refined.")
    if not cryosparc_command:
        parser.add_argument("--particle_diameter", type=float, default=None,
                            help="particle diameter (Å) for RELION; 90 %% of the box by default.")
    parser.add_argument("--local", action="store_true",
                        help="RELION: local searches around the given poses only; CryoSPARC: a local refinement after "
                             "the homogeneous / non-uniform one.")
    if not cryosparc_command:
        parser.add_argument("--backend", choices=("relion", "builtin", "fixed", "cryosparc"), default="relion",
                            help="relion: a gold-standard 3D auto-refinement with relion_refine_mpi (default); "
                                 "builtin: a built-in gold-standard local refinement around the given poses (minutes; "
                                 "see --search_range, --angular_step, --shift_range, --iterations); "
                                 "cryosparc: CryoSPARC's refinement jobs (see --user, --project, --workspace, --lane); "
                                 "fixed: no re-refinement, the given poses' built-in reconstruction and "
                                 "post-processing (fast, optimistic).")
        add_builtin_arguments(parser)
    add_cryosparc_arguments(parser, required=bool(cryosparc_command))
    if not cryosparc_command:
        parser.add_argument("--relion_refine", default="mpirun -n 3 relion_refine_mpi",
                            help="the relion_refine command line, at least 3 MPI ranks (default: 'mpirun -n 3 "
                                 "relion_refine_mpi'; as root add --allow-run-as-root to mpirun).")
        parser.add_argument("--j", type=int, default=1,
                            help="threads per RELION rank (relion_refine --j), 1 by default.")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the planned jobs and their command lines, run nothing.")
    add_device_argument(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar or log lines.")


def add_search_arguments(group: argparse._ArgumentGroup) -> None:
    """The local search's options of the built-in refinement (``cryosieve-refine``, ``cryosieve --realign``)."""
    group.add_argument("--search_range", type=float, default=15.0,
                       help="largest turn (degrees) from each particle's given pose, 15 by default.")
    group.add_argument("--angular_step", type=float, default=0.5,
                       help="finest angular step (degrees), 0.5 by default; coarser where the resolution supports "
                            "no finer.")
    group.add_argument("--shift_range", type=float, default=5.0,
                       help="largest move (pixels) of each particle's given origin, 5 by default.")


def add_builtin_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the built-in refinement (``--backend builtin``)."""
    group = parser.add_argument_group("built-in refinement (--backend builtin)")
    add_search_arguments(group)
    group.add_argument("--iterations", type=int, default=5,
                       help="most iterations (search, reconstruction, post-processing), 5 by default; each half-set "
                            "stops earlier once its resolution stops improving or fewer than 1 %% of its particles "
                            "move by more than the finest step.")
    group.add_argument("--batch_size", type=int, default=128, help="particles searched at once, 128 by default.")


def search_settings(args: argparse.Namespace, **more: Any) -> SearchSettings:
    """The :class:`cryosieve.align.SearchSettings` of the parsed search arguments (``more``: other fields)."""
    from cryosieve.align.settings import SearchSettings

    return SearchSettings(search_range=args.search_range, angular_step=args.angular_step,
                          shift_range=args.shift_range, **more)


def builtin_refiner(args: argparse.Namespace, device: Any) -> Any:
    """The built-in refiner the parsed arguments describe (its settings checked)."""
    from cryosieve.backends.builtin import BuiltinRefiner

    refiner = BuiltinRefiner(search_settings(args, batch_size=args.batch_size, device=device), args.iterations)
    refiner.check()
    return refiner


def add_cryosparc_arguments(parser: argparse.ArgumentParser, required: bool, prefix: str = "") -> None:
    """Where and how CryoSPARC refines (the original cryosieve-csrefine's flags; ``prefix``: before each name)."""
    group = parser.add_argument_group(
        "CryoSPARC (where: CRYOSPARC_BASE_URL, or CRYOSPARC_MASTER_HOSTNAME with CRYOSPARC_BASE_PORT or "
        "CRYOSPARC_COMMAND_CORE_PORT, else `cryosparcm env`; who: --user, CRYOSPARC_PASSWORD, CRYOSPARC_LICENSE_ID)")
    group.add_argument(f"--{prefix}user", required=required, default=None,
                       help="e-mail address of the CryoSPARC user (its password from CRYOSPARC_PASSWORD; see the "
                            "README for what each cryosparc-tools version needs).")
    group.add_argument(f"--{prefix}project", required=required, default=None,
                       help="project UID in CryoSPARC (P3)" + (
                           "; the last selection also goes back there as an External job with outputs kept and "
                           "sieved (a .cs input)." if prefix else "."))
    group.add_argument(f"--{prefix}workspace", required=required, default=None,
                       help="workspace UID in CryoSPARC (W1).")
    group.add_argument(f"--{prefix}lane", required=required, default=None,
                       help="lane selected for computing in CryoSPARC.")
    group.add_argument(f"--{prefix}nu", action="store_true", help="non-uniform refinement instead of homogeneous.")
    group.add_argument(f"--{prefix}min_angular_step", type=float, default=0.01,
                       help="minimum angular step (degrees) of the local refinement, 0.01 by default.")
    group.add_argument(f"--{prefix}source_job", default=None,
                       help="for .cs inputs: the CryoSPARC job whose particles they are (J42, or J42.OUTPUT; read "
                            "from the path of a .cs file in a job folder by default).")


def cryosparc_refiner(args: argparse.Namespace, device: Any, prefix: str = "") -> Any:
    """The CryoSPARC refiner the parsed arguments describe (connection from the environment)."""
    from cryosieve.backends.cryosparc import CryoSparcRefiner
    from cryosieve.cryosparc.connection import connection_from_environment
    from cryosieve.cryosparc.graph import RefinementOptions
    from cryosieve.errors import CryoSieveInputError

    def get(name: str) -> Any:
        return getattr(args, prefix + name)

    missing = [f"--{prefix}{name}" for name in ("user", "project", "workspace", "lane") if not get(name)]
    if missing:
        raise CryoSieveInputError(f"CryoSPARC refinement needs {', '.join(missing)}")
    options = RefinementOptions(lane=get("lane"), nu=get("nu"), local=bool(getattr(args, "local", False)),
                                min_angular_step=get("min_angular_step"),
                                resplit=bool(getattr(args, "resplit", False)))
    try:
        connection = connection_from_environment(get("user"))
    except CryoSieveInputError:
        if not getattr(args, "dry_run", False):
            raise
        from cryosieve.cryosparc.connection import Connection

        connection = Connection("(not set)", get("user"), origin="none")  # a plan connects nowhere
    return CryoSparcRefiner(connection, get("project"), get("workspace"), options, source_job=get("source_job"),
                            device=device)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="cryosieve-refine",
        description="Refine each particle set (poses re-estimated by RELION, or by the built-in local refinement "
                    "with --backend builtin, or the given poses with --backend fixed) and report resolution and "
                    "B-factor, as the original cryosieve-csrefine does with CryoSPARC.")
    add_refine_arguments(parser)
    return parser


def settings_and_refiner(args: argparse.Namespace) -> tuple[Any, Any]:
    """The library's settings and refiner from the parsed arguments."""
    from cryosieve.backends.builtin import FixedPoseRefiner
    from cryosieve.backends.relion import RelionRefiner
    from cryosieve.refine import RefineSettings

    device = choose_device(args.device)
    backend = getattr(args, "backend", "cryosparc")
    if backend == "cryosparc":
        refiner = cryosparc_refiner(args, device)
    elif backend == "fixed":
        refiner = FixedPoseRefiner(device)
    elif backend == "builtin":
        if args.ref is not None:
            from cryosieve.errors import CryoSieveInputError

            raise CryoSieveInputError(f"--ref {args.ref}: the built-in refinement starts from each half-set's own "
                                      "map of the given poses; leave it out")
        refiner = builtin_refiner(args, device)
    else:
        refiner = RelionRefiner.from_command_line(args.relion_refine, args.j, device)
    settings = RefineSettings(inputs=tuple(args.i), output=args.o, directory=args.directory or None, symmetry=args.sym,
                              reference=args.ref, ini_high=args.ini_high, repeat=args.repeat, resplit=args.resplit,
                              workers=args.workers, mask=args.mask,
                              particle_diameter=getattr(args, "particle_diameter", None),
                              local=args.local)
    return settings, refiner


def run_refine(parser: argparse.ArgumentParser, argv: Sequence[str] | None, program: str) -> int:
    """Parse, and refine each input (``cryosieve-refine``, ``cryosieve-csrefine``)."""
    args = parser.parse_args(argv)
    setup_logging(not args.quiet)
    settings, refiner = settings_and_refiner(args)

    from cryosieve.refine import refine_files

    outcome = refine_files(settings, refiner, dry_run=args.dry_run,
                           progress=progress_factory(not args.quiet, unit="job"))
    return report(outcome, args, f"{program}: summary written to")


def _main(argv: Sequence[str] | None) -> int:
    return run_refine(build_parser(), argv, "cryosieve-refine")


def report(outcome: Any, args: argparse.Namespace, written: str) -> int:
    """Print a dry run's plan, or where the summary went; the exit status."""
    print("\n".join(outcome.plan) if args.dry_run else f"{written} {args.o}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("cryosieve-refine", _main, argv, FLAGS)


if __name__ == "__main__":
    sys.exit(main())
