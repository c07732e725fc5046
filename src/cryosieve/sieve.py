"""The sieving engine: validate inputs, prepare references, score every particle, select.

Used by ``cryosieve-core`` and, in-process, by the iterative pipeline. Every input is read and checked
before torch is loaded (the scorer and the FSC are imported where they are used), so that a mistake is
reported at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cryosieve.band import HighPass
from cryosieve.errors import CryoSieveInputError, ServiceError, setting
from cryosieve.io.atomic import OutputGroup, remove_stale_temporaries_of
from cryosieve.io.mrc import Volume, read_volume
from cryosieve.io.particle_files import in_format_of, read_particle_file
from cryosieve.io.paths import InputFile, check_distinct_inputs, check_outputs
from cryosieve.io.stack import StackReader, stack_paths
from cryosieve.io.star import output_paths
from cryosieve.mask import check_mask
from cryosieve.particles import ParticleSet
from cryosieve.precision import has_float64
from cryosieve.progress import ProgressFactory, no_progress
from cryosieve.scoring.base import uses_kernel
from cryosieve.selection import select
from cryosieve.settings import AUTO, SieveSettings
from cryosieve.tolerances import pixel_sizes_agree
from cryosieve.world import current as current_world

if TYPE_CHECKING:
    from cryosieve.cryosparc.selection import PreparedReturn, ReturnTarget
    from cryosieve.retention import RetentionChoice

log = logging.getLogger("cryosieve")



@dataclass
class SieveResult:
    """Scores and selection.

    ``scores``: ``(n,)`` float64; ``kept``: ``(n,)`` bool; ``half_set``: ``(n,)`` int64
    (1 for every particle when the STAR file has no ``rlnRandomSubset``);
    ``reference_fsc``: the per-shell FSC used for weighting, or ``None``.
    """

    scores: np.ndarray
    kept: np.ndarray
    half_set: np.ndarray
    reference_fsc: np.ndarray | None = None
    reference_weighting: str = "none"
    timings: dict[str, float] = field(default_factory=dict)
    retention: RetentionChoice | None = None  # how the fraction was chosen (retention_ratio "auto")


def check_settings(settings: SieveSettings) -> None:
    """Refuse (one line) settings out of range, or not possible on their device."""
    settings.check()
    uses_kernel(settings.engine, settings.device)  # numba asked for off the CPU, or without numba
    if settings.projector == "realspace" and not has_float64(settings.device):
        raise CryoSieveInputError(f"{setting('projector')} realspace: the published scorer computes in float64, "
                                  f"which {settings.device} lacks; use the Fourier projector or the CPU")


def half_sets(table: ParticleSet, volume_count: int) -> np.ndarray:
    """Half-set of each particle; checks that they match the number of volumes.

    With no ``rlnRandomSubset`` column every particle is in half-set 1 and one volume
    must be given.
    """
    if table.random_subset is None:
        if volume_count != 1:
            raise CryoSieveInputError(
                f"{table.path}: no rlnRandomSubset column, so give exactly one half map "
                f"({setting('volumes')}; got {volume_count})"
            )
        return np.ones(len(table), dtype=np.int64)
    present = sorted(set(table.random_subset.tolist()))
    if present[-1] > volume_count:
        raise CryoSieveInputError(
            f"{table.path}: rlnRandomSubset goes up to {present[-1]} "
            f"but only {volume_count} half maps given ({setting('volumes')})"
        )
    if volume_count > present[-1]:
        raise CryoSieveInputError(
            f"{volume_count} half maps given ({setting('volumes')}) "
            f"but {table.path} has only {present[-1]} half-sets (rlnRandomSubset)"
        )
    return table.random_subset.astype(np.int64)


def check_geometry(table: ParticleSet, box: int, volumes: Sequence[Volume], highpass_angstrom: float,
                   mask: Volume | None = None) -> None:
    """Box and pixel sizes of particles, maps and mask agree; the cut-off leaves frequencies to score."""
    groups = np.unique(table.pixel_size)
    for volume in volumes:
        if volume.data.shape[-1] != box:
            raise CryoSieveInputError(
                f"{volume.path}: box size {volume.data.shape[-1]} does not match the particles' {box}"
            )
        if volume.voxel_size is not None:
            worst = float(groups[np.argmax(np.abs(groups - volume.voxel_size))])
            if not pixel_sizes_agree(worst, volume.voxel_size):
                raise CryoSieveInputError(
                    f"{volume.path}: voxel size {volume.voxel_size:.4f} Å does not match the particles' "
                    f"pixel size {worst:.4f} Å"
                )
    if mask is not None:
        voxel = next((volume.voxel_size for volume in volumes if volume.voxel_size is not None), None)
        check_mask(mask, (box, box, box), voxel, against="the maps")
    HighPass(highpass_angstrom).check(box, float(np.max(table.pixel_size)))


def prepare_references(volumes: Sequence[Volume], mask: Volume | None, weighting: str, projector: str
                       ) -> tuple[list[np.ndarray], np.ndarray | None, str]:
    """Masked half maps and, for FSC weighting, the FSC between them.

    The map and mask (float32) are multiplied in float64 for the real-space projector, as
    the published program does, and in float32 (the same values rounded) otherwise.
    Returns ``(masked maps [z, y, x] float32 or float64, fsc (n//2+1,) or None, weighting used)``.
    """
    mask_data = mask.data if mask is not None else None
    if mask is not None and mask.data.shape != volumes[0].data.shape:
        raise CryoSieveInputError(
            f"{mask.path}: mask shape {mask.data.shape} does not match the maps' {volumes[0].data.shape}"
        )
    dtype = np.float64 if projector == "realspace" else np.float32
    masked = [np.multiply(volume.data, mask_data, dtype=dtype) if mask_data is not None
              else volume.data.astype(dtype) for volume in volumes]
    if weighting == "auto":
        weighting = "fsc" if (len(volumes) == 2 and projector == "fourier") else "none"
    if weighting == "fsc":
        import torch

        from cryosieve.fsc import fourier_shell_correlation

        if len(volumes) != 2:
            raise CryoSieveInputError(
                f"{setting('reference_weighting')} fsc needs two half maps ({setting('volumes')}), got {len(volumes)}"
            )
        fsc = fourier_shell_correlation(torch.from_numpy(masked[0]), torch.from_numpy(masked[1]),
                                       friedel_weighted=True).numpy()
        return masked, fsc, "fsc"
    return masked, None, "none"


def load_inputs(table: ParticleSet, directory: str | os.PathLike[str] | None, volume_paths: Sequence[str],
                mask_path: str | None, settings: SieveSettings, reader: StackReader | None = None
                ) -> tuple[StackReader, list[Volume], Volume | None, np.ndarray]:
    """Read and check everything a sieve needs before any scoring starts (``reader``: the
    stack reader to use; a new one otherwise, which the caller closes)."""
    check_settings(settings)
    if not volume_paths:
        raise CryoSieveInputError(f"{setting('volumes')}: give at least one half map")
    half_set = half_sets(table, len(volume_paths))
    names = [f"{setting('volumes')} {index + 1}" for index in range(len(volume_paths))]
    check_distinct_inputs([*(InputFile(Path(path), name) for path, name in zip(volume_paths, names, strict=True)),
                           *([InputFile(Path(mask_path), setting("mask"))] if mask_path else [])])
    reader = reader if reader is not None else StackReader(table, directory)
    box = reader.validate()
    volumes = [read_volume(path) for path in volume_paths]
    mask = read_volume(mask_path) if mask_path else None
    check_geometry(table, box, volumes, settings.highpass_angstrom, mask)
    return reader, volumes, mask, half_set


def _log_reference_fsc(fsc: np.ndarray, box: int, pixel_size: float) -> None:
    """The per-shell FSC at debug level (the run's log file); one line on where the weight halves."""
    from cryosieve.fsc import fsc_weight

    log.debug("reference weighting by half-map FSC, per shell: %s", " ".join(f"{value:.3f}" for value in fsc))
    low = np.flatnonzero(fsc_weight(fsc)[1:] < 0.5)
    if low.size:
        shell = int(low[0]) + 1
        log.info("reference weighting by half-map FSC: weight below 0.5 from shell %d (%.2f Å) on", shell,
                 box * pixel_size / shell)
    else:
        log.info("reference weighting by half-map FSC: weight at least 0.5 up to Nyquist")


def sieve(table: ParticleSet, reader: StackReader, volumes: Sequence[Volume], mask: Volume | None,
          half_set: np.ndarray, settings: SieveSettings,
          progress: Callable[[int], None] | None = None,
          choosing: ProgressFactory = no_progress) -> SieveResult:
    """Score every particle against the masked map of its half-set and keep the lowest fraction
    (``progress``: called with the particles scored; ``choosing``: the progress of choosing the
    fraction, with ``retention_ratio`` ``"auto"``)."""
    if settings.retention_ratio == AUTO and sorted(set(half_set.tolist())) != [1, 2]:
        raise CryoSieveInputError(f"{setting('retention_ratio')} auto: needs the two half-sets of rlnRandomSubset "
                                  f"in {table.path}")
    references, fsc, weighting = prepare_references(volumes, mask, settings.reference_weighting, settings.projector)
    voxel = volumes[0].voxel_size
    if fsc is not None:
        _log_reference_fsc(fsc, references[0].shape[-1], voxel or float(np.min(table.pixel_size)))
    from cryosieve.scoring.loop import ScoreTask, score_rows

    if current_world().distributed:  # a job of several processes: every rank scores its share (cryosieve.world)
        scores = current_world().run(ScoreTask(table, reader.directory, references, half_set, settings, voxel, fsc,
                                               progress))
    else:
        scores = score_rows(table, reader, references, half_set, settings, volume_pixel_size=voxel,
                            reference_fsc=fsc, progress=progress)
    retention = None
    ratio = settings.retention_ratio
    if ratio == AUTO:
        from cryosieve.retention import SIGNAL_Z, choose_retention

        with choosing("choosing the retention ratio", len(table)) as update:
            retention = choose_retention(table, reader, scores, half_set, mask.data if mask is not None else None,
                                         batch_size=settings.batch_size, device=settings.device, progress=update)
        ratio = retention.chosen
        log.info("retention ratio chosen: %.2f of each half-set (the most map information of %d fractions "
                 "from %.2f to %.2f)", ratio, retention.fractions.size, retention.fractions[0],
                 retention.fractions[-1])
        if not retention.above_noise:
            best = int(np.argmax(retention.z))
            log.warning("retention ratio auto: no candidate's half maps share information beyond noise (largest z "
                        "%.1f, at %.2f, below %g): the fraction kept, %.2f, is arbitrary (particles without signal, "
                        "or wrong poses?)", retention.z[best], retention.fractions[best], SIGNAL_Z, ratio)
    assert not isinstance(ratio, str)
    kept = select(scores, half_set, ratio, balance=settings.balance, keep_orientations=settings.keep_orientations,
                  rot=table.rot, tilt=table.tilt)
    return SieveResult(scores=scores, kept=kept, half_set=half_set, reference_fsc=fsc,
                       reference_weighting=weighting, retention=retention)


def sieve_output_paths(out: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """``(kept STAR, sieved STAR, scores CSV)`` for the output name ``OUT.star``:
    ``OUT.star``, ``OUT_sieved.star`` and ``OUT_scores.csv``."""
    kept, sieved = output_paths(out)
    root, _ = os.path.splitext(str(kept))
    return kept, sieved, Path(root + "_scores.csv")


def scores_table(table: ParticleSet, result: SieveResult) -> pd.DataFrame:
    """One row per particle in input order: image name (and ``uid`` for a ``.cs`` input), half-set, score,
    kept (0/1)."""
    columns: dict[str, object] = {"rlnImageName": table.image_name}
    uid = getattr(table.source, "uid", None)
    if uid is not None:
        columns["uid"] = uid
    columns.update(half_set=result.half_set, score=result.scores, kept=result.kept.astype(int))
    return pd.DataFrame(columns)


def retention_path(out: str | os.PathLike[str]) -> Path:
    """``OUT_retention.csv``: with ``retention_ratio`` ``"auto"``, each candidate fraction, its map
    information and the one chosen (:meth:`cryosieve.retention.RetentionChoice.table_rows`)."""
    root, _ = os.path.splitext(str(sieve_output_paths(out)[0]))
    return Path(root + "_retention.csv")


def write_sieve_outputs(table: ParticleSet, result: SieveResult, out: str | os.PathLike[str]
                        ) -> tuple[Path, Path, Path]:
    """Write the kept STAR, the sieved STAR and the scores CSV (and, for an automatic retention
    ratio, :func:`retention_path`), all together or none (:func:`sieve_output_paths`); returns
    the first three paths."""
    kept_path, sieved_path, scores_path = sieve_output_paths(out)
    written = in_format_of(table, kept_path)
    with OutputGroup() as group:
        written.subset(result.kept).write_to(group.path_for(kept_path))
        written.subset(~result.kept).write_to(group.path_for(sieved_path))
        scores_table(table, result).to_csv(group.path_for(scores_path), index=False, float_format="%.10g")
        if result.retention is not None:
            pd.DataFrame(result.retention.table_rows()).to_csv(group.path_for(retention_path(out)), index=False,
                                                               float_format="%.10g")
    return kept_path, sieved_path, scores_path


def sieve_inputs(table: ParticleSet, directory: str | os.PathLike[str] | None, volume_paths: Sequence[str],
                 mask_path: str | None) -> list[InputFile]:
    """Every file a sieve of ``table`` reads (for :func:`cryosieve.io.paths.check_outputs`)."""
    inputs = [InputFile(Path(table.path), "particle file")]
    inputs += [InputFile(path, f"particle stack of {table.path}") for path in stack_paths(table, directory)]
    inputs += [InputFile(Path(path), "half map") for path in volume_paths]
    if mask_path:
        inputs.append(InputFile(Path(mask_path), "mask"))
    return inputs


def sieve_star_file(star: str, out: str, volume_paths: Sequence[str], settings: SieveSettings, *,
                    directory: str | None = None, mask_path: str | None = None, angpix: float | None = None,
                    passthrough: tuple[str, ...] = (), progress: ProgressFactory = no_progress,
                    return_to: ReturnTarget | None = None) -> tuple[SieveResult, tuple[Path, Path, Path]]:
    """One sieve from files to files (``cryosieve-core``).

    Reads ``star``, refuses outputs that would land on any input or in an unwritable place,
    checks every input, scores, selects and writes :func:`sieve_output_paths` of ``out``
    (all three or none). With ``return_to`` (a ``.cs`` input), the selection then goes back to
    CryoSPARC as an External job (:mod:`cryosieve.cryosparc.selection`), checked before scoring.
    Returns the result and the three paths.
    """
    check_settings(settings)
    if not str(out).strip():
        raise CryoSieveInputError(f"{setting('output')}: empty output path")
    table = read_particle_file(star, angpix, passthrough)
    outputs = [*sieve_output_paths(out), *([retention_path(out)] if settings.retention_ratio == AUTO else [])]
    check_outputs(outputs, [*sieve_inputs(table, directory, volume_paths, mask_path),
                            *(InputFile(Path(path), "passthrough file") for path in passthrough)])
    remove_stale_temporaries_of(outputs)
    with contextlib.closing(StackReader(table, directory)) as reader:
        reader, volumes, mask, half_set = load_inputs(table, directory, volume_paths, mask_path, settings, reader)
        prepared = None
        if return_to is not None:
            from cryosieve.cryosparc.selection import prepare_return

            prepared = prepare_return(return_to, star, uids_of(table))
        log.info("%d particles in %d half-set(s); cut-off %.2f Å; projector %s; device %s", len(table),
                 len(set(half_set.tolist())), settings.highpass_angstrom, settings.projector, settings.device)
        with progress("scoring", len(table)) as update:
            result = sieve(table, reader, volumes, mask, half_set, settings, progress=update, choosing=progress)
    paths = write_sieve_outputs(table, result, out)
    for subset in sorted(set(half_set.tolist())):
        members = half_set == subset
        log.info("half-set %d: %d of %d particles kept", subset, int(result.kept[members].sum()), int(members.sum()))
    if prepared is not None:
        give_selection_back(prepared, uids_of(table), result.kept, f"CryoSieve selection of {Path(star).name}", paths)
    return result, paths


def uids_of(table: ParticleSet) -> np.ndarray:
    """The ``uid`` of each particle of a ``.cs`` set ``(n,)`` uint64 (``[]`` for other formats)."""
    uid = getattr(table.source, "uid", None)
    return np.asarray(uid if uid is not None else [], dtype=np.uint64)


def give_selection_back(prepared: PreparedReturn, uids: np.ndarray, kept: np.ndarray, title: str,
                        written: Sequence[Path]) -> str:
    """The External job of ``kept`` (``(n,)`` bool) and the rest, once the files ``written`` are; a failure
    says that they are."""
    from cryosieve.cryosparc.selection import give_back

    written_text = ", ".join(str(path) for path in written)
    try:
        return give_back(prepared, uids[kept], uids[~kept], title)
    except CryoSieveInputError as error:
        raise CryoSieveInputError(f"the selection is written ({written_text}), but giving it back to CryoSPARC "
                                  f"failed: {error.raw_message}") from None
    except ServiceError as error:
        raise ServiceError(f"the selection is written ({written_text}), but giving it back to CryoSPARC failed: "
                           f"{error}") from None
