"""The steps of one round, and what a round shows: reconstruct the half maps of a set, post-process
them, re-estimate its poses (:func:`realign`, ``--realign``), sieve the set at the round's cut-off
(:func:`reconstruct`, :func:`postprocess`, :func:`sieve`),
give the last selection back to CryoSPARC (:func:`give_back`); each round's summary for the report
(:func:`round_summary`), the best set (:func:`write_best`) and whether the run has stalled
(:func:`stalled`, ``--patience``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryosieve.backends import HalfMapJob, PostprocessJob
from cryosieve.backends.builtin import BuiltinReconstructor
from cryosieve.errors import CryoSieveInputError
from cryosieve.io.atomic import OutputGroup, atomic_path
from cryosieve.io.mrc import read_volume, write_volume_to
from cryosieve.io.particle_files import in_format_of
from cryosieve.io.stack import StackReader
from cryosieve.particles import ParticleSet
from cryosieve.pipeline.names import OutputNames
from cryosieve.pipeline.prepare import Prepared
from cryosieve.pipeline.settings import PipelineSettings
from cryosieve.pipeline.state import State
from cryosieve.postprocess.report import PostprocessReport
from cryosieve.progress import ProgressFactory
from cryosieve.report import RoundSummary, chosen_round
from cryosieve.selection import depleted_fraction, view_bins
from cryosieve.settings import AUTO
from cryosieve.sieve import check_geometry, half_sets, retention_path, write_sieve_outputs
from cryosieve.sieve import sieve as sieve_particles

log = logging.getLogger("cryosieve")


def write_iter0(prepared: Prepared) -> None:
    target = prepared.names.star(0)
    if not prepared.settings.sieve.balance and not prepared.settings.resplit:
        with atomic_path(target) as temporary:
            shutil.copyfile(prepared.settings.input_star, temporary)
    else:
        prepared.particles.subset(prepared.rows0).write(target)


def reconstruct(prepared: Prepared, particles: ParticleSet, iteration: int, progress: ProgressFactory) -> None:
    names = prepared.names
    directory = Path(prepared.settings.directory) if prepared.settings.directory else None
    star = names.star(iteration).absolute()
    if names.extension != ".star" and not isinstance(prepared.reconstructor, BuiltinReconstructor):
        # an external program reads STAR files: the set described in RELION's terms
        star = names.relion_star(iteration).absolute()
        in_format_of(particles, star).write(star)
    job = HalfMapJob(particles=particles, star=star, directory=directory,
                     outputs=(names.half_map(iteration, 1), names.half_map(iteration, 2)),
                     logs=(names.reconstruct_log(iteration, 1), names.reconstruct_log(iteration, 2)),
                     pixel_size=prepared.angpix, symmetry=prepared.symmetry)

    @contextlib.contextmanager
    def labelled(description: str, total: int) -> Iterator[Callable[[int], None]]:
        with progress(f"iter {iteration}: {description}", total) as update:
            yield update

    prepared.reconstructor.reconstruct_half_maps(job, labelled)


def postprocess(prepared: Prepared, iteration: int) -> dict[str, Any]:
    """Post-process round ``iteration``; returns the outcome the state records."""
    names = prepared.names
    job = PostprocessJob(half_maps=(names.half_map(iteration, 1), names.half_map(iteration, 2)), mask=prepared.mask,
                         pixel_size=prepared.angpix, folder=names.postprocess_directory(iteration),
                         root_name=names.postprocess_root_name(iteration), log=names.postprocess_log(iteration))
    return _outcome(prepared, prepared.postprocessor.postprocess(job))


def _outcome(prepared: Prepared, report: PostprocessReport) -> dict[str, Any]:
    """What the state records of a round, in one format whatever measured it."""
    table = report.fsc_table
    resolution = report.summary.get("final_resolution_angstrom")
    return {
        "resolution_angstrom": float(resolution) if isinstance(resolution, (int, float)) else None,
        "bfactor": float(report.summary.get("bfactor") or 0.0),  # type: ignore[arg-type]
        "fsc_frequency": [float(value) for value in table["shell"].to_numpy() / (report.box * prepared.angpix)],
        "fsc_corrected": [float(value) for value in table["fsc_corrected"].to_numpy()],
        "reconstructor": prepared.reconstructor.describe(),
        "postprocessor": prepared.postprocessor.describe(),
    }


#: The columns of ``PREFIX_iter{i}_realigned_moves.csv`` that hold each particle's new pose (degrees, pixels).
POSE_COLUMNS = {"rot": "new_rot_degrees", "tilt": "new_tilt_degrees", "psi": "new_psi_degrees",
                "origin_x": "new_origin_x_pixels", "origin_y": "new_origin_y_pixels"}


def realign(prepared: Prepared, particles: ParticleSet, iteration: int, progress: ProgressFactory) -> dict[str, Any]:
    """Re-estimate the poses of round ``iteration``'s set by the built-in gold-standard local refinement
    (:func:`cryosieve.align.refine_gold_standard`, ``--realign`` iterations, each half-set against its own half
    map), before its sieve. Writes, all together: the set with its new poses (``PREFIX_iter{i}_realigned``), the
    half maps of those poses (which the sieve scores against), how far each particle moved with its new pose
    (``_realigned_moves.csv``: the poses at full precision, read back by :func:`realigned_particles`) and the
    iterations (``_realigned_iterations.csv``). Returns the outcome the state records."""
    from cryosieve.align import refine_gold_standard
    from cryosieve.backends.builtin import moves_table

    names = prepared.names
    settings = prepared.settings.realign_settings(prepared.symmetry)

    @contextlib.contextmanager
    def labelled(description: str, total: int) -> Iterator[Callable[[int], None]]:
        with progress(f"iter {iteration}: realign: {description}", total) as update:
            yield update

    with StackReader(particles, prepared.settings.directory or None) as reader:
        outcome = refine_gold_standard(particles, reader, prepared.mask.data, settings, labelled)
    refined = outcome.particles
    moves = moves_table(outcome)
    for name, column in POSE_COLUMNS.items():
        moves[column] = getattr(refined, name)
    history = [row for record in outcome.history for row in record.rows()]
    # each half-set's finest step (its own resolution decides it): the smallest it searched with
    finest = {half: min(record.finest_step[half] for record in outcome.history if half in record.finest_step)
              for half in (1, 2)}
    assert refined.random_subset is not None
    own_finest = np.where(refined.random_subset == 1, finest[1], finest[2])
    distance = moves["origin_pixels"].to_numpy()
    moved = (outcome.angle > own_finest) | (distance > MOVED_PIXELS)
    with OutputGroup() as group:
        refined.write_to(group.path_for(names.realigned(iteration)))
        for half in (1, 2):
            write_volume_to(group.path_for(names.realigned_half_map(iteration, half)), outcome.maps[half],
                            prepared.angpix)
        moves.to_csv(group.path_for(names.realigned_moves(iteration)), index=False)  # exact: read back as poses
        pd.DataFrame(history).to_csv(group.path_for(names.realigned_iterations(iteration)), index=False,
                                     float_format="%.6g")
    resolution = outcome.history[-1].resolution if outcome.history else None
    return {"particles": len(refined), "moved": int(np.sum(moved)),
            "finest_step": {str(half): float(step) for half, step in finest.items()},
            "median_angle": float(np.median(outcome.angle)), "median_shift": float(np.median(distance)),
            "resolution_angstrom": None if resolution is None else float(resolution),
            "iterations": len(outcome.history)}


#: A particle counts as moved by ``--realign`` when it turned by more than its half-set's finest step or its
#: origin moved by more than this (pixels).
MOVED_PIXELS = 0.5


def realigned_particles(prepared: Prepared, iteration: int, particles: ParticleSet) -> ParticleSet:
    """``particles`` (round ``iteration``'s set) with the poses :func:`realign` found, read back from
    ``PREFIX_iter{i}_realigned_moves.csv`` (so that a resumed run goes on with exactly the same poses)."""
    path = prepared.names.realigned_moves(iteration)
    if not path.is_file():
        raise CryoSieveInputError(f"{path}: missing, but its realignment is recorded as done; start a new run")
    moves = pd.read_csv(path, keep_default_na=False, dtype={"rlnImageName": str})
    missing = [column for column in ("rlnImageName", *POSE_COLUMNS.values()) if column not in moves.columns]
    if missing or len(moves) != len(particles) or not np.array_equal(
            moves["rlnImageName"].to_numpy(dtype=object), particles.image_name.astype(str)):
        raise CryoSieveInputError(f"{path}: does not list the particles of {prepared.names.star(iteration)}"
                                  + (f" (column {missing[0]} missing)" if missing else ""))
    values = {name: moves[column].to_numpy(dtype=np.float64) for name, column in POSE_COLUMNS.items()}
    return particles.with_poses(**values)


def sieve(prepared: Prepared, particles: ParticleSet, iteration: int, progress: ProgressFactory) -> None:
    """Sieve the particles of round ``iteration`` into the next set, its sieved set and the scores (against the
    half maps of the re-estimated poses with ``--realign``)."""
    names = prepared.names
    cutoff = prepared.schedule[iteration]
    half_map = names.realigned_half_map if prepared.settings.realign else names.half_map
    volumes = [read_volume(half_map(iteration, subset)) for subset in (1, 2)]
    half_set = half_sets(particles, 2)
    check_geometry(particles, prepared.box, volumes, cutoff)
    settings = prepared.settings.sieve_at(cutoff)

    def choosing(description: str, total: int) -> contextlib.AbstractContextManager[Callable[[int], None]]:
        return progress(f"iter {iteration}: {description}", total)

    with StackReader(particles, prepared.settings.directory or None) as reader, \
            progress(f"iter {iteration}: sieve at {cutoff:.2f} Å", len(particles)) as update:
        result = sieve_particles(particles, reader, volumes, prepared.mask, half_set, settings, progress=update,
                                 choosing=choosing)
    write_sieve_outputs(particles, result, names.star(iteration + 1))


def give_back(prepared: Prepared, kept: ParticleSet, last: int) -> dict[str, Any]:
    """The last set (``PREFIX_iter{last}``, ``kept``) and the rest of the input, as an External job of CryoSPARC."""
    from cryosieve.sieve import give_selection_back, uids_of  # only for a selection given back

    assert prepared.returning is not None
    uids = uids_of(prepared.particles)
    job = give_selection_back(prepared.returning, uids, np.isin(uids, uids_of(kept)),
                              f"CryoSieve selection of {Path(prepared.settings.input_star).name} "
                              f"({last} rounds)", [prepared.names.star(last)])
    return {"cryosparc_job": job}


def kept_in(names: OutputNames, iteration: int, particles: ParticleSet) -> np.ndarray:
    """Kept mask ``(n,)`` of sieve ``iteration``, from ``PREFIX_iter{i+1}_scores.csv``."""
    path = names.scores(iteration + 1)
    if not path.is_file():
        raise CryoSieveInputError(f"{path}: missing, but its sieve is recorded as done; start a new run")
    scores = pd.read_csv(path, keep_default_na=False, dtype={"rlnImageName": str})
    if len(scores) != len(particles) or not np.array_equal(scores["rlnImageName"].to_numpy(dtype=object),
                                                           particles.image_name.astype(str)):
        raise CryoSieveInputError(f"{path}: does not list the particles of {names.star(iteration)}")
    result: np.ndarray = scores["kept"].to_numpy(dtype=np.int64).astype(bool)
    return result


def round_summary(prepared: Prepared, iteration: int, particles: ParticleSet, state: State) -> RoundSummary:
    names = prepared.names
    assert particles.random_subset is not None
    summary = RoundSummary(
        iteration=iteration,
        cutoff_angstrom=prepared.schedule[iteration] if iteration < prepared.settings.num_iters
        and state.done(f"sieve {iteration}") else None,
        particles_half1=int(np.sum(particles.random_subset == 1)),
        particles_half2=int(np.sum(particles.random_subset == 2)),
    )
    outcome = state.outcomes.get(f"postprocess {iteration}")
    if outcome is not None:
        resolution = outcome["resolution_angstrom"]
        summary.resolution_angstrom = math.nan if resolution is None else float(resolution)
        summary.bfactor = float(outcome["bfactor"])
        summary.fsc_frequency = np.asarray(outcome["fsc_frequency"], dtype=np.float64)
        summary.fsc_corrected = np.asarray(outcome["fsc_corrected"], dtype=np.float64)
    validated = state.outcomes.get(f"validate {iteration}")
    if validated is not None:
        summary.validated_resolution_angstrom = (math.nan if validated["resolution_angstrom"] is None
                                                 else float(validated["resolution_angstrom"]))
        summary.validated_bfactor = float(validated["bfactor"])
        summary.rh_bfactor = None if validated["rh_bfactor"] is None else float(validated["rh_bfactor"])
        classical = validated.get("rh_bfactor_classical")
        summary.rh_bfactor_classical = None if classical is None else float(classical)
    realigned = state.outcomes.get(f"realign {iteration}")
    if realigned is not None:
        summary.realigned_moved = int(realigned["moved"])
        summary.realigned_median_turn = float(realigned["median_angle"])
        summary.realigned_median_shift = float(realigned["median_shift"])
        summary.realigned_resolution_angstrom = (math.nan if realigned["resolution_angstrom"] is None
                                                 else float(realigned["resolution_angstrom"]))
    summary.view_bins = view_bins(particles.rot, particles.tilt)
    if state.done(f"sieve {iteration}"):
        scores = pd.read_csv(names.scores(iteration + 1), keep_default_na=False, dtype={"rlnImageName": str})
        summary.scores = scores["score"].to_numpy(dtype=np.float64)
        summary.half_set = scores["half_set"].to_numpy(dtype=np.int64)
        summary.kept = scores["kept"].to_numpy(dtype=np.int64).astype(bool)
        summary.depleted_views = depleted_fraction(summary.view_bins, summary.kept)
        retention = retention_path(names.star(iteration + 1))
        ratio = prepared.settings.sieve.retention_ratio
        if ratio == AUTO:
            curve = pd.read_csv(retention)
            summary.retention_curve = (curve["fraction"].to_numpy(dtype=np.float64),
                                       curve["information"].to_numpy(dtype=np.float64))
            summary.retention_ratio = float(curve["fraction"][curve["chosen"] == 1].iloc[0])
        elif not isinstance(ratio, str):
            summary.retention_ratio = float(ratio)
    return summary


def write_best(prepared: Prepared, rounds: list[RoundSummary]) -> list[str]:
    """Copy the best set's particle file to ``PREFIX_best`` (:func:`cryosieve.report.chosen_round`); the report's
    line about it."""
    chosen = chosen_round(rounds)
    if chosen is None:
        return []
    names = prepared.names
    with atomic_path(names.best) as temporary:
        shutil.copyfile(names.star(chosen.iteration), temporary)
    how = "with poses re-estimated" if chosen.validated_resolution_angstrom is not None else \
        "with the given poses (optimistic)"
    log.info("best set: iteration %d (%d particles), by its resolution %s; written to %s", chosen.iteration,
             chosen.particles, how, names.best)
    return [f"Best set: iteration {chosen.iteration} ({chosen.particles} particles), by its resolution {how}; "
            f"written to {names.best.name}."]


def why_stopped(settings: PipelineSettings, stopped: int | None) -> str:
    """The report's line on why the run ended where it did (``stopped``: the round ``--patience`` stopped at)."""
    if stopped is None:
        return (f"The run made every one of the {settings.num_iters} rounds asked for (--num_iters); set "
                f"{settings.num_iters} is the last kept set.")
    return (f"Stopped at round {stopped} by --patience {settings.patience}: the resolution had not improved for "
            f"{settings.patience} rounds, so set {stopped} was measured but not sieved (at most {settings.num_iters} "
            "rounds were asked for).")


def stalled(rounds: list[RoundSummary], patience: int, validated: bool) -> bool:
    """Whether the last ``patience`` rounds measured no better resolution than the best before them."""
    def resolution(summary: RoundSummary) -> float:
        value = summary.validated_resolution_angstrom if validated else summary.resolution_angstrom
        return math.inf if value is None or not math.isfinite(value) else float(value)

    if len(rounds) <= patience:
        return False
    before = min(resolution(summary) for summary in rounds[:-patience])
    return all(resolution(summary) >= before for summary in rounds[-patience:])
