"""Running the pipeline: the step runner, the log file, resuming (:func:`run_pipeline`)."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cryosieve.errors import setting
from cryosieve.io.atomic import remove_stale_temporaries
from cryosieve.io.lock import exclusive_lock
from cryosieve.pipeline.prepare import Prepared, prepare
from cryosieve.pipeline.settings import PipelineSettings
from cryosieve.pipeline.state import GIVE_BACK, STACKS, State, open_state, step_names
from cryosieve.progress import ProgressFactory, no_progress
from cryosieve.report import ReportPaths, RoundSummary, best_round, write_report

log = logging.getLogger("cryosieve")


@dataclass
class PipelineResult:
    """What a finished run produced: one summary per set (``num_iters + 1``) and the report files."""

    rounds: list[RoundSummary]
    report: ReportPaths
    computed_steps: list[str] = field(default_factory=list)
    skipped_steps: list[str] = field(default_factory=list)


#: The last step of a run whose selection goes back to CryoSPARC.

@contextlib.contextmanager
def _log_to_file(path: Path) -> Iterator[None]:
    """Every log line of the run, debug lines included, appended to ``path``."""
    handler = logging.FileHandler(path, mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    handler.setLevel(logging.DEBUG)
    previous_level = log.level
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()
        log.setLevel(previous_level)


def run_pipeline(settings: PipelineSettings, *, resume: bool = False,
                 progress: ProgressFactory | None = None,
                 checkpoint: Callable[[], None] | None = None) -> PipelineResult:
    """Run (or, with ``resume``, continue) the iterative sieve; returns the summaries and report paths.

    Parameters
    ----------
    settings:
        The run's settings.
    resume:
        Continue the run recorded in ``PREFIX_state.json``.
    progress:
        Progress reporting (:data:`cryosieve.progress.ProgressFactory`).
    checkpoint:
        Called before every step; it may raise to stop the run there (the command line
        stops an interrupted run this way even if the first interrupt was swallowed).

    Raises
    ------
    CryoSieveInputError
        Bad input, an output that would overwrite an input, an unwritable output location,
        another run working on the same prefix, an existing run without ``resume`` or changed
        settings with it (all before any output is written).
    cryosieve.errors.ExternalCommandError
        An external program failed (the run can be continued after fixing the cause).
    """
    progress = progress or no_progress
    checkpoint = checkpoint or (lambda: None)
    prepared = prepare(settings)
    _state(prepared, resume)  # refuse early, before the output folder is made
    names = prepared.names
    folder = names.state.parent
    made_folder = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive_lock(names.lock, f"{setting('output_prefix')} {settings.output_prefix}"):
            state = _state(prepared, resume)  # again, now that no other run can change it
            if not state.path.exists():
                state.save()
            made_folder = False
            return _Run(prepared, state, progress, checkpoint).run(resume)
    finally:
        if made_folder:
            with contextlib.suppress(OSError):
                folder.rmdir()


def _state(prepared: Prepared, resume: bool) -> State:
    """The run's state (:func:`cryosieve.pipeline.state.open_state`)."""
    steps = step_names(prepared.settings.num_iters, prepared.validator is not None, prepared.returning is not None,
                       prepared.settings.realign > 0)
    return open_state(prepared.names.state, prepared.record, resume, steps, prepared.settings.command_line)


class _Run:
    """The steps of one run, through one step runner."""

    def __init__(self, prepared: Prepared, state: State, progress: ProgressFactory,
                 checkpoint: Callable[[], None]) -> None:
        self.prepared, self.state, self.progress, self.checkpoint = prepared, state, progress, checkpoint
        self.computed: list[str] = []
        self.skipped: list[str] = []

    def step(self, name: str, action: Callable[[], dict[str, Any] | None]) -> None:
        """Run ``action`` unless ``name`` is recorded as done; record it with what it measured."""
        if self.state.done(name):
            self.skipped.append(name)
            return
        self.checkpoint()
        started = time.perf_counter()
        outcome = action()
        self.state.record(name, outcome)
        self.computed.append(name)
        log.info("%s: done in %.1f s", name, time.perf_counter() - started)

    def run_facts(self) -> dict[str, str]:
        """What the report shows of the run at its top: version, the command that started it, its inputs (the
        same when it was interrupted and resumed: the outputs do not depend on it)."""
        from cryosieve import __version__

        record = self.prepared.record
        facts = {"cryosieve": __version__, "command": self.state.command or "(library call)",
                 "particles": str(record["input_star"]), "mask": str(record["mask"]),
                 "images relative to": str(record["directory"]), "pixel size": f"{record['angpix']:g} Å",
                 "symmetry": str(record["symmetry"]), "reconstruction": str(record["reconstructor"]),
                 "post-processing": str(record["postprocessor"])}
        return facts

    def run(self, resume: bool) -> PipelineResult:
        # the steps load torch and the back-ends: imported once every input is checked (prepare)
        from cryosieve.pipeline import rounds
        from cryosieve.pipeline.validation import validate

        prepared, state = self.prepared, self.state
        settings, names = prepared.settings, prepared.names
        with _log_to_file(names.log):
            log.info("cryosieve %s: %s", "continuing" if resume else "starting",
                     " ".join(f"{key}={value}" for key, value in prepared.record.items()
                              if "sha256" not in key and key != STACKS))
            if state.completed:
                log.info("already done: %s", ", ".join(state.completed))
            # Under the lock no other run writes here: every temporary of ours is left by a killed run.
            for path in remove_stale_temporaries(names.state.parent, names.owns, any_owner=True):
                log.info("removed %s, left by an interrupted run", path)
            self.step("prepare", lambda: rounds.write_iter0(prepared))
            particles = prepared.particles.subset(prepared.rows0)  # the set PREFIX_iter0 holds
            summaries: list[RoundSummary] = []
            stopped: int | None = None
            validated = settings.validator is not None
            if settings.patience is not None and not validated:
                log.warning("--patience without --validate: rounds are compared by their resolution with the given "
                            "poses, which is optimistic")
            last = settings.num_iters
            for iteration in range(settings.num_iters):
                assert particles.random_subset is not None
                log.info("[ITER %d] %d particles (half-sets %d + %d); cut-off %.3f Å", iteration, len(particles),
                         int(np.sum(particles.random_subset == 1)), int(np.sum(particles.random_subset == 2)),
                         prepared.schedule[iteration])
                # each step runs at once; partial binds this round's particles and iteration
                self.step(f"reconstruct {iteration}",
                          functools.partial(rounds.reconstruct, prepared, particles, iteration, self.progress))
                self.step(f"postprocess {iteration}", functools.partial(rounds.postprocess, prepared, iteration))
                outcome = state.outcomes[f"postprocess {iteration}"]
                log.info("[ITER %d] resolution %s Å, B-factor %.1f Å^2", iteration,
                         "-" if outcome["resolution_angstrom"] is None else f"{outcome['resolution_angstrom']:.2f}",
                         outcome["bfactor"])
                if settings.validator is not None:
                    self.step(f"validate {iteration}", functools.partial(validate, prepared, iteration, self.progress))
                current = rounds.round_summary(prepared, iteration, particles, state)
                if settings.patience is not None and rounds.stalled([*summaries, current], settings.patience,
                                                                    validated):
                    # this set is measured, and no sieve of it is needed: the run ends with it
                    summaries.append(current)
                    stopped = last = iteration
                    log.info("[ITER %d] no better resolution for %d rounds: stopping before this set's sieve",
                             iteration, settings.patience)
                    break
                if settings.realign:  # poses re-estimated before the sieve: it scores against them
                    self.step(f"realign {iteration}",
                              functools.partial(rounds.realign, prepared, particles, iteration, self.progress))
                    particles = rounds.realigned_particles(prepared, iteration, particles)
                self.step(f"sieve {iteration}",
                          functools.partial(rounds.sieve, prepared, particles, iteration, self.progress))
                summaries.append(rounds.round_summary(prepared, iteration, particles, state))
                particles = particles.subset(rounds.kept_in(names, iteration, particles))
                log.info("[ITER %d] kept %d particles (half-sets %d + %d)", iteration, len(particles),
                         int(np.sum(particles.random_subset == 1)), int(np.sum(particles.random_subset == 2)))
                self.checkpoint()
                upcoming = rounds.round_summary(prepared, iteration + 1, particles, state)
                write_report(names.prefix, [*summaries, upcoming], plots=settings.report,
                             validation=prepared.record["validator"], run=self.run_facts())
            if stopped is None:
                if settings.validator is not None:
                    self.step(f"validate {last}", functools.partial(validate, prepared, last, self.progress))
                summaries.append(rounds.round_summary(prepared, last, particles, state))
            if prepared.returning is not None:
                self.step(GIVE_BACK, functools.partial(rounds.give_back, prepared, particles, last))
            notes = [rounds.why_stopped(settings, stopped)]
            log.info(notes[0])
            notes += rounds.write_best(prepared, summaries)
            report = write_report(names.prefix, summaries, plots=settings.report,
                                  validation=prepared.record["validator"], notes=notes, run=self.run_facts())
            best = best_round(summaries)
            if best is not None:
                log.info("best resolution %.2f Å at iteration %d (%d particles); summary %s",
                         best.resolution_angstrom, best.iteration, best.particles, report.summary_csv)
        return PipelineResult(rounds=summaries, report=report, computed_steps=self.computed, skipped_steps=self.skipped)
