"""``cryosieve-reconstruct``: direct Fourier reconstruction, a stand-in for ``relion_reconstruct``.

Takes RELION-style flags (``--i``, ``--o``, ``--angpix``, ``--sym``, ``--ctf``,
``--subset``) so that it can replace ``relion_reconstruct`` in scripts such as the
original CryoSieve pipeline (which passes ``--ctf true``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from cryosieve.cli._common import (
    Parser,
    add_device_argument,
    choose_device_name,
    progress_factory,
    run_command,
    setup_logging,
)
from cryosieve.errors import CryoSieveInputError

log = logging.getLogger("cryosieve")

_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def parse_flag(value: str | None) -> bool:
    """``--ctf`` alone or ``--ctf true|false`` (RELION accepts both forms)."""
    if value is None:
        return True
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise CryoSieveInputError(f"--ctf {value}: expected true or false")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="cryosieve-reconstruct",
        description="Direct Fourier reconstruction of a particle stack (drop-in for relion_reconstruct).",
    )
    parser.add_argument("--i", required=True, help="input particle STAR file (RELION 3.0 or 3.1+).")
    parser.add_argument("--o", required=True, help="output map (MRC).")
    parser.add_argument("--angpix", type=float, default=None,
                        help="pixel size in Å (needed for RELION 3.0 STAR files; 3.1+ files carry it).")
    parser.add_argument("--sym", default="C1", help="point group, RELION's names (C1 by default).")
    parser.add_argument("--ctf", nargs="?", const="true", default="false",
                        help="apply CTF correction (--ctf, or --ctf true|false; off by default, as RELION).")
    parser.add_argument("--subset", type=int, default=None,
                        help="reconstruct only particles with this rlnRandomSubset (1 or 2); others: all.")
    parser.add_argument("--directory", default="", help="folder that image names are relative to "
                        "(default: the current folder).")
    add_device_argument(parser)
    parser.add_argument("--batch_size", type=int, default=128, help="images per batch, 128 by default.")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or log lines.")
    return parser


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(not args.quiet)
    started = time.perf_counter()
    apply_ctf = parse_flag(args.ctf)
    device = choose_device_name(args.device)

    from cryosieve.reconstruct import reconstruct_star_file

    path, count = reconstruct_star_file(args.i, args.o, angpix=args.angpix, symmetry=args.sym, apply_ctf=apply_ctf,
                                        subset=args.subset, directory=args.directory or None,
                                        batch_size=args.batch_size, device=device,
                                        progress=progress_factory(not args.quiet))
    log.info("wrote %s (%d particles) in %.2f s", path, count, time.perf_counter() - started)
    return 0


#: The library's setting fields -> this command's flags.
FLAGS = {
    "input_star": "--i", "output": "--o", "angpix": "--angpix", "symmetry": "--sym", "apply_ctf": "--ctf",
    "subset": "--subset", "directory": "--directory", "device": "--device", "batch_size": "--batch_size",
}


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("cryosieve-reconstruct", _main, argv, FLAGS)


if __name__ == "__main__":
    sys.exit(main())
