"""``cryosieve-simulate``: a known-truth particle data set for tests, demos and benchmarks."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import replace

from tqdm import tqdm

from cryosieve.cli._common import Parser, add_device_argument, choose_device, run_command, setup_logging

log = logging.getLogger("cryosieve")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="cryosieve-simulate",
        description="Simulate a particle stack with known truth: RELION 3.1 STAR, MRC stack, truth map, mask, "
                    "half maps reconstructed from the particles, and truth.csv (junk flag and B-factor of "
                    "every particle).",
    )
    parser.add_argument("--o", required=True, help="output folder (created; must not exist or be empty).")
    parser.add_argument("--model", default=None,
                        help="atomic model (PDB/mmCIF, gzip allowed) of the particle; default: bundled 1BD2.")
    parser.add_argument("--junk_model", default=None,
                        help="atomic model of the junk particles; default: bundled 4E43 (HIV protease).")
    parser.add_argument("--num_particles", type=int, default=2000, help="number of particles, 2000 by default.")
    parser.add_argument("--box", type=int, default=64, help="box size in pixels (even, >= 16), 64 by default.")
    parser.add_argument("--angpix", type=float, default=2.5, help="pixel size in Angstrom, 2.5 by default.")
    parser.add_argument("--junk_fraction", type=float, default=0.1,
                        help="fraction of junk particles in [0, 1), 0.1 by default.")
    parser.add_argument("--snr", type=float, default=0.05,
                        help="signal-to-noise ratio: variance of the noiseless particle images over the box / "
                             "noise variance, 0.05 by default (inf: no noise).")
    parser.add_argument("--bfactor_min", type=float, default=0.0,
                        help="smallest per-particle envelope B-factor (A^2), 0 by default.")
    parser.add_argument("--bfactor_max", type=float, default=300.0,
                        help="largest per-particle envelope B-factor (A^2), 300 by default.")
    parser.add_argument("--defocus_min", type=float, default=5000.0, help="smallest defocus (A), 5000 by default.")
    parser.add_argument("--defocus_max", type=float, default=15000.0, help="largest defocus (A), 15000 by default.")
    parser.add_argument("--astigmatism", type=float, default=500.0,
                        help="largest defocus U - V difference (A), 500 by default.")
    parser.add_argument("--max_origin", type=float, default=4.0,
                        help="largest origin shift along x and y (A), 4 by default.")
    parser.add_argument("--voltage", type=float, default=300.0, help="acceleration voltage (kV), 300 by default.")
    parser.add_argument("--cs", type=float, default=2.7, help="spherical aberration (mm), 2.7 by default.")
    parser.add_argument("--amplitude_contrast", type=float, default=0.1,
                        help="amplitude contrast fraction, 0.1 by default.")
    parser.add_argument("--phase_shift", type=float, default=0.0,
                        help="phase-plate phase shift (degrees), 0 by default.")
    parser.add_argument("--seed", type=int, default=0, help="random seed, 0 by default.")
    parser.add_argument("--batch_size", type=int, default=256, help="images rendered at once, 256 by default.")
    realism = parser.add_argument_group(
        "realistic defects (off by default; --realistic turns on 5 %% empty images, 10 %% misaligned by 5-30 degrees, "
        "5 %% with origins off by 4-8 A, contrast spread 0.25, coloured noise (B 150 A^2, floor 0.3) over 40 "
        "micrographs with noise levels spread by 0.2; each flag below overrides it)")
    realism.add_argument("--realistic", action="store_true", help="turn on every defect at the values above.")
    for name, kind, text in (
            ("empty_fraction", float, "fraction of empty images (blobs, carbon edges)"),
            ("misaligned_fraction", float, "fraction of particles whose STAR pose is turned from the truth"),
            ("misalignment_min", float, "smallest pose error (degrees) of a misaligned particle"),
            ("misalignment_max", float, "largest pose error (degrees) of a misaligned particle"),
            ("wrong_origin_fraction", float, "fraction of particles whose STAR origin is off"),
            ("origin_error", float, "largest origin error (A; the smallest is half of it)"),
            ("contrast_spread", float, "spread of the per-particle amplitude scale exp(N(0, s)) (hidden)"),
            ("noise_bfactor", float, "fall-off of the noise power, exp(-B s^2/4) over a floor (A^2; 0: white)"),
            ("noise_floor", float, "floor of the coloured noise power, a fraction"),
            ("micrographs", int, "number of micrographs (rlnMicrographName; 0: none)"),
            ("noise_spread", float, "spread of the per-micrograph noise level exp(N(0, s))"),
            ("preferred_fraction", float, "fraction of particles viewed within --preferred_spread of the top view"),
            ("preferred_spread", float, "half-angle (degrees) of the preferred views' cone, 15 by default")):
        realism.add_argument(f"--{name}", type=kind, default=None, help=text + ".")
    parser.add_argument("--no_half_maps", action="store_true",
                        help="do not reconstruct half1.mrc/half2.mrc from the particles.")
    parser.add_argument("--force", action="store_true", help="replace an existing non-empty output folder.")
    add_device_argument(parser, mps=False)
    parser.add_argument("--quiet", action="store_true", help="no progress bar or log lines.")
    return parser


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)

    from cryosieve.simulate.inputs import check_inputs
    from cryosieve.simulate.parameters import SimulationSettings

    setup_logging(not args.quiet)
    started = time.perf_counter()
    device = choose_device(args.device)
    settings = SimulationSettings(
        num_particles=args.num_particles, box=args.box, pixel_size=args.angpix, junk_fraction=args.junk_fraction,
        snr=args.snr, bfactor_min=args.bfactor_min, bfactor_max=args.bfactor_max,
        defocus_min=args.defocus_min, defocus_max=args.defocus_max, astigmatism=args.astigmatism,
        max_origin=args.max_origin, voltage=args.voltage, spherical_aberration=args.cs,
        amplitude_contrast=args.amplitude_contrast, phase_shift=args.phase_shift, seed=args.seed,
        batch_size=args.batch_size, half_maps=not args.no_half_maps,
    )
    if args.realistic:
        settings = settings.realistic()
    given = {name: getattr(args, name) for name in REALISM if getattr(args, name) is not None}
    settings = replace(settings, **given)
    check_inputs(args.o, settings, model=args.model, junk_model=args.junk_model, overwrite=args.force)
    log.info("simulating %d particles (%d junk, %d empty), box %d at %.3g Å, SNR %g, B %g-%g Å^2, device %s",
             settings.num_particles, settings.junk_count, settings.empty_count, settings.box, settings.pixel_size,
             settings.snr,
             settings.bfactor_min, settings.bfactor_max, device)
    from cryosieve.simulate.dataset import simulate_particles

    steps = settings.num_particles * (2 if settings.half_maps else 1)  # rendering, then reconstruction
    with tqdm(total=steps, unit="particle", desc="simulating", disable=args.quiet,
              file=sys.stderr) as bar:
        result = simulate_particles(args.o, settings, model=args.model, junk_model=args.junk_model,
                                    device=device, overwrite=args.force, progress=bar.update)
    log.info("wrote %s (STAR %s, stack %s, truth.csv, truth.mrc, mask.mrc%s) in %.2f s", result.folder,
             result.star.name, result.stack.name, ", half1.mrc, half2.mrc" if result.half_maps else "",
             time.perf_counter() - started)
    return 0


#: The realistic defects' settings, flags of the same names.
REALISM = ("empty_fraction", "misaligned_fraction", "misalignment_min", "misalignment_max", "wrong_origin_fraction",
           "origin_error", "contrast_spread", "noise_bfactor", "noise_floor", "micrographs", "noise_spread",
           "preferred_fraction", "preferred_spread")

#: The library's setting fields -> this command's flags.
FLAGS = {name: f"--{name}" for name in (*REALISM,
    "num_particles", "box", "angpix", "junk_fraction", "snr", "bfactor_min", "bfactor_max", "defocus_min",
    "defocus_max", "astigmatism", "max_origin", "voltage", "cs", "amplitude_contrast", "phase_shift", "seed",
    "batch_size", "model", "junk_model", "device")} | {"output_folder": "--o", "overwrite": "--force",
                                                      "half_maps": "--no_half_maps"}


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("cryosieve-simulate", _main, argv, FLAGS)


if __name__ == "__main__":
    sys.exit(main())
