"""Refinement jobs: planned, run in parallel in worker processes, each in a folder of its own.

Each job refines one particle set (an input, or a random subset of one for the
Rosenthal-Henderson fit) with a :class:`~cryosieve.backends.Refiner`. A job runs in a worker
process (``python -m cryosieve.refine.worker FOLDER``) in a temporary folder beside its final
one, which is renamed when the job has written ``result.json``: a job folder is whole or
absent. A folder whose ``job.json`` records the same job is not recomputed, so running a
command again resumes it; one that records another job (other settings) is refused. Up to
``workers`` jobs run at once (under ``torchrun``, a refiner that ``uses_job_ranks`` runs its jobs one after
the other in rank 0's process, handing their work out to every rank); a failing job stops the others and
names its log, which stays beside the job folders (``NAME.log``, and ``NAME.program.txt`` for an external program's
output). A worker reports its error through a pipe, not a file, so that a full disk is reported
as one (``OSError`` ``ENOSPC`` naming the job's folder) instead of as an empty log; so is an
external program that failed while the disk holding its job was full. The worker processes run
in process groups of their own and die with the command.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np

from cryosieve import processes
from cryosieve.backends import RefinementJob, RefinementResult, Refiner, RemoteRefiner, is_remote
from cryosieve.errors import CryoSieveInputError, ExternalCommandError
from cryosieve.io.atomic import OutputGroup, remove_stale_temporaries, write_text_atomic
from cryosieve.io.lock import exclusive_lock
from cryosieve.io.particle_files import format_of, in_format_of, read_particle_file
from cryosieve.io.paths import disk_full, no_space_error
from cryosieve.progress import ProgressFactory, no_progress
from cryosieve.world import current as current_world

#: How often the runner looks at its workers (seconds).
POLL_INTERVAL = 0.1
#: Seconds a stopped worker gets before SIGKILL.
STOP_GRACE = 5.0


@dataclass(frozen=True)
class JobSpec:
    """One refinement to run.

    ``name``: its folder's name; ``source``: the input STAR file (absolute); ``trial``: 0-based;
    ``level``: halving level of a Rosenthal-Henderson subset (0: the whole input); ``rows``: the
    input's rows it refines (``None``: all); ``halves``: new half-sets for those rows
    (``--resplit``), or ``None`` to keep ``rlnRandomSubset``; ``seed``: the back-end's.
    """

    name: str
    source: Path
    trial: int
    level: int
    seed: int
    rows: np.ndarray | None = None
    halves: np.ndarray | None = None


@dataclass(frozen=True)
class JobSettings:
    """What every job of a command shares (see :class:`~cryosieve.backends.RefinementJob`)."""

    directory: Path | None
    symmetry: str
    reference: Path | None
    ini_high: float | None
    mask: Path | None
    particle_diameter: float | None
    local: bool
    passthrough: tuple[Path, ...] = ()  # further .cs files of the particles of a .cs input


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _array_sha256(values: np.ndarray | None) -> str | None:
    if values is None:
        return None
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.int64).tobytes()).hexdigest()


def job_record(spec: JobSpec, settings: JobSettings, refiner: Refiner) -> dict[str, Any]:
    """What ``job.json`` records of a job: a folder is reused only for the same record."""
    def file(path: Path | None) -> dict[str, str] | None:
        return None if path is None else {"path": str(path), "sha256": _sha256(path)}

    return {
        "input": file(spec.source), "trial": spec.trial, "level": spec.level, "seed": spec.seed,
        "rows_sha256": _array_sha256(spec.rows), "halves_sha256": _array_sha256(spec.halves),
        "refiner": refiner.describe(), "directory": str(settings.directory) if settings.directory else None,
        "symmetry": settings.symmetry, "reference": file(settings.reference), "ini_high": settings.ini_high,
        "mask": file(settings.mask), "particle_diameter": settings.particle_diameter, "local": settings.local,
        "passthrough": [file(path) for path in settings.passthrough],
    }


def group_of(spec: JobSpec) -> str:
    """The particles a job refines, whatever its trial: its input and rows (jobs of one group may share work,
    :attr:`~cryosieve.backends.RefinementJob.group`)."""
    return f"{spec.source}#{_array_sha256(spec.rows) or 'all'}"


def _log(root: Path, spec: JobSpec) -> Path:
    return root / f"{spec.name}.log"


def _program_log(root: Path, spec: JobSpec) -> Path:
    return root / f"{spec.name}.program.txt"


def refinement_job(spec: JobSpec, settings: JobSettings, folder: Path, root: Path, box: int,
                   pixel_size: float) -> RefinementJob:
    """The back-end's job for ``spec`` in ``folder``."""
    return RefinementJob(particles_star=folder / "particles.star", folder=folder, directory=settings.directory,
                         symmetry=settings.symmetry, pixel_size=pixel_size, box=box, reference=settings.reference,
                         ini_high=settings.ini_high, mask=settings.mask, particle_diameter=settings.particle_diameter,
                         local=settings.local, seed=spec.seed, log=_program_log(root, spec), source=spec.source,
                         particles_cs=folder / "particles.cs" if format_of(spec.source) == "cs" else None,
                         group=group_of(spec))


def plan(specs: Sequence[JobSpec], settings: JobSettings, refiner: Refiner, root: Path) -> list[str]:
    """What running the jobs would do, a line or more per job (nothing is run or written)."""
    lines = []
    for spec in specs:
        particles = read_particle_file(spec.source, None, tuple(str(path) for path in settings.passthrough))
        count = len(particles) if spec.rows is None else len(spec.rows)
        box = int(particles.image_size[0]) if particles.image_size is not None else 0
        job = refinement_job(spec, settings, root / spec.name, root, box, float(particles.pixel_size[0]))
        state = "done, kept" if (root / spec.name / "result.json").is_file() else "to run"
        lines.append(f"job {spec.name}: {count} particles of {spec.source} (trial {spec.trial + 1}, halving "
                     f"{spec.level}, seed {spec.seed}; {state})")
        lines += [f"  {step}" for step in refiner.plan(job)]
    return lines


def _reusable(folder: Path, record: dict[str, Any]) -> RefinementResult | None:
    """The result of a finished folder of the same job; ``None`` if there is no folder; refused if it is
    another job's."""
    if not folder.exists():
        return None
    try:
        recorded = json.loads((folder / "job.json").read_text())
        result = json.loads((folder / "result.json").read_text())
    except (OSError, ValueError) as error:
        raise CryoSieveInputError(f"{folder}: not a finished job folder of this program ({error}); remove it or "
                                  "choose another output") from None
    if recorded != json.loads(json.dumps(record)):
        raise CryoSieveInputError(f"{folder}: made by a run with other settings or inputs; remove it or choose "
                                  "another output")
    return RefinementResult(**result)


class _Running:
    """A job in a worker process, in its temporary folder; ``report``: the reading end of the pipe its
    error comes through (see :func:`work`)."""

    def __init__(self, spec: JobSpec, group: OutputGroup, folder: Path, process: subprocess.Popen[bytes],
                 log: Any, report: int) -> None:
        self.spec, self.group, self.folder, self.process, self.log = spec, group, folder, process, log
        self.report, self.received = report, bytearray()

    def collect(self) -> None:
        """Read what the worker has reported so far (it never waits on a full pipe)."""
        while self.report >= 0:
            try:
                chunk = os.read(self.report, 1 << 16)
            except BlockingIOError:
                return
            if not chunk:  # the worker is gone
                os.close(self.report)
                self.report = -1
                return
            self.received += chunk

    def close(self) -> None:
        self.log.close()
        if self.report >= 0:
            os.close(self.report)
            self.report = -1

    def error(self) -> BaseException | None:
        """The exception the worker reported, if it could."""
        self.collect()
        with contextlib.suppress(pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError,
                                 ValueError):
            error = pickle.loads(bytes(self.received)) if self.received else None
            return error if isinstance(error, BaseException) else None
        return None


def run(specs: Sequence[JobSpec], settings: JobSettings, refiner: Refiner, root: Path, *, workers: int | None = 1,
        progress: ProgressFactory = no_progress) -> dict[str, RefinementResult]:
    """Run every job not done yet, up to ``workers`` at once, in folders ``root / name``; returns every
    job's result by name.

    Raises :class:`~cryosieve.errors.ExternalCommandError` naming a failed job's log,
    :class:`CryoSieveInputError` for a job's bad input, and stops every other job first.
    """
    if workers is None:
        workers = max(1, len(specs))  # every job at once
    if workers < 1:
        raise CryoSieveInputError("workers must be at least 1")
    results: dict[str, RefinementResult] = {}
    pending: list[tuple[JobSpec, dict[str, Any]]] = []
    for spec in specs:
        record = job_record(spec, settings, refiner)
        done = _reusable(root / spec.name, record)
        if done is not None:
            results[spec.name] = done
        else:
            pending.append((spec, record))
    if not pending:
        return results
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / ".lock", str(root)), progress("refinement jobs", len(specs)) as update:
        update(len(results))
        remove_stale_temporaries(root, lambda name: True, any_owner=True)  # under the lock: of killed runs
        if is_remote(refiner):
            _run_in_threads(pending, settings, cast(RemoteRefiner, refiner), root, workers, results, update)
            return results
        if getattr(refiner, "uses_job_ranks", False) and current_world().distributed:
            _run_here(pending, settings, refiner, root, results, update)
            return results
        running: list[_Running] = []
        try:
            while pending or running:
                while pending and len(running) < workers:
                    spec, record = pending.pop(0)
                    running.append(_start(spec, record, settings, refiner, root))
                time.sleep(POLL_INTERVAL)
                for job in list(running):
                    job.collect()
                    code = job.process.poll()
                    if code is None:
                        continue
                    running.remove(job)
                    job.collect()
                    job.close()
                    if code != 0:
                        _stop(running)
                        raise _failure(job, root)
                    job.group.commit()
                    results[job.spec.name] = RefinementResult(
                        **json.loads((root / job.spec.name / "result.json").read_text()))
                    update(1)
        finally:
            _stop(running)
    return results


def _prepare(spec: JobSpec, record: dict[str, Any], settings: JobSettings, folder: Path, root: Path
             ) -> RefinementJob:
    """Write the job's particles (STAR, and ``.cs`` for a ``.cs`` input) and ``job.json`` into ``folder``."""
    particles = read_particle_file(spec.source, None, tuple(str(path) for path in settings.passthrough))
    subset = particles if spec.rows is None else particles.subset(spec.rows)
    if spec.halves is not None:
        subset = subset.with_halves(spec.halves)
    in_format_of(subset, folder / "particles.star").write_to(folder / "particles.star")
    box = int(subset.image_size[0]) if subset.image_size is not None else 0
    job = refinement_job(spec, settings, folder, root, box, float(subset.pixel_size[0]))
    if job.particles_cs is not None:
        subset.write_to(job.particles_cs)
    (folder / "job.json").write_text(json.dumps(record, indent=2) + "\n")
    return job


def _named(error: BaseException, folder: Path | None, target: Path) -> BaseException:
    """An OSError that names no file, or one in a job's temporary ``folder``, named by the job's
    final folder ``target`` (where the disk is full, say)."""
    if isinstance(error, OSError):
        if error.filename is None:
            error.filename = str(target)
        elif folder is not None and Path(str(error.filename)).is_relative_to(folder):
            error.filename = str(target / Path(str(error.filename)).relative_to(folder))
    return error


def _start(spec: JobSpec, record: dict[str, Any], settings: JobSettings, refiner: Refiner, root: Path) -> _Running:
    group = OutputGroup()
    folder: Path | None = None
    try:
        folder = group.folder_for(root / spec.name)
        job = _prepare(spec, record, settings, folder, root)
        with open(folder / "job.pkl", "wb") as handle:
            pickle.dump((refiner, job), handle, protocol=pickle.HIGHEST_PROTOCOL)
        log = open(_log(root, spec), "wb")  # noqa: SIM115 - open while the worker runs, closed by _stop or run
        report, reported = os.pipe()
        try:
            os.set_blocking(report, False)
            with processes.stop_signals_deferred():
                process = processes.start([sys.executable, "-m", "cryosieve.refine.worker", str(folder),
                                           str(reported)], stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, pass_fds=(reported,))
        except BaseException:
            log.close()
            os.close(report)
            raise
        finally:
            os.close(reported)
    except BaseException as error:
        group.discard()
        raise _named(error, folder, root / spec.name) from None
    return _Running(spec, group, folder, process, log, report)


def _run_in_threads(pending: list[tuple[JobSpec, dict[str, Any]]], settings: JobSettings, refiner: RemoteRefiner,
                    root: Path, workers: int, results: dict[str, RefinementResult], update: Any) -> None:
    """Run the jobs of a remote refiner in threads that wait on the server, up to ``workers`` at once.

    A job that fails stops the others (each stops its remote work) and is raised once they have; so
    is an interruption. Every job's folder appears when it is done, or not at all.
    """
    stop = threading.Event()
    refiner.expect([group_of(spec) for spec, _ in pending])

    def one(spec: JobSpec, record: dict[str, Any]) -> RefinementResult:
        group = OutputGroup()
        folder: Path | None = None
        try:
            folder = group.folder_for(root / spec.name)
            job = _prepare(spec, record, settings, folder, root)
            result = refiner.refine_until(job, stop)
            write_text_atomic(folder / "result.json", json.dumps(result.__dict__, indent=2) + "\n")
            group.commit()
        except BaseException as error:
            group.discard()
            raise _named(error, folder, root / spec.name) from None
        return result

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="refinement-job")
    futures: dict[Future[RefinementResult], JobSpec] = {}
    try:
        futures = {pool.submit(one, spec, record): spec for spec, record in pending}
        remaining = set(futures)
        while remaining:
            done, remaining = wait(remaining, timeout=POLL_INTERVAL, return_when=FIRST_EXCEPTION)
            for future in done:
                error = future.exception()
                if error is not None:
                    raise error
                results[futures[future].name] = future.result()
                update(1)
    finally:
        stop.set()
        for future in futures:
            future.cancel()
        pool.shutdown(wait=True)


def _run_here(pending: list[tuple[JobSpec, dict[str, Any]]], settings: JobSettings, refiner: Refiner, root: Path,
              results: dict[str, RefinementResult], update: Any) -> None:
    """Run the jobs one after the other in this process: under ``torchrun``, for a refiner whose work is shared
    by the job's ranks (its tasks are handed out from here, rank 0). Each job's folder appears whole or not."""
    for spec, record in pending:
        group = OutputGroup()
        folder: Path | None = None
        try:
            folder = group.folder_for(root / spec.name)
            job = _prepare(spec, record, settings, folder, root)
            result = refiner.refine(job, no_progress)
            write_text_atomic(folder / "result.json", json.dumps(result.__dict__, indent=2) + "\n")
            group.commit()
        except BaseException as error:
            group.discard()
            raise _named(error, folder, root / spec.name) from None
        results[spec.name] = result
        update(1)


def _stop(running: list[_Running]) -> None:
    processes.stop([job.process for job in running], STOP_GRACE)
    for job in running:
        job.close()
        job.group.discard()
    running.clear()


def _failure(job: _Running, root: Path) -> BaseException:
    """The error a failed job reports, its temporary folder removed: its own error (a full disk named by
    the job's folder), or, when it could report none, a full disk where it ran or the failure naming
    its log."""
    error = job.error()
    target = root / job.spec.name
    full = disk_full(job.folder)
    job.group.discard()
    if isinstance(error, (CryoSieveInputError, ExternalCommandError, OSError)):
        return _named(error, job.folder, target)
    if full:
        return no_space_error(target, f"refinement job {job.spec.name} failed with exit code "
                                      f"{job.process.returncode}")
    return ExternalCommandError(f"refinement job {job.spec.name}", str(_log(root, job.spec)),
                                job.process.returncode or 1)


#: The most bytes of an error a worker sends (a pipe holds 64 KiB; a longer one is sent as its text).
REPORT_BYTES = 60_000


def work(folder: Path, report: int | None = None) -> None:
    """Run the job whose ``job.pkl`` is in ``folder`` (in a worker process): ``result.json``, or an
    exception, pickled to the file descriptor ``report`` (a pipe to the command; no disk is needed to
    report a full one), or to ``error.pkl`` without one."""
    with open(folder / "job.pkl", "rb") as handle:
        refiner, job = pickle.load(handle)
    try:
        result = refiner.refine(job, no_progress)
        write_text_atomic(folder / "result.json", json.dumps(result.__dict__, indent=2) + "\n")
    except BaseException as error:
        try:
            payload = pickle.dumps(error)
        except Exception:
            payload = b""
        if not payload or len(payload) > REPORT_BYTES:
            payload = pickle.dumps(RuntimeError(f"{type(error).__name__}: {str(error)[:2000]}"))
        if report is None:
            (folder / "error.pkl").write_bytes(payload)
        else:
            view = memoryview(payload)
            while view:
                view = view[os.write(report, view):]
        raise
    with contextlib.suppress(FileNotFoundError):
        os.unlink(folder / "job.pkl")


def with_trials(specs: Sequence[JobSpec], repeat: int) -> list[JobSpec]:
    """Each spec once per trial, named ``NAME_trialT`` and seeded ``seed + T``."""
    return [replace(spec, name=f"{spec.name}_trial{trial + 1}", trial=trial, seed=spec.seed + trial)
            for spec in specs for trial in range(repeat)]
