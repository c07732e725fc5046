"""An in-process stand-in of the part of cryosparc-tools' ``CryoSPARC`` client the commands use.

No CryoSPARC server is available to test against. This stand-in follows the interface of
cryosparc-tools 5.0 (constructor keywords, ``find_project``, ``find_workspace``, ``get_lanes``,
``find_job``, ``create_job``, ``create_external_job``, ``download_mrc``; jobs with ``uid``,
``status``, ``refresh``, ``queue``, ``kill``, ``load_output``; External jobs with ``add_input``,
``connect``, ``add_output``, ``run``, ``load_input``, ``alloc_output``, ``save_output``). It records
every call, runs queued jobs after a few polls, and gives outputs shaped like CryoSPARC's: a
refinement's ``particles`` (its input's rows, ``uid`` kept, with ``alignments3D`` fields) and
``volume`` (``map_half_A``, ``map_half_B``, ``mask_fsc_auto`` paths and ``map/psize_A``), whose half
maps agree to a known resolution. It is part of the tests, not of the package.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import starfile
from cryosparc.dataset import Dataset

REFINEMENTS = ("homo_refine_new", "nonuniform_refine_new", "new_local_refine")


class ConnectError(Exception):
    """As httpx's: the server cannot be reached."""


class CommandError(Exception):
    """As cryosparc-tools 4.x's: a failed request to a command server (``code``: its HTTP status)."""

    def __init__(self, reason: str, url: str = "", code: int = 500) -> None:
        super().__init__(f"*** ({url}, code {code}) {reason}")
        self.code = code


class StatusError(Exception):
    """As an HTTP error response."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


def band_limited_half_maps(box: int, shell: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two half maps sharing a signal band-limited to Fourier shell ``shell`` (and independent weak noise
    at every frequency), and an FSC mask of ones (no convolution of the spectrum): their FSC falls from
    about 1 to about 0 at ``shell``, so the resolution is ``box * pixel / shell``."""
    rng = np.random.default_rng(seed)
    k = np.fft.fftfreq(box) * box
    radius = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    signal = np.fft.ifftn(np.fft.fftn(rng.normal(size=(box,) * 3)) * (radius <= shell)).real
    signal /= signal.std()
    halves = [signal + 0.02 * rng.normal(size=(box,) * 3) for _ in range(2)]
    mask = np.ones((box,) * 3)
    return halves[0].astype(np.float32), halves[1].astype(np.float32), mask.astype(np.float32)


@dataclass
class Server:
    """What the stand-in CryoSPARC knows and did.

    ``calls``: every call, as (name, arguments); ``fail``: job types that fail when run;
    ``polls``: refreshes before a queued job ends; ``resolution_shell``: of the refinements' half maps,
    as a function of their particle count; ``reachable`` / ``license``: what a connection meets.
    """

    projects: dict[str, set[str]] = field(default_factory=lambda: {"P3": {"W1", "W2"}})
    lanes: list[str] = field(default_factory=lambda: ["default", "gpu"])
    license: str = "0123abcd-0000-4000-8000-00000000beef"
    reachable: bool = True
    fail: set[str] = field(default_factory=set)
    fail_titles: set[str] = field(default_factory=set)  # jobs whose title holds one of these fail
    slow_titles: set[str] = field(default_factory=set)  # jobs whose title holds one of these never end
    polls: int = 2
    box: int = 32
    pixel: float = 2.0
    resolution_shell: Callable[[int], int] = lambda count: 8
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    jobs: dict[str, Any] = field(default_factory=dict)
    files: dict[str, np.ndarray] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    connections: int = 0
    counter: int = 100
    tools: int = 5  # the cryosparc-tools major version whose behaviour to follow (4 or 5)

    def record(self, call: str, **arguments: Any) -> None:
        with self.lock:
            self.calls.append((call, arguments))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def made(self) -> list[tuple[str, str]]:
        """(job id, type) of every job made, in order."""
        return [(job.uid, job.type) for job in self.jobs.values() if not getattr(job, "source", False)]

    def add_source_job(self, uid: str, output: str, dataset: Dataset) -> None:
        job = Job(self, "P3", "W1", "import_particles", {}, {}, uid)
        job.outputs[output] = dataset
        job.status = "completed"
        job.source = True
        self.jobs[uid] = job

    def new_uid(self) -> str:
        with self.lock:
            self.counter += 1
            return f"J{self.counter}"

    def client_class(self) -> type:
        server = self

        class CryoSPARC:
            def __init__(self, base_url: str | None = None, *, host: str | None = None,
                         base_port: int | None = None, email: str | None = None, password: str | None = None,
                         license: str | None = None, timeout: int = 300) -> None:
                server.record("connect", host=host, base_port=base_port, email=email)
                with server.lock:
                    server.connections += 1
                if server.tools == 4:  # 4.x: all three asserted, errors from its command client
                    assert license, f"Invalid or unspecified CryoSPARC license ID {license}"
                    assert email, "Invalid or unspecified email"
                    assert password, "Invalid or unspecified password"
                    url = f"http://{host}:{int(base_port or 39000) + 2}"
                    if not server.reachable:
                        raise CommandError("URL Error [Errno 111] Connection refused", url)
                    if license != server.license:
                        raise RuntimeError("Could not complete CryoSPARC authentication with given credentials"
                                           ) from CommandError("HTTP Error 403 Forbidden", url, 403)
                    return
                if not server.reachable:
                    raise RuntimeError(f"Could not connect to CryoSPARC at http://{host}:{base_port} due to error:"
                                       "\n[Errno 111] Connection refused") from ConnectError("[Errno 111] refused")
                if license != server.license:
                    raise RuntimeError(f"Could not connect to CryoSPARC at http://{host}:{base_port} due to error:"
                                       f"\n401 Unauthorized (license {license})") from StatusError(
                        401, f"Unauthorized: license {license}")

            def find_project(self, project_uid: str) -> Any:
                server.record("find_project", project_uid=project_uid)
                if project_uid not in server.projects:
                    raise StatusError(404, f"Project {project_uid} not found")
                return SimpleNamespace(uid=project_uid)

            def find_workspace(self, project_uid: str, workspace_uid: str) -> Any:
                server.record("find_workspace", project_uid=project_uid, workspace_uid=workspace_uid)
                if workspace_uid not in server.projects.get(project_uid, set()):
                    raise StatusError(404, f"Workspace {project_uid} {workspace_uid} not found")
                return SimpleNamespace(uid=workspace_uid)

            def get_lanes(self) -> list[Any]:
                if server.tools == 4:
                    return [{"name": name, "type": "node", "title": name, "desc": ""} for name in server.lanes]
                return [SimpleNamespace(name=name, type="node") for name in server.lanes]

            def find_job(self, project_uid: str, job_uid: str) -> Any:
                server.record("find_job", project_uid=project_uid, job_uid=job_uid)
                if job_uid not in server.jobs:
                    raise StatusError(404, f"Job {project_uid} {job_uid} not found")
                return server.jobs[job_uid]

            def create_job(self, project_uid: str, workspace_uid: str, type: str, connections: Any = None,
                           params: Any = None, title: str = "", desc: str = "") -> Any:
                server.record("create_job", project_uid=project_uid, workspace_uid=workspace_uid, type=type,
                              connections=dict(connections or {}), params=dict(params or {}), title=title)
                job = Job(server, project_uid, workspace_uid, type, dict(connections or {}), dict(params or {}),
                          server.new_uid())
                job.title = title
                server.jobs[job.uid] = job
                return job

            def create_external_job(self, project_uid: str, workspace_uid: str, title: str = "",
                                    desc: str = "") -> Any:
                server.record("create_external_job", project_uid=project_uid, workspace_uid=workspace_uid,
                              title=title)
                if workspace_uid not in server.projects.get(project_uid, set()):
                    raise StatusError(404, f"Workspace {project_uid} {workspace_uid} not found")
                job = ExternalJob(server, project_uid, workspace_uid, "snowflake", {}, {}, server.new_uid())
                server.jobs[job.uid] = job
                return job

            def download_mrc(self, project_uid: str, path: str) -> tuple[dict[str, Any], np.ndarray]:
                server.record("download_mrc", project_uid=project_uid, path=path)
                return {"psize": server.pixel}, server.files[path]

        return CryoSPARC


class Job:
    """A stand-in CryoSPARC job."""

    def __init__(self, server: Server, project: str, workspace: str, kind: str, connections: dict[str, Any],
                 params: dict[str, Any], uid: str) -> None:
        self.server, self.project, self.workspace, self.type = server, project, workspace, kind
        self.connections, self.params, self.uid = connections, params, uid
        self.status = "building"
        self.outputs: dict[str, Dataset] = {}
        self.inputs: dict[str, Dataset] = {}
        self.source = False
        self.title = ""
        self._polls = 0

    def queue(self, lane: str | None = None, hostname: str | None = None, gpus: Any = None,
              cluster_vars: Any = None) -> None:
        self.server.record("queue", job=self.uid, type=self.type, lane=lane)
        self.status = "queued"

    def refresh(self) -> Any:
        if self.status in ("queued", "running"):
            self._polls += 1
            self.status = "running"
            slow = any(text in self.title for text in self.server.slow_titles)
            if self._polls >= self.server.polls and not slow:
                self._finish()
        return self

    def kill(self) -> None:
        self.server.record("kill", job=self.uid)
        self.status = "killed"

    def load_output(self, name: str, slots: Any = "all", version: Any = "F") -> Dataset:
        self.server.record("load_output", job=self.uid, name=name, slots=slots)
        if name not in self.outputs:
            raise StatusError(404, f"Job {self.uid} has no output {name}")
        return self.outputs[name]

    def _input(self, name: str) -> Dataset:
        job_uid, output = self.connections[name]
        return self.server.jobs[job_uid].outputs[output]

    def _finish(self) -> None:
        if self.type in self.server.fail or any(text in self.title for text in self.server.fail_titles):
            self.status = "failed"
            return
        if self.type == "import_particles":
            table = starfile.read(self.params["particle_meta_path"], always_dict=True)["particles"]
            assert Path(self.params["particle_blob_path"]).is_dir()
            rng = np.random.default_rng(len(self.server.jobs))
            self.outputs["imported_particles"] = Dataset({"uid": rng.integers(1, 2**62, len(table),
                                                                              dtype=np.uint64)})
        elif self.type == "import_volumes":
            assert Path(self.params["volume_blob_path"]).is_file()
            self.outputs["imported_volume_1"] = Dataset.allocate(1, [("map/path", "O")])
        elif self.type == "homo_abinit":
            self._input("particles")
            self.outputs["volume_class_0"] = Dataset.allocate(1, [("map/path", "O")])
        elif self.type in REFINEMENTS:
            particles = self._input("particles")
            self._input("volume")
            count = len(particles)
            refined = Dataset({"uid": np.asarray(particles["uid"])}).add_fields(
                [("alignments3D/pose", "f4", (3,)), ("alignments3D/shift", "f4", (2,)),
                 ("alignments3D/split", "u4")])
            refined["alignments3D/split"] = np.arange(count) % 2
            self.outputs["particles"] = refined
            half_a, half_b, mask = band_limited_half_maps(self.server.box, self.server.resolution_shell(count),
                                                          seed=int(self.uid[1:]))
            stem = f"{self.uid}/{self.uid}_volume"
            for suffix, data in (("map_half_A", half_a), ("map_half_B", half_b), ("mask_fsc_auto", mask)):
                self.server.files[f"{stem}_{suffix}.mrc"] = data
            volume = Dataset.allocate(1, [("map/path", "O"), ("map/psize_A", "f4"), ("map_half_A/path", "O"),
                                          ("map_half_B/path", "O"), ("mask_fsc_auto/path", "O")])
            volume["map/psize_A"] = self.server.pixel
            for suffix in ("map_half_A", "map_half_B", "mask_fsc_auto"):
                volume[f"{suffix}/path"] = np.array([f"{stem}_{suffix}.mrc"], dtype=object)
            self.outputs["volume"] = volume
            self.outputs["mask"] = Dataset.allocate(1, [("mask/path", "O")])
        self.status = "completed"


class ExternalJob(Job):
    """A stand-in External job: outputs pass through the connected input's rows by ``uid``."""

    def __init__(self, *arguments: Any) -> None:
        super().__init__(*arguments)
        self.passthrough: dict[str, str] = {}

    def add_input(self, type: str, name: str | None = None, **kwargs: Any) -> str:
        self.server.record("add_input", job=self.uid, type=type, name=name)
        return str(name)

    def connect(self, target_input: str, source_job_uid: str, source_output: str, **kwargs: Any) -> bool:
        self.server.record("connect_input", job=self.uid, input=target_input, source=(source_job_uid, source_output))
        self.connections[target_input] = (source_job_uid, source_output)
        self._input(target_input)
        return True

    def add_output(self, type: str, name: str | None = None, slots: Any = (), passthrough: str | None = None,
                   **kwargs: Any) -> str:
        self.server.record("add_output", job=self.uid, type=type, name=name, passthrough=passthrough)
        assert passthrough in self.connections
        self.passthrough[str(name)] = passthrough
        return str(name)

    @contextlib.contextmanager
    def run(self) -> Iterator[ExternalJob]:
        self.status = "running"
        try:
            yield self
        except Exception:
            self.status = "failed"
            raise
        self.status = "completed"

    def load_input(self, name: str, slots: Any = "all") -> Dataset:
        return self._input(name)

    def alloc_output(self, name: str, alloc: Any = 0, **kwargs: Any) -> Dataset:
        return Dataset({"uid": np.asarray(alloc, dtype=np.uint64)})

    def save_output(self, name: str, dataset: Dataset, **kwargs: Any) -> None:
        assert self.status == "running", "save_output outside run()"
        self.server.record("save_output", job=self.uid, name=name, count=len(dataset))
        source = self._input(self.passthrough[name])
        keep = np.isin(np.asarray(source["uid"]), np.asarray(dataset["uid"]))
        assert keep.sum() == len(dataset), "uids not in the passthrough input"
        self.outputs[name] = source.mask(keep)
