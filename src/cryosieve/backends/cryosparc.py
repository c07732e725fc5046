"""Refinement by a running CryoSPARC (``cryosieve-csrefine``, ``--backend cryosparc``,
``cryosieve --validate cryosparc``).

Each refinement job makes the CryoSPARC jobs of :func:`cryosieve.cryosparc.graph.refinement_graph`
in the given project and workspace, queues them on the lane, and waits. As the original 1.3.3, the
particles (an import, or an External job of a ``.cs`` input's rows) and the ab-initio reference are made
once per set and shared by its trials (:attr:`cryosieve.backends.RefinementJob.group`), an imported
reference once per run. What it reports is read from the last refinement's outputs through the client,
not from its event log's text: the particles refined are its ``particles`` output (saved beside the job as
``alignments3D.cs``), and the resolution and B-factor are those of the built-in post-processing (FSC 0.143
of the phase-randomisation-corrected FSC, as ``relion_postprocess``) of its ``volume`` output's half maps
(``map_half_A``, ``map_half_B``) with its FSC mask (``mask_fsc_auto``, else ``mask_fsc``) or ``--mask``.

All the threads of a run share one session (:class:`cryosieve.cryosparc.session.Session`). A run that
stops because a job failed, or because the user interrupted, kills the jobs still running; a run that
stops because CryoSPARC stopped answering leaves them as they are.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cryosieve.backends import RefinementJob, RefinementResult
from cryosieve.backends.builtin import measure_half_maps, result_of
from cryosieve.cryosparc.connection import Connection
from cryosieve.cryosparc.graph import PlannedJob, RefinementOptions, refinement_graph
from cryosieve.cryosparc.session import Session, Stopped, connect
from cryosieve.cryosparc.source import parse_source_job, source_job_of
from cryosieve.errors import CryoSieveInputError
from cryosieve.io.atomic import write_text_atomic
from cryosieve.io.mrc import write_volume
from cryosieve.io.particle_files import format_of
from cryosieve.progress import ProgressFactory

log = logging.getLogger("cryosieve")

#: The volume output's slots read, the half maps first; then the FSC masks, the first present used.
HALF_MAPS = ("map_half_A", "map_half_B")
FSC_MASKS = ("mask_fsc_auto", "mask_fsc")


class _Shared:
    """A job made once and used by several refinements: set when made (``uid``) or failed (``error``)."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.uid: str | None = None
        self.failed = False


class RunState:
    """What the threads of a run share: the session, the shared jobs, and the counts of jobs made and
    completed (for the log lines)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.session: Session | None = None
        self.shared: dict[tuple[str, ...], _Shared] = {}
        self.total = 0
        self.made = 0
        self.done = 0

    def count(self, what: str) -> str:
        """Count one more job made (``what="made"``) or completed (``"done"``); ``"k/total"``."""
        with self.lock:
            setattr(self, what, getattr(self, what) + 1)
            return f"{getattr(self, what)}/{self.total}"


@dataclass(frozen=True)
class CryoSparcRefiner:
    """Refines with CryoSPARC in ``project`` / ``workspace`` (see the module docstring).

    ``source_job``: for ``.cs`` inputs, the job (``J42[.output]``) whose particles they are (read from
    their path when ``None``); ``device``: of the built-in post-processing; ``connector``: how to connect
    (:func:`cryosieve.cryosparc.session.connect` when ``None``).
    """

    connection: Connection
    project: str
    workspace: str
    options: RefinementOptions
    source_job: str | None = None
    device: Any = "cpu"
    connector: Callable[[Connection], Session] | None = None
    state: RunState = field(default_factory=RunState, compare=False, repr=False)

    remote = True

    def describe(self) -> str:
        kind = "non-uniform" if self.options.nu else "homogeneous"
        local = f" then local (min. step {self.options.min_angular_step:g}°)" if self.options.local else ""
        return (f"CryoSPARC {kind} refinement{local} in {self.project} {self.workspace} on lane "
                f"{self.options.lane} ({self.connection.describe()})")

    def session(self) -> Session:
        """The run's session (connected on first use)."""
        with self.state.lock:
            if self.state.session is None:
                self.state.session = (self.connector or connect)(self.connection)
            return self.state.session

    def prepare(self, sources: list[Path], dry_run: bool) -> None:
        cs_sources = {source_job_of(path, self.source_job) for path in sources if format_of(path) == "cs"}
        if self.source_job and not sources:
            cs_sources.add(parse_source_job(self.source_job))
        if not dry_run:
            session = self.session()
            session.check_target(self.project, self.workspace, self.options.lane)
            for job, _ in sorted(cs_sources):
                session.find_job(self.project, job)

    def expect(self, groups: Sequence[str]) -> None:
        graph = refinement_graph(star=Path("particles.star"), blob_folder=Path("."), source=None, reference=None,
                                 symmetry="C1", ini_high=None, options=self.options)
        per = {kind: sum(planned.shared == kind for planned in graph) for kind in ("set", "run", None)}
        with self.state.lock:
            self.state.total = (len(set(groups)) * per["set"] + per["run"] + len(groups) * per[None])

    def for_origin(self, path: Path) -> CryoSparcRefiner:
        if format_of(path) != "cs" or self.source_job:
            return self
        job, output = source_job_of(path, None)
        return replace(self, source_job=f"{job}.{output}")

    def graph(self, job: RefinementJob) -> list[PlannedJob]:
        """The CryoSPARC jobs of ``job``, in order."""
        from_cs = job.particles_cs is not None
        source = source_job_of(job.source or job.particles_cs or job.particles_star, self.source_job) \
            if from_cs else None
        return refinement_graph(star=None if from_cs else job.particles_star,
                                blob_folder=job.directory or Path.cwd(), source=source, reference=job.reference,
                                symmetry=job.symmetry, ini_high=job.ini_high, options=self.options)

    def plan(self, job: RefinementJob) -> list[str]:
        lines = [planned.describe() for planned in self.graph(job)]
        last = "local" if self.options.local else "refine"
        return [*lines, f"measure: {last}.particles, and built-in post-processing of {last}.volume's half maps with "
                        + (f"mask {job.mask}" if job.mask else "its FSC mask")]

    def refine(self, job: RefinementJob, progress: ProgressFactory) -> RefinementResult:
        return self.refine_until(job, threading.Event())

    def refine_until(self, job: RefinementJob, stop: threading.Event) -> RefinementResult:
        session = self.session()
        made: dict[str, str] = {}

        def remember() -> None:
            write_text_atomic(job.folder / "cryosparc_jobs.json", json.dumps(
                {"project": self.project, "workspace": self.workspace, "jobs": made}, indent=2) + "\n")

        name = job.log.name.removesuffix(".program.txt")
        for planned in self.graph(job):
            title = f"cryosieve {name}: {planned.step}"
            if planned.shared is None:
                made[planned.step] = self._make(session, planned, made, job, title, stop)
            else:
                # a set's steps are one per group (their STAR files are the trials' copies of the same rows);
                # the run's by their parameters (the reference map)
                identity = (job.group or name) if planned.shared == "set" else \
                    json.dumps(planned.params, sort_keys=True, default=str)
                key = (planned.shared, identity, planned.step, planned.kind)
                made[planned.step] = self._shared(key, functools.partial(self._make, session, planned, made, job,
                                                                         title, stop), stop)
            remember()
        last = made["local" if self.options.local else "refine"]
        return self._measure(session, session.find_job(self.project, last), job)

    def _shared(self, key: tuple[str, ...], make: Callable[[], str], stop: threading.Event) -> str:
        """The job of ``key``, made by the first refinement that needs it; the others wait for it."""
        with self.state.lock:
            entry = self.state.shared.get(key)
            owner = entry is None
            if entry is None:
                entry = self.state.shared[key] = _Shared()
        if owner:
            try:
                entry.uid = make()
            except BaseException:
                entry.failed = True
                raise
            finally:
                entry.done.set()
            return entry.uid
        while not entry.done.wait(0.05):
            if stop.is_set():
                raise Stopped("waiting for a shared job")
        if entry.failed or entry.uid is None:
            stop.wait()  # the refinement that made it reports why; this one stops with the run
            raise Stopped("a shared job failed")
        return entry.uid

    def _make(self, session: Session, planned: PlannedJob, made: dict[str, str], job: RefinementJob, title: str,
              stop: threading.Event) -> str:
        """Make, queue and wait for one planned job; its id."""
        if planned.kind == "external":
            assert job.particles_cs is not None
            from cryosieve.io.cs import load_dataset

            uids = np.asarray(load_dataset(job.particles_cs)["uid"])
            source = parse_source_job(str(planned.params["passthrough_of"]))
            uid = session.subset_job(self.project, self.workspace, source, [("particles", uids)], title)
            log.info("CryoSPARC job %s %s (External, %d particles of %s.%s) made, %s", self.project, uid, len(uids),
                     *source, self.state.count("made"))
            self.state.count("done")
            return uid
        connections = {name: (made[step], output) for name, (step, output) in planned.connections.items()}
        handle = session.make_job(self.project, self.workspace, planned.kind, connections, planned.params, title)
        log.info("CryoSPARC job %s %s (%s) made, %s", self.project, handle.uid, planned.kind,
                 self.state.count("made"))
        session.queue(handle, self.project, planned.kind, planned.lane)
        session.wait(handle, self.project, planned.kind, stop)
        log.info("CryoSPARC job %s %s (%s) completed, %s", self.project, handle.uid, planned.kind,
                 self.state.count("done"))
        return str(handle.uid)

    def _measure(self, session: Session, refined: Any, job: RefinementJob) -> RefinementResult:
        results = [name for name, _, _ in session.output_results(refined, self.project, "volume")]
        for name in HALF_MAPS:
            if name not in results:
                raise CryoSieveInputError(f"CryoSPARC job {self.project} {refined.uid}: its volume output has no "
                                          f"{name}")
        mask_field = next((name for name in FSC_MASKS if name in results), None) if job.mask is None else None
        slots = [*HALF_MAPS, *([mask_field] if mask_field else [])]
        volume = session.load_output(refined, self.project, "volume", slots)
        files = {"map_half_A": "half1.mrc", "map_half_B": "half2.mrc", **({mask_field: "mask_fsc.mrc"}
                                                                           if mask_field else {})}
        for name, file in files.items():
            path = volume[f"{name}/path"][0]
            data = session.download_mrc(self.project, path.decode() if isinstance(path, bytes) else str(path))
            write_volume(job.folder / file, np.asarray(data, dtype=np.float32), job.pixel_size)
        if mask_field is not None:
            job = replace(job, mask=job.folder / "mask_fsc.mrc")
        report = measure_half_maps((job.folder / "half1.mrc", job.folder / "half2.mrc"), job, self.device)
        particles = session.load_output(refined, self.project, "particles", ["alignments3D"])
        particles.save(str(job.folder / "alignments3D.cs"))
        return result_of(report, len(particles), "alignments3D.cs", fixed_pose=False)
