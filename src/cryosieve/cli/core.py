"""``cryosieve-core``: one sieve of a refined particle stack (drop-in for the original)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence

import pandas as pd
from tqdm import tqdm

from cryosieve.cli._common import add_device_argument, choose_device, run_command, setup_logging
from cryosieve.errors import CryoSieveInputError
from cryosieve.io.atomic import OutputGroup
from cryosieve.io.star import output_paths, read_particles
from cryosieve.sieve import SieveResult, SieveSettings, load_inputs, sieve

log = logging.getLogger("cryosieve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cryosieve-core",
        description="CryoSieve core: score each particle against the masked half map of its half-set "
                    "and keep the lowest-scoring fraction.",
    )
    parser.add_argument("--i", required=True, help="input star file path.")
    parser.add_argument("--o", required=True, help="output star file path (kept particles); "
                        "OUT_sieved.star and OUT_scores.csv are written beside it.")
    parser.add_argument("--directory", default="", help="directory of particles, empty (current directory) by default.")
    parser.add_argument("--angpix", type=float, default=None,
                        help="pixelsize in Angstrom (needed for RELION 3.0 STAR files; 3.1+ files carry it).")
    parser.add_argument("--volume", action="append", required=True,
                        help="list of volume file paths, one per half-set (rlnRandomSubset 1, 2, ...).")
    parser.add_argument("--mask", default=None, help="mask file path (none: no masking).")
    parser.add_argument("--retention_ratio", type=float, default=0.8,
                        help="fraction of retained particles, 0.8 by default.")
    parser.add_argument("--frequency", type=float, required=True,
                        help="cut-off highpass frequency, in Angstrom (frequencies below 1/F are ignored).")
    parser.add_argument("--balance", action="store_true",
                        help="make retained particles in different subsets in same size.")
    parser.add_argument("--num_gpus", type=int, default=1,
                        help="number of processes (one per GPU) to score with, 1 by default.")
    add_device_argument(parser)
    parser.add_argument("--batch_size", type=int, default=256, help="particles per batch, 256 by default.")
    parser.add_argument("--projector", choices=("fourier", "realspace"), default="fourier",
                        help="fourier: central slices of the map's transform (fast, default); realspace: the "
                             "published real-space projector, to reproduce earlier selections.")
    parser.add_argument("--reference_weighting", choices=("auto", "fsc", "none"), default="auto",
                        help="weight each half map by sqrt(2 FSC/(1+FSC)) of the two half maps (fsc), or not "
                             "(none, the published behaviour); auto: fsc with two half maps and the fourier "
                             "projector, else none.")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or log lines.")
    return parser


def scores_table(table, result: SieveResult) -> pd.DataFrame:
    """One row per particle in input order: image name, half-set, score, kept."""
    return pd.DataFrame({
        "rlnImageName": table.image_name,
        "half_set": result.half_set,
        "score": result.scores,
        "kept": result.kept.astype(int),
    })


def write_outputs(table, result: SieveResult, out: str) -> tuple[str, str, str]:
    """Write kept STAR, sieved STAR and scores CSV together (all or nothing)."""
    kept_path, sieved_path = output_paths(out)
    root, _ = os.path.splitext(str(kept_path))
    scores_path = root + "_scores.csv"
    with OutputGroup() as group:
        table.subset(result.kept).write_to(group.path_for(kept_path))
        table.subset(~result.kept).write_to(group.path_for(sieved_path))
        scores_table(table, result).to_csv(group.path_for(scores_path), index=False, float_format="%.10g")
    return str(kept_path), str(sieved_path), scores_path


def balance_selection(result: SieveResult, retention_ratio: float) -> None:
    """``--balance``: keep the same number in every half-set (the smallest ``round(R n)``)."""
    import numpy as np

    from cryosieve.score import retained_count

    groups = np.unique(result.half_set)
    target = min(retained_count(int((result.half_set == g).sum()), retention_ratio) for g in groups)
    kept = np.zeros_like(result.kept)
    for group in groups:
        members = np.flatnonzero(result.half_set == group)
        order = np.argsort(result.scores[members], kind="stable")
        kept[members[order[:target]]] = True
    result.kept = kept


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(not args.quiet)
    started = time.perf_counter()
    device = choose_device(args.device)
    if args.num_gpus > 1 and device.type == "cuda":
        import torch

        if torch.cuda.device_count() < args.num_gpus:
            raise CryoSieveInputError(
                f"--num_gpus {args.num_gpus}: only {torch.cuda.device_count()} CUDA devices present")
    if not args.o.strip():
        raise CryoSieveInputError("--o: empty output path")
    settings = SieveSettings(retention_ratio=args.retention_ratio, highpass_angstrom=args.frequency,
                             projector=args.projector, reference_weighting=args.reference_weighting,
                             batch_size=args.batch_size, device=device, num_processes=args.num_gpus)
    table = read_particles(args.i, args.angpix)
    reader, volumes, mask, half_set = load_inputs(table, args.directory or None, args.volume, args.mask, settings)
    log.info("%d particles in %d half-set(s); cut-off %.2f Å; projector %s; device %s",
             len(table), len(set(half_set.tolist())), args.frequency, args.projector, device)
    with tqdm(total=len(table), unit="particle", desc="scoring", disable=args.quiet, file=sys.stderr) as bar:
        result = sieve(table, reader, volumes, mask, half_set, settings, progress=bar.update)
    if args.balance:
        balance_selection(result, args.retention_ratio)
    kept_path, sieved_path, scores_path = write_outputs(table, result, args.o)
    for subset in sorted(set(half_set.tolist())):
        members = half_set == subset
        log.info("half-set %d: %d of %d particles kept", subset, int(result.kept[members].sum()), int(members.sum()))
    log.info("wrote %s, %s and %s in %.2f s", kept_path, sieved_path, scores_path, time.perf_counter() - started)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("cryosieve-core", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
