"""Refinement by a running CryoSPARC (``cryosieve-csrefine``, ``--backend cryosparc``,
``cryosieve --validate cryosparc``).

Each refinement job makes the CryoSPARC jobs of :func:`cryosieve.cryosparc.graph.refinement_graph`
in the given project and workspace, queues them on the lane, and waits. What it reports is read
from the last refinement's outputs through the client, not from its event log's text: the
particles refined are its ``particles`` output (saved beside the job as ``alignments3D.cs``), and
the resolution and B-factor are those of the built-in post-processing (FSC 0.143 of the
phase-randomisation-corrected FSC, as ``relion_postprocess``) of its ``volume`` output's half maps
(``map_half_A``, ``map_half_B``) with its FSC mask (``mask_fsc_auto``, else ``mask_fsc``) or ``--mask``.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cryosieve.backends import RefinementJob, RefinementResult
from cryosieve.backends.builtin import measure_half_maps, result_of
from cryosieve.cryosparc import session
from cryosieve.cryosparc.connection import Connection, connect
from cryosieve.cryosparc.graph import PlannedJob, RefinementOptions, refinement_graph
from cryosieve.cryosparc.session import check_target, create_job, queue_and_wait, subset_job
from cryosieve.cryosparc.source import parse_source_job, source_job_of
from cryosieve.errors import CryoSieveInputError
from cryosieve.io.atomic import write_text_atomic
from cryosieve.io.mrc import write_volume
from cryosieve.io.particle_files import format_of
from cryosieve.progress import ProgressFactory

log = logging.getLogger("cryosieve")


class JobTally:
    """How many CryoSPARC jobs a run makes, has made and has seen complete (for its log lines)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
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
    their path when ``None``); ``device``: of the built-in post-processing; ``poll_seconds``: between
    looks at a running job (``None``: ``session.POLL_SECONDS``); ``client_class``:
    ``cryosparc.tools.CryoSPARC`` (``None``) or a class with its interface.
    """

    connection: Connection
    project: str
    workspace: str
    options: RefinementOptions
    source_job: str | None = None
    device: Any = "cpu"
    poll_seconds: float | None = None
    client_class: Any = None
    tally: JobTally = field(default_factory=JobTally, compare=False, repr=False)

    remote = True

    def describe(self) -> str:
        kind = "non-uniform" if self.options.nu else "homogeneous"
        local = f" then local (min. step {self.options.min_angular_step:g}°)" if self.options.local else ""
        return (f"CryoSPARC {kind} refinement{local} in {self.project} {self.workspace} on lane "
                f"{self.options.lane} ({self.connection.describe()})")

    def _client(self) -> Any:
        return connect(self.connection, self.client_class)

    def prepare(self, sources: list[Path], dry_run: bool) -> None:
        for path in sources:
            if format_of(path) == "cs":
                source_job_of(path, self.source_job)
        if not dry_run:
            check_target(self._client(), self.project, self.workspace, self.options.lane, self.connection.scrub)

    def expect(self, sets: int) -> None:
        per_set = len(refinement_graph(star=Path("particles.star"), blob_folder=Path("."), source=None, reference=None,
                                       symmetry="C1", ini_high=30.0, options=self.options))
        with self.tally.lock:
            self.tally.total = sets * per_set

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
        client = self._client()
        made: dict[str, Any] = {}
        record: dict[str, str] = {}

        def remember() -> None:
            write_text_atomic(job.folder / "cryosparc_jobs.json", json.dumps(
                {"project": self.project, "workspace": self.workspace, "jobs": record}, indent=2) + "\n")

        title = f"cryosieve {job.log.name.removesuffix('.program.txt')}"  # the job's name
        for planned in self.graph(job):
            if planned.kind == "external":
                assert job.particles_cs is not None
                from cryosieve.io.cs import load_dataset

                uids = np.asarray(load_dataset(job.particles_cs)["uid"])
                source = parse_source_job(str(planned.params["passthrough_of"]))
                made[planned.step] = subset_job(client, self.project, self.workspace, source, uids, ["particles"],
                                                f"{title}: particles")
            else:
                connections = {name: (str(made[step].uid), output) for name, (step, output)
                               in planned.connections.items()}
                made[planned.step] = create_job(client, self.project, self.workspace, planned.kind, connections,
                                                planned.params, f"{title}: {planned.step}")
            record[planned.step] = str(made[planned.step].uid)
            remember()
            log.info("CryoSPARC job %s %s (%s) made, %s", self.project, made[planned.step].uid, planned.kind,
                     self.tally.count("made"))
            if planned.kind != "external":
                queue_and_wait(made[planned.step], self.project, planned.kind, planned.lane, stop,
                               session.POLL_SECONDS if self.poll_seconds is None else self.poll_seconds)
            log.info("CryoSPARC job %s %s (%s) completed, %s", self.project, made[planned.step].uid, planned.kind,
                     self.tally.count("done"))
        return self._measure(client, made["local" if self.options.local else "refine"], job)

    def _measure(self, client: Any, refined: Any, job: RefinementJob) -> RefinementResult:
        volume = refined.load_output("volume")
        fields = set(volume.fields())
        mask_field = next((name for name in ("mask_fsc_auto/path", "mask_fsc/path") if name in fields), None)
        for name in ("map_half_A/path", "map_half_B/path"):
            if name not in fields:
                raise CryoSieveInputError(f"CryoSPARC job {self.project} {refined.uid}: its volume output has no "
                                          f"{name.split('/')[0]}")
        files = {"map_half_A/path": "half1.mrc", "map_half_B/path": "half2.mrc"}
        if job.mask is None and mask_field is not None:
            files[mask_field] = "mask_fsc.mrc"
        for name, file in files.items():
            _, data = client.download_mrc(self.project, str(volume[name][0]))
            write_volume(job.folder / file, np.asarray(data, dtype=np.float32), job.pixel_size)
        if job.mask is None and mask_field is not None:
            job = replace(job, mask=job.folder / "mask_fsc.mrc")
        report = measure_half_maps((job.folder / "half1.mrc", job.folder / "half2.mrc"), job, self.device)
        particles = refined.load_output("particles", slots=["alignments3D"])
        particles.save(str(job.folder / "alignments3D.cs"))
        return result_of(report, len(particles), "alignments3D.cs", fixed_pose=False)
