"""``cryosieve-postprocess``: masked, phase-randomisation-corrected FSC and sharpening (like relion_postprocess)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from cryosieve.cli._common import Parser, add_device_argument, choose_device, run_command, setup_logging

log = logging.getLogger("cryosieve")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="cryosieve-postprocess",
        description="Post-process two half maps as RELION 3.1's relion_postprocess does: unmasked, masked and "
                    "phase-randomisation-corrected FSC, final resolution at FSC 0.143, FSC-weighted B-factor "
                    "sharpening. Writes ROOT.mrc, ROOT_masked.mrc, ROOT_fsc.csv, ROOT.json, ROOT_fsc.png and "
                    "ROOT_guinier.png.",
    )
    parser.add_argument("--i", required=True, metavar="HALF1", help="first half map (MRC).")
    parser.add_argument("--i2", required=True, metavar="HALF2", help="second half map (MRC).")
    parser.add_argument("--mask", required=True, help="mask (MRC, values in [0, 1], 1 = protein).")
    parser.add_argument("--angpix", type=float, default=None,
                        help="pixel size in Å (default: from the half maps' header).")
    parser.add_argument("--o", default="postprocess", metavar="ROOT", help="output root name (default: postprocess).")
    parser.add_argument("--auto_bfac", action="store_true",
                        help="fit the sharpening B-factor to the Guinier plot (Rosenthal and Henderson, 2003).")
    parser.add_argument("--autob_lowres", type=float, default=10.0,
                        help="lowest resolution (Å) in the B-factor fit (default 10).")
    parser.add_argument("--autob_highres", type=float, default=0.0,
                        help="highest resolution (Å) in the B-factor fit (default 0: up to Nyquist, as RELION).")
    parser.add_argument("--adhoc_bfac", type=float, default=None,
                        help="B-factor (Å^2) to sharpen with, negative sharpens (e.g. -400). Without this and "
                             "--auto_bfac no B-factor is applied, as in RELION.")
    parser.add_argument("--low_pass", type=float, default=0.0,
                        help="low-pass filter resolution in Å (default 0: none, as RELION 3.1; negative: at the "
                             "final resolution).")
    parser.add_argument("--force_mask", action="store_true",
                        help="use the mask even when the unmasked FSC extends further than the corrected one.")
    parser.add_argument("--randomize_at_fsc", type=float, default=0.8,
                        help="randomise phases from the shell where the unmasked FSC first falls below this "
                             "(default 0.8).")
    parser.add_argument("--random_seed", type=int, default=0, help="seed for the phase randomisation (default 0).")
    add_device_argument(parser, mps=False)
    parser.add_argument("--quiet", action="store_true", help="no log lines.")
    return parser


def _body(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    device = choose_device(args.device)
    setup_logging(not args.quiet)

    from cryosieve.postprocess.files import output_paths, postprocess_files

    result = postprocess_files(
        args.i, args.i2, args.mask, args.o, angpix=args.angpix,
        auto_bfactor=args.auto_bfac, autob_lowres=args.autob_lowres, autob_highres=args.autob_highres,
        adhoc_bfactor=args.adhoc_bfac,
        randomize_threshold=args.randomize_at_fsc, seed=args.random_seed, device=device,
        low_pass=args.low_pass, force_mask=args.force_mask,
    )
    log.info("postprocess: phases randomised beyond %.2f Å", result.randomise_from_resolution)
    if result.bfactor_source == "auto":
        log.info("postprocess: B-factor %.2f Å^2 fitted from %.2f to %.2f Å (correlation %.3f)", result.bfactor,
                 result.fit_lowres, result.fit_highres, result.guinier_correlation)
    elif result.bfactor_source == "adhoc":
        log.info("postprocess: ad-hoc B-factor %.2f Å^2", result.bfactor)
    else:
        log.warning("postprocess: map not sharpened (no B-factor); give --auto_bfac or --adhoc_bfac to sharpen")
    log.info("postprocess: FINAL RESOLUTION %.3f Å, B-factor %.2f Å^2; wrote %s", result.resolution, result.bfactor,
             ", ".join(output_paths(args.o).values()))
    return 0


#: The library's setting fields -> this command's flags.
FLAGS = {
    "half_map_1": "--i", "half_map_2": "--i2", "mask": "--mask", "angpix": "--angpix", "root": "--o",
    "auto_bfactor": "--auto_bfac", "autob_lowres": "--autob_lowres", "autob_highres": "--autob_highres",
    "adhoc_bfactor": "--adhoc_bfac", "low_pass": "--low_pass", "force_mask": "--force_mask",
    "randomize_threshold": "--randomize_at_fsc", "seed": "--random_seed", "device": "--device",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cryosieve-postprocess``; returns the exit code (2 for bad input)."""
    return run_command("cryosieve-postprocess", _body, argv, FLAGS)


if __name__ == "__main__":
    sys.exit(main())
