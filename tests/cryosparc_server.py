"""A CryoSPARC *server* on 127.0.0.1, for testing the package through the real cryosparc-tools client.

:class:`FakeCryoSPARC` listens as CryoSPARC v5 (``major=5``: REST under ``BASE_URL/api/cmd``, described by
``openapi.json``, logins and bearer tokens) or v4 (``major=4``: JSON-RPC ``command_core`` on the base port + 2,
``command_vis`` on + 3 with its dataset and file endpoints, ``command_rtp`` on + 5, a web page on the base
port), and checks each request as the server would: known job types and parameter names (those
CryoSieve 1.3.3 sends), known lanes, known projects and workspaces, connections to existing outputs of the
right type, slots on External inputs and outputs, saved rows that exist in the passed-through input, jobs
queued only once built with their inputs, a token or licence on every call. Jobs pass through queued,
launched, started, running to completed (or failed, or killed), one step each time their status is read.
Faults can be injected: an answer of any status or an HTML page, tokens that expire, an outage (the ports
closed for a while, as during a restart).

docs/cryosparc.md records which file and line of cryosparc-tools 4.7.1 / 5.0.3 or of CryoSieve 1.3.3 each
behaviour comes from, and which are assumptions.

The outputs are shaped like CryoSPARC's: a refinement's ``particles`` are its input's rows (``uid`` kept)
with new ``alignments3D``; its ``volume`` has half maps whose signal is shared up to a known Fourier shell
(:func:`band_limited_half_maps`), so the resolution measured from them is known.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import inspect
import io
import json
import re
import secrets
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import mrcfile
import numpy as np
import starfile
from cryosparc.dataset import Dataset

# --------------------------------------------------------------------------- what the server knows

#: Fields of each slot (the minimum fields CryoSPARC's data registry gives them; cryosparc-tools'
#: tests/conftest.py T20S_PARTICLES shows those of ``blob`` and ``ctf``).
SLOT_FIELDS: dict[str, list[tuple[Any, ...]]] = {
    "blob": [("path", "O"), ("idx", "u4"), ("shape", "u4", (2,)), ("psize_A", "f4"), ("sign", "f4"),
             ("import_sig", "u8")],
    "ctf": [("type", "O"), ("exp_group_id", "u4"), ("accel_kv", "f4"), ("cs_mm", "f4"), ("amp_contrast", "f4"),
            ("df1_A", "f4"), ("df2_A", "f4"), ("df_angle_rad", "f4"), ("phase_shift_rad", "f4"), ("scale", "f4"),
            ("bfactor", "f4")],
    "alignments3D": [("split", "u4"), ("shift", "f4", (2,)), ("pose", "f4", (3,)), ("psize_A", "f4"),
                     ("error", "f4")],
    "location": [("micrograph_uid", "u8"), ("micrograph_path", "O"), ("center_x_frac", "f4"),
                 ("center_y_frac", "f4")],
    "volume": [("path", "O"), ("shape", "u4", (3,)), ("psize_A", "f4")],
}
VOLUME_RESULTS = ("map", "map_half_A", "map_half_B", "mask_fsc", "mask_fsc_auto")

#: The job types CryoSieve 1.3.3 makes (cs_refine.py), with the parameters it sends and the inputs each has.
JOB_TYPES: dict[str, dict[str, Any]] = {
    "import_particles": {"params": {"particle_meta_path": str, "particle_blob_path": str}, "inputs": {},
                         "master": True},
    "import_volumes": {"params": {"volume_blob_path": str}, "inputs": {}, "master": True},
    "homo_abinit": {"params": {}, "inputs": {"particles": "particle"}},
    "homo_refine_new": {"params": {"refine_symmetry": str, "refine_gs_resplit": bool, "refine_res_init": float},
                        "inputs": {"particles": "particle", "volume": "volume"}},
    "nonuniform_refine_new": {"params": {"refine_symmetry": str, "refine_gs_resplit": bool,
                                         "refine_res_init": float},
                              "inputs": {"particles": "particle", "volume": "volume"}},
    "new_local_refine": {"params": {"refine_symmetry": str, "use_alignment_prior": bool, "min_angular_step": float},
                         "inputs": {"particles": "particle", "volume": "volume", "mask": "mask"}},
    "snowflake": {"params": {}, "inputs": {}, "master": True},
}
REFINEMENTS = ("homo_refine_new", "nonuniform_refine_new", "new_local_refine")
ACTIVE = ("queued", "launched", "started", "running")
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class Refusal(Exception):
    """The server refuses a request: ``status`` (HTTP, for v5) and a message."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def band_limited_half_maps(box: int, shell: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two half maps sharing a signal band-limited to Fourier shell ``shell`` (and independent weak noise
    at every frequency), and an FSC mask of ones: their FSC falls from about 1 to about 0 at ``shell``, so
    the resolution is ``box * pixel / shell``."""
    rng = np.random.default_rng(seed)
    k = np.fft.fftfreq(box) * box
    radius = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    signal = np.fft.ifftn(np.fft.fftn(rng.normal(size=(box,) * 3)) * (radius <= shell)).real
    signal /= signal.std()
    halves = [signal + 0.02 * rng.normal(size=(box,) * 3) for _ in range(2)]
    return halves[0].astype(np.float32), halves[1].astype(np.float32), np.ones((box,) * 3, np.float32)


def mrc_bytes(data: np.ndarray, pixel: float) -> bytes:
    with tempfile.NamedTemporaryFile(suffix=".mrc") as handle:
        with mrcfile.new(handle.name, overwrite=True) as mrc:
            mrc.set_data(np.asarray(data, dtype=np.float32))
            mrc.voxel_size = pixel
        return Path(handle.name).read_bytes()


def dataset_bytes(dataset: Dataset, stream: bool = True) -> bytes:
    """A dataset as the stream format (``application/x-cryosparc-dataset``) or as a ``.cs`` file."""
    if stream:
        return b"".join(dataset.stream())
    buffer = io.BytesIO()
    dataset.save(buffer)
    return buffer.getvalue()


# --------------------------------------------------------------------------- the model


@dataclass
class Result:
    name: str
    dtype: str
    passthrough: bool = False


@dataclass
class Output:
    type: str
    results: list[Result]
    passthrough: str | None = None  # the input an External output passes through
    data: Dataset | None = None  # every field, own and passed through


@dataclass
class Input:
    type: str
    slots: list[str]
    count_min: int = 1
    connections: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Job:
    uid: str
    project: str
    workspace: str
    type: str
    title: str
    params: dict[str, Any]
    created_by: str
    inputs: dict[str, Input] = field(default_factory=dict)
    outputs: dict[str, Output] = field(default_factory=dict)
    status: str = "building"
    lane: str | None = None
    reads: int = 0
    history: list[str] = field(default_factory=lambda: ["building"])


@dataclass
class User:
    id: str
    email: str
    name: str
    password: str | None


@dataclass
class Fault:
    """An answer given instead of the real one to ``times`` requests whose ``(role, method, path)`` matches."""

    pattern: re.Pattern[str]
    status: int
    body: bytes
    content_type: str
    times: int
    method: str | None = None


# --------------------------------------------------------------------------- HTTP


class _Handler(BaseHTTPRequestHandler):
    server: _Listener

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():  # httpx streams datasets chunked
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self, method: str) -> None:
        body = self._body()
        status, content_type, payload, after = self.server.fake.dispatch(self.server.role, method, self.path,
                                                                         self.headers, body)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()
        if after is not None:
            after()

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_PUT(self) -> None:
        self._serve("PUT")


class _Listener(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, role: str, fake: FakeCryoSPARC) -> None:
        self.role, self.fake = role, fake
        super().__init__(("127.0.0.1", port), _Handler)


def _free_base(offsets: tuple[int, ...]) -> int:
    rng = np.random.default_rng()
    for _ in range(200):
        base = int(rng.integers(20000, 60000))
        sockets = []
        try:
            for offset in offsets:
                sock = socket.socket()
                sock.bind(("127.0.0.1", base + offset))
                sockets.append(sock)
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no free ports")


# --------------------------------------------------------------------------- the server


class FakeCryoSPARC:
    """A CryoSPARC server (see the module docstring).

    ``version``: what it reports (``"v5.0.3"``, ``"v4.7.1"``); ``prefix``: a path before ``/api`` (v5 behind a
    reverse proxy); ``users``: e-mail -> password (``None``: an account without one); ``box``, ``pixel`` and
    ``resolution_shell`` (particle count -> Fourier shell) shape the refinements' half maps; ``reads``: status
    reads a running job takes to end; ``token_uses``: calls a v5 token is good for (``None``: unlimited).
    """

    def __init__(self, major: int = 5, *, version: str | None = None, prefix: str = "",
                 users: dict[str, str | None] | None = None, license: str = "0123abcd-0000-4000-8000-00000000beef",
                 projects: dict[str, set[str]] | None = None, lanes: tuple[str, ...] = ("default", "gpu"),
                 box: int = 32, pixel: float = 2.0, resolution_shell: Callable[[int], int] = lambda count: 8,
                 reads: int = 2, token_uses: int | None = None) -> None:
        self.major = major
        self.version = version or ("v5.0.3" if major == 5 else "v4.7.1")
        self.prefix = prefix.rstrip("/")
        self.license = license
        self.users = {email: User(f"u{index:023d}", email, email.split("@")[0], password)
                      for index, (email, password) in enumerate((users or {"me@lab.org": "secret-pw"}).items(), 1)}
        self.licence_user = User("licence0000000000000000", "cryosparc@licence", "cryosparc", None)
        self.projects = projects if projects is not None else {"P3": {"W1", "W2"}}
        self.lanes = list(lanes)
        self.box, self.pixel, self.resolution_shell = box, pixel, resolution_shell
        self.reads = reads
        self.token_uses = token_uses
        self.lock = threading.RLock()
        self.jobs: dict[str, Job] = {}
        self.files: dict[str, bytes] = {}
        self.tokens: dict[str, list[Any]] = {}
        self.logins: list[str] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.requests: list[tuple[str, str, str]] = []
        self.faults: list[Fault] = []
        self.internal_errors: list[str] = []
        self.fail_titles: set[str] = set()
        self.hang_titles: set[str] = set()
        self.outage_at: tuple[str, str, float | None] | None = None  # (title part, status, seconds)
        self.counter = 100
        self.offsets = (0, 2) if major == 5 else (0, 2, 3, 5)
        self.roles = {0: "web", 2: "api"} if major == 5 else {0: "web", 2: "core", 3: "vis", 5: "rtp"}
        self.base_port = _free_base(self.offsets)
        self._listeners: list[_Listener] = []
        self._threads: list[threading.Thread] = []
        self.down = False

    # -- life
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.base_port}{self.prefix}"

    def environment(self, password: bool = True, license: bool = True, email: str = "me@lab.org") -> dict[str, str]:
        """The variables that point the package at this server (host and base port)."""
        env = {"CRYOSPARC_MASTER_HOSTNAME": "127.0.0.1", "CRYOSPARC_BASE_PORT": str(self.base_port)}
        if self.prefix:
            env = {"CRYOSPARC_BASE_URL": self.url}
        if license:
            env["CRYOSPARC_LICENSE_ID"] = self.license
        if password and self.users.get(email) and self.users[email].password:
            env["CRYOSPARC_PASSWORD"] = str(self.users[email].password)
        return env

    def start(self) -> FakeCryoSPARC:
        for attempt in range(100):
            try:
                listeners = [_Listener(self.base_port + offset, self.roles[offset], self) for offset in self.offsets]
                break
            except OSError:
                for listener in locals().get("listeners", []):
                    listener.server_close()
                time.sleep(0.02 * (attempt + 1))
        else:
            raise RuntimeError(f"ports of {self.url} stay taken")
        self._listeners = listeners
        self._threads = [threading.Thread(target=listener.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
                         for listener in listeners]
        for thread in self._threads:
            thread.start()
        self.down = False
        return self

    def stop(self) -> None:
        for listener in self._listeners:
            listener.shutdown()
            listener.server_close()
        self._listeners = []
        self.down = True

    def outage(self, seconds: float | None) -> None:
        """Close every port (as a restart does) for ``seconds``, or until :meth:`start` (``None``)."""
        self.stop()
        if seconds is not None:
            timer = threading.Timer(seconds, self.start)
            timer.daemon = True
            timer.start()

    def __enter__(self) -> FakeCryoSPARC:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if not self.down:
            self.stop()

    # -- test set-up and inspection
    def fail(self, path: str, status: int, body: str = "", content_type: str = "application/json", times: int = 1,
             method: str | None = None) -> None:
        """Answer the next ``times`` requests whose ``role method path`` matches ``path`` (a regex) with
        ``status`` and ``body``."""
        self.faults.append(Fault(re.compile(path), status, body.encode(), content_type, times, method))

    def record(self, event: str, **details: Any) -> None:
        with self.lock:
            self.events.append((event, details))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [details for name, details in self.events if name == event]

    def made(self) -> list[Job]:
        """The jobs made through the API, in order."""
        return [job for job in self.jobs.values() if job.type != "source"]

    def add_source_job(self, uid: str, output: str, dataset: Dataset, project: str = "P3",
                       passthrough: tuple[str, ...] = ()) -> Job:
        """A completed job whose output ``output`` holds ``dataset`` (a particle set, each field prefix a slot;
        those in ``passthrough`` passed through from an earlier job, in ``J_passthrough_OUTPUT.cs``, as a
        refinement's ``blob`` and ``ctf``)."""
        job = Job(uid, project, "W1", "source", "source particles", {}, "someone")
        results = [Result(prefix, prefix, prefix in passthrough) for prefix in dataset.prefixes() if prefix != "uid"]
        job.outputs[output] = Output("particle", results, data=dataset)
        job.status = "completed"
        self.jobs[uid] = job
        self._write_files(job)
        return job

    def output(self, uid: str, name: str) -> Dataset:
        data = self.jobs[uid].outputs[name].data
        assert data is not None
        return data

    # -- dispatch
    def dispatch(self, role: str, method: str, raw_path: str, headers: Any, body: bytes
                 ) -> tuple[int, str, bytes, Callable[[], None] | None]:
        parts = urlsplit(raw_path)
        path, query = parts.path, parse_qs(parts.query, keep_blank_values=True)
        with self.lock:
            self.requests.append((role, method, path))
            for fault in self.faults:
                if fault.times > 0 and (fault.method in (None, method)) and fault.pattern.search(
                        f"{role} {method} {path}"):
                    fault.times -= 1
                    return fault.status, fault.content_type, fault.body, None
            self._after: Callable[[], None] | None = None
            try:
                if self.major == 5:
                    status, content_type, payload = self._v5(role, method, path, query, headers, body)
                else:
                    status, content_type, payload = self._v4(role, method, path, headers, body)
            except Refusal as refusal:
                status, content_type = refusal.status, "application/json"
                payload = json.dumps({"detail": str(refusal)}).encode()
            except Exception as error:  # a fault of this server: an error answer, and the test sees it
                self.internal_errors.append(f"{type(error).__name__}: {error}")
                status, content_type = 500, "application/json"
                payload = json.dumps({"detail": f"internal error of the test server: {error}"}).encode()
            return status, content_type, payload, self._after

    # ======================================================================= the jobs

    def _new_uid(self) -> str:
        self.counter += 1
        return f"J{self.counter}"

    def _user(self, user_id: str) -> User:
        for user in [*self.users.values(), self.licence_user]:
            if user.id == user_id:
                return user
        raise Refusal(f"user {user_id} not found", 404)

    def _workspace(self, project: str, workspace: str) -> None:
        if project not in self.projects:
            raise Refusal(f"Project {project} not found", 404)
        if workspace not in self.projects[project]:
            raise Refusal(f"Workspace {project}-{workspace} not found", 404)

    def _job(self, project: str, uid: str) -> Job:
        if project not in self.projects:
            raise Refusal(f"Project {project} not found", 404)
        job = self.jobs.get(uid)
        if job is None or job.project != project:
            raise Refusal(f"Job {project}-{uid} not found", 404)
        return job

    def create_job(self, project: str, workspace: str, kind: str, params: dict[str, Any], title: str,
                   user_id: str) -> Job:
        self._workspace(project, workspace)
        if kind not in JOB_TYPES:
            raise Refusal(f"Unknown job type {kind}")
        known = JOB_TYPES[kind]["params"]
        for name, value in params.items():
            if name not in known:
                raise Refusal(f"Unknown parameter {name} for job type {kind}")
            wanted = known[name]
            if value is not None and not ((isinstance(value, wanted) and not (wanted is not bool and isinstance(
                    value, bool))) or (wanted is float and isinstance(value, int) and not isinstance(value, bool))):
                raise Refusal(f"Invalid value {value!r} for parameter {name} of job type {kind}")
        job = Job(self._new_uid(), project, workspace, kind, title, dict(params), user_id)
        for name, input_type in JOB_TYPES[kind]["inputs"].items():
            job.inputs[name] = Input(input_type, [])
        self.jobs[job.uid] = job
        self.record("create", uid=job.uid, type=kind, params=dict(params), title=title, user=self._user(user_id).email,
                    workspace=workspace)
        return job

    def connect(self, job: Job, name: str, source_uid: str, source_output: str) -> None:
        if job.status != "building":
            raise Refusal(f"Job {job.uid} is not building")
        if name not in job.inputs:
            raise Refusal(f"Job {job.uid} of type {job.type} has no input {name}")
        source = self._job(job.project, source_uid)
        if source_output not in source.outputs:
            raise Refusal(f"Job {source_uid} has no output {source_output}")
        output = source.outputs[source_output]
        if output.type != job.inputs[name].type:
            raise Refusal(f"Output {source_uid}.{source_output} ({output.type}) does not fit input {name} "
                          f"({job.inputs[name].type})")
        present = {result.name for result in output.results}
        missing = [slot for slot in job.inputs[name].slots if slot not in present]
        if missing:
            raise Refusal(f"Output {source_uid}.{source_output} lacks the slots {missing} input {name} requires")
        job.inputs[name].connections.append((source_uid, source_output))
        self.record("connect", uid=job.uid, input=name, source=(source_uid, source_output))

    def enqueue(self, job: Job, lane: str | None, user_id: str | None) -> None:
        if job.type == "snowflake":
            raise Refusal("External jobs are not queued")
        if job.status != "building":
            raise Refusal(f"Job {job.uid} is {job.status}, not building")
        if lane is not None and lane not in self.lanes:
            raise Refusal(f"Lane {lane} does not exist")
        if lane is None and not JOB_TYPES[job.type].get("master"):
            lane = self.lanes[0]  # the default lane
        for name, item in job.inputs.items():
            if len(item.connections) < item.count_min:
                raise Refusal(f"Job {job.uid}: input {name} is not connected")
            for source_uid, _ in item.connections:
                if self.jobs[source_uid].status != "completed":
                    raise Refusal(f"Job {job.uid}: input {name} comes from {source_uid}, which is not completed")
        job.lane = lane
        self._status(job, "queued")
        self.record("queue", uid=job.uid, type=job.type, lane=lane,
                    user=self._user(user_id).email if user_id else None)

    def _status(self, job: Job, status: str) -> None:
        job.status = status
        job.history.append(status)

    def read(self, job: Job) -> None:
        """A read of the job's status: a queued or running job goes one step on."""
        if job.status not in ACTIVE:
            return
        job.reads += 1
        steps = {"queued": "launched", "launched": "started", "started": "running"}
        if job.status in steps:
            self._status(job, steps[job.status])
        elif job.reads >= self.reads + 3 and not any(part in job.title for part in self.hang_titles):
            if any(part in job.title for part in self.fail_titles):
                self._status(job, "failed")
            else:
                self._finish(job)
                self._status(job, "completed")
        if self.outage_at is not None and self.outage_at[0] in job.title and job.status == self.outage_at[1]:
            seconds = self.outage_at[2]
            self.outage_at = None
            self._after = lambda: threading.Thread(target=self.outage, args=(seconds,), daemon=True).start()

    def kill(self, job: Job) -> None:
        if job.type == "snowflake":
            raise Refusal("External jobs are not killed")
        if job.status not in ACTIVE:
            raise Refusal(f"Job {job.uid} is {job.status}: nothing to kill")
        self._status(job, "killed")
        self.record("kill", uid=job.uid)

    def delete(self, job: Job) -> None:
        if job.status in ACTIVE:
            self._status(job, "killed")
        for other in self.jobs.values():
            for item in other.inputs.values():
                if any(source == job.uid for source, _ in item.connections) and other.uid != job.uid:
                    raise Refusal(f"Job {job.uid} has children")
        del self.jobs[job.uid]
        self.record("delete", uid=job.uid)

    # -- External jobs
    def add_external_input(self, job: Job, name: str, kind: str, slots: list[str], count_min: int) -> None:
        self._external(job, ("building",))
        if not NAME.match(name):
            raise Refusal(f"Invalid input name {name}")
        if not slots:
            raise Refusal("An input needs at least one slot")
        unknown = [slot for slot in slots if slot not in SLOT_FIELDS]
        if unknown:
            raise Refusal(f"Unknown slots {unknown}")
        job.inputs[name] = Input(kind, list(slots), count_min)
        self.record("add_input", uid=job.uid, name=name, slots=list(slots))

    def add_external_output(self, job: Job, name: str, kind: str, slots: list[str], passthrough: str | None) -> None:
        self._external(job, ("building",))
        if not NAME.match(name):
            raise Refusal(f"Invalid output name {name}")
        if not slots:
            raise Refusal(f"Output {name} needs at least one slot of its own")
        unknown = [slot for slot in slots if slot not in SLOT_FIELDS]
        if unknown:
            raise Refusal(f"Unknown slots {unknown}")
        if passthrough is not None and passthrough not in job.inputs:
            raise Refusal(f"Output {name} passes through input {passthrough}, which the job does not have")
        job.outputs[name] = Output(kind, [Result(slot, slot) for slot in slots], passthrough)
        self.record("add_output", uid=job.uid, name=name, slots=list(slots), passthrough=passthrough)

    def _external(self, job: Job, statuses: tuple[str, ...]) -> None:
        if job.type != "snowflake":
            raise Refusal(f"Job {job.uid} is not an External job")
        if job.status not in statuses:
            raise Refusal(f"Job {job.uid} is {job.status}")

    def mark(self, job: Job, status: str) -> None:
        if job.type != "snowflake":
            raise Refusal(f"Job {job.uid} is not an External job")
        if status in ("running", "waiting"):
            self._external(job, ("building", "completed", "failed"))
            for name, item in job.inputs.items():
                if len(item.connections) < item.count_min:
                    raise Refusal(f"Job {job.uid}: input {name} is not connected")
        self._status(job, status)
        self.record("mark", uid=job.uid, status=status)

    def _source_of(self, job: Job, name: str) -> tuple[Output, Dataset]:
        item = job.inputs[name]
        if not item.connections:
            raise Refusal(f"Job {job.uid}: input {name} is not connected")
        source_uid, source_output = item.connections[0]
        output = self.jobs[source_uid].outputs[source_output]
        if output.data is None:
            raise Refusal(f"Output {source_uid}.{source_output} holds no data")
        return output, output.data

    def load_input(self, job: Job, name: str, slots: str | list[str]) -> Dataset:
        if name not in job.inputs:
            raise Refusal(f"Job {job.uid} has no input {name}", 404)
        output, data = self._source_of(job, name)
        names = [result.name for result in output.results]
        wanted = (job.inputs[name].slots or names) if slots == "default" else names if slots == "all" else slots
        unknown = [slot for slot in wanted if slot not in names]
        if unknown:
            raise Refusal(f"Input {name} has no slots {unknown}", 404)
        self.record("load_input", uid=job.uid, name=name, slots=list(wanted))
        return data.filter_prefixes(["uid", *wanted], copy=True)

    def save_output(self, job: Job, name: str, dataset: Dataset) -> None:
        self._external(job, ("running", "waiting"))
        if name not in job.outputs:
            raise Refusal(f"Job {job.uid} has no output {name}", 404)
        output = job.outputs[name]
        fields = set(dataset.fields())
        for result in output.results:
            for spec in SLOT_FIELDS[result.dtype]:
                if f"{result.name}/{spec[0]}" not in fields:
                    raise Refusal(f"Output {name}: field {result.name}/{spec[0]} missing")
        own = dataset.filter_prefixes(["uid", *[result.name for result in output.results]], copy=True)
        if output.passthrough is not None:
            source, data = self._source_of(job, output.passthrough)
            known = np.asarray(data["uid"])
            if not np.isin(np.asarray(own["uid"]), known).all():
                raise Refusal(f"Output {name}: rows whose uid is not in input {output.passthrough}")
            mine = {result.name for result in output.results}
            passed = [result for result in source.results if result.name not in mine]
            output.results = [result for result in output.results if not result.passthrough] + [
                Result(result.name, result.dtype, True) for result in passed]
            rest = data.filter_prefixes(["uid", *[result.name for result in passed]], copy=True)
            own = own.innerjoin(rest)
        output.data = own
        self._write_files(job)
        self.record("save_output", uid=job.uid, name=name, count=len(own))

    def load_output(self, job: Job, name: str, slots: str | list[str]) -> Dataset:
        if name not in job.outputs or job.outputs[name].data is None:
            raise Refusal(f"Job {job.uid} has no results for output {name}", 404)
        output = job.outputs[name]
        if slots == "default":
            wanted = [result.name for result in output.results if not result.passthrough]
        elif slots == "passthrough":
            wanted = [result.name for result in output.results if result.passthrough]
        elif slots == "all":
            wanted = [result.name for result in output.results]
        else:
            wanted = list(slots)
            unknown = [slot for slot in wanted if slot not in [result.name for result in output.results]]
            if unknown:
                raise Refusal(f"Output {name} has no slots {unknown}", 404)
        self.record("load_output", uid=job.uid, name=name, slots=wanted)
        assert output.data is not None
        return output.data.filter_prefixes(["uid", *wanted], copy=True)

    def _write_files(self, job: Job) -> None:
        """The metafiles of each output: its own results in ``J/J_NAME.cs``, passed-through ones in
        ``J/J_passthrough_NAME.cs`` (as CryoSPARC names them)."""
        for name, output in job.outputs.items():
            if output.data is None:
                continue
            for passthrough, file in ((False, f"{job.uid}/{job.uid}_{name}.cs"),
                                      (True, f"{job.uid}/{job.uid}_passthrough_{name}.cs")):
                prefixes = [result.name for result in output.results if result.passthrough == passthrough]
                if prefixes:
                    self.files[file] = dataset_bytes(output.data.filter_prefixes(["uid", *prefixes], copy=True),
                                                     stream=False)

    def metafile(self, job: Job, name: str, result: Result) -> str | None:
        if job.outputs[name].data is None:
            return None
        return f"{job.uid}/{job.uid}_passthrough_{name}.cs" if result.passthrough else f"{job.uid}/{job.uid}_{name}.cs"

    # -- what a job makes when it completes
    def _finish(self, job: Job) -> None:
        rng = np.random.default_rng(int(job.uid[1:]))
        if job.type == "import_particles":
            meta, blob = Path(job.params["particle_meta_path"]), Path(job.params["particle_blob_path"])
            if not meta.is_file() or not blob.is_dir():
                self._status(job, "failed")
                return
            job.outputs["imported_particles"] = Output("particle", [Result("blob", "blob"), Result("ctf", "ctf"),
                                                                    Result("alignments3D", "alignments3D")],
                                                       data=self._imported(job, meta, rng))
        elif job.type == "import_volumes":
            if not Path(job.params["volume_blob_path"]).is_file():
                self._status(job, "failed")
                return
            job.outputs["imported_volume_1"] = self._volume_output(job, "imported_volume_1", 8, ("map",))
        elif job.type == "homo_abinit":
            _, particles = self._source_of(job, "particles")
            job.outputs["volume_class_0"] = self._volume_output(job, "volume_class_0", 8, ("map",))
            job.outputs["particles_class_0"] = self._particles_output(job, rng)
        elif job.type in REFINEMENTS:
            _, particles = self._source_of(job, "particles")
            job.outputs["particles"] = self._particles_output(job, rng)
            job.outputs["volume"] = self._volume_output(job, "volume", self.resolution_shell(len(particles)),
                                                        VOLUME_RESULTS)
            job.outputs["mask"] = Output("mask", [Result("mask", "volume")], data=self._volume_rows(
                job, "mask", ("mask",), {"mask": np.ones((self.box,) * 3, np.float32)}))
        self._write_files(job)

    def _imported(self, job: Job, meta: Path, rng: np.random.Generator) -> Dataset:
        star = starfile.read(meta, always_dict=True)
        table = star.get("particles", next(iter(star.values())))
        optics = star.get("optics")
        n = len(table)
        data = Dataset.allocate(n, [(f"{slot}/{spec[0]}", *spec[1:]) for slot in ("blob", "ctf", "alignments3D")
                                    for spec in SLOT_FIELDS[slot]])
        data["uid"] = rng.integers(1, 2**63, size=n, dtype=np.uint64)
        names = [str(name).split("@") for name in table["rlnImageName"]]
        data["blob/idx"] = np.array([int(index) - 1 for index, _ in names])
        data["blob/path"] = np.array([f"{job.uid}/imported/{Path(path).name}" for _, path in names], dtype=object)
        pixel = float(optics["rlnImagePixelSize"][0]) if optics is not None else self.pixel
        data["blob/psize_A"] = pixel
        data["blob/sign"] = -1.0
        data["ctf/df1_A"] = np.asarray(table["rlnDefocusU"], dtype=np.float32)
        data["ctf/df2_A"] = np.asarray(table["rlnDefocusV"], dtype=np.float32)
        data["ctf/type"] = np.array(["spline"] * n, dtype=object)
        data["alignments3D/psize_A"] = pixel
        if "rlnRandomSubset" in table:
            data["alignments3D/split"] = np.asarray(table["rlnRandomSubset"], dtype=np.uint32) - 1
        return data

    def _particles_output(self, job: Job, rng: np.random.Generator) -> Output:
        source, data = self._source_of(job, "particles")
        refined = data.copy()
        if "alignments3D/pose" not in refined.fields():
            refined.add_fields([(f"alignments3D/{spec[0]}", *spec[1:]) for spec in SLOT_FIELDS["alignments3D"]])
        refined["alignments3D/pose"] = rng.normal(size=(len(refined), 3)).astype(np.float32)
        if job.params.get("refine_gs_resplit"):
            refined["alignments3D/split"] = np.arange(len(refined)) % 2
        results = [Result("alignments3D", "alignments3D")] + [
            Result(result.name, result.dtype, True) for result in source.results if result.name != "alignments3D"]
        return Output("particle", results, data=refined)

    def _volume_rows(self, job: Job, output: str, names: tuple[str, ...], maps: dict[str, np.ndarray]) -> Dataset:
        data = Dataset.allocate(1, [(f"{name}/{spec[0]}", *spec[1:]) for name in names
                                    for spec in SLOT_FIELDS["volume"]])
        for name in names:
            path = f"{job.uid}/{job.uid}_{output}_{name}.mrc"
            self.files[path] = mrc_bytes(maps.get(name, np.zeros((self.box,) * 3, np.float32)), self.pixel)
            data[f"{name}/path"] = np.array([path], dtype=object)
            data[f"{name}/psize_A"] = self.pixel
        return data

    def _volume_output(self, job: Job, output: str, shell: int, names: tuple[str, ...]) -> Output:
        half_a, half_b, mask = band_limited_half_maps(self.box, shell, seed=int(job.uid[1:]))
        maps = {"map": (half_a + half_b) / 2, "map_half_A": half_a, "map_half_B": half_b, "mask_fsc": mask,
                "mask_fsc_auto": mask}
        return Output("volume", [Result(name, "volume") for name in names],
                      data=self._volume_rows(job, output, names, maps))

    # ======================================================================= CryoSPARC v5: REST

    def _endpoints(self) -> list[dict[str, Any]]:
        """(summary, method, path, parameters, request body, response) of each endpoint, as in api.pyi."""
        P, Q = "path", "query"
        return [
            {"summary": "health", "method": "get", "path": "/health", "params": [], "response": "string",
             "auth": False},
            {"summary": "login", "method": "post", "path": "/login", "params": [], "body": ("form", "Body_login"),
             "response": "Token", "auth": False},
            {"summary": "users.me", "method": "get", "path": "/users/me", "params": [], "response": "User"},
            {"summary": "config.get_version", "method": "get", "path": "/config/version", "params": [],
             "response": "string"},
            {"summary": "projects.find_one", "method": "get", "path": "/projects/{project_uid}",
             "params": [("project_uid", P)], "response": "Project"},
            {"summary": "projects.download_file", "method": "get", "path": "/projects/{project_uid}/files",
             "params": [("project_uid", P), ("path", Q)], "response": ("stream", "application/octet-stream")},
            {"summary": "workspaces.find_one", "method": "get", "path": "/workspaces/{project_uid}/{workspace_uid}",
             "params": [("project_uid", P), ("workspace_uid", P)], "response": ("anyOf", "Workspace", "Session")},
            {"summary": "resources.find_lanes", "method": "get", "path": "/resources/lanes", "params": [],
             "response": ("array", "SchedulerLane")},
            {"summary": "jobs.find_one", "method": "get", "path": "/jobs/{project_uid}/{job_uid}",
             "params": [("project_uid", P), ("job_uid", P)], "response": "Job"},
            {"summary": "jobs.delete", "method": "delete", "path": "/jobs/{project_uid}/{job_uid}",
             "params": [("project_uid", P), ("job_uid", P)], "response": None},
            {"summary": "jobs.create", "method": "post", "path": "/jobs/{project_uid}/{workspace_uid}",
             "params": [("project_uid", P), ("workspace_uid", P), ("type", Q, True), ("title", Q),
                        ("description", Q), ("created_by_job_uid", Q), ("enable_bench", Q)],
             "body": ("json", "Params"), "response": "Job"},
            {"summary": "jobs.connect", "method": "post", "path": "/jobs/{project_uid}/{job_uid}/connect/{input_name}",
             "params": [("project_uid", P), ("job_uid", P), ("input_name", P), ("source_job_uid", Q, True),
                        ("source_output_name", Q, True)], "response": "Job"},
            {"summary": "jobs.enqueue", "method": "post", "path": "/jobs/{project_uid}/{job_uid}/enqueue",
             "params": [("project_uid", P), ("job_uid", P), ("lane", Q), ("hostname", Q), ("gpus", Q),
                        ("no_check_inputs_ready", Q)], "response": "Job"},
            {"summary": "jobs.kill", "method": "post", "path": "/jobs/{project_uid}/{job_uid}/kill",
             "params": [("project_uid", P), ("job_uid", P)], "response": "Job"},
            {"summary": "jobs.load_output", "method": "get",
             "path": "/jobs/{project_uid}/{job_uid}/outputs/{output_name}/dataset",
             "params": [("project_uid", P), ("job_uid", P), ("output_name", P), ("version", Q), ("slots", Q)],
             "response": ("stream", "application/x-cryosparc-dataset")},
            {"summary": "jobs.load_input", "method": "get",
             "path": "/jobs/{project_uid}/{job_uid}/inputs/{input_name}/dataset",
             "params": [("project_uid", P), ("job_uid", P), ("input_name", P), ("force_join", Q), ("slots", Q)],
             "response": ("stream", "application/x-cryosparc-dataset")},
            {"summary": "jobs.save_output", "method": "post",
             "path": "/jobs/{project_uid}/{job_uid}/outputs/{output_name}/dataset",
             "params": [("project_uid", P), ("job_uid", P), ("output_name", P), ("filename", Q), ("version", Q)],
             "body": ("stream", "Dataset"), "response": "Job"},
            {"summary": "jobs.add_external_input", "method": "post",
             "path": "/jobs/{project_uid}/{job_uid}/external/inputs/{input_name}",
             "params": [("project_uid", P), ("job_uid", P), ("input_name", P)], "body": ("json", "InputSpec"),
             "response": "Job"},
            {"summary": "jobs.add_external_output", "method": "post",
             "path": "/jobs/{project_uid}/{job_uid}/external/outputs/{output_name}",
             "params": [("project_uid", P), ("job_uid", P), ("output_name", P)], "body": ("json", "OutputSpec"),
             "response": "Job"},
            {"summary": "jobs.mark_running", "method": "post", "path": "/jobs/{project_uid}/{job_uid}/mark_running",
             "params": [("project_uid", P), ("job_uid", P), ("status", Q)], "response": "Job"},
            {"summary": "jobs.mark_completed", "method": "post",
             "path": "/jobs/{project_uid}/{job_uid}/mark_completed", "params": [("project_uid", P), ("job_uid", P)],
             "response": "Job"},
            {"summary": "jobs.mark_failed", "method": "post", "path": "/jobs/{project_uid}/{job_uid}/mark_failed",
             "params": [("project_uid", P), ("job_uid", P), ("error", Q)], "response": "Job"},
        ]

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI description cryosparc-tools 5 builds its functions from (api.py, ``_process_schema``)."""
        paths: dict[str, dict[str, Any]] = {}
        for endpoint in self._endpoints():
            schema: dict[str, Any] = {"summary": endpoint["summary"], "parameters": [
                {"name": spec[0], "in": spec[1], "required": spec[1] == "path" or (len(spec) > 2 and spec[2]),
                 "schema": {}} for spec in endpoint["params"]]}
            body = endpoint.get("body")
            if body is not None:
                mime = {"form": "application/x-www-form-urlencoded", "json": "application/json",
                        "stream": "application/x-cryosparc-dataset"}[body[0]]
                schema["requestBody"] = {"required": True, "content": {mime: {"schema": {"title": body[1]}}}}
            response = endpoint["response"]
            if response is None:
                answer: dict[str, Any] = {"description": "Successful Response"}
            elif response == "string":
                answer = {"content": {"application/json": {"schema": {"type": "string"}}}}
            elif isinstance(response, tuple) and response[0] == "stream":
                answer = {"content": {response[1]: {"schema": {"type": "string", "format": "binary"}}}}
            elif isinstance(response, tuple) and response[0] == "array":
                answer = {"content": {"application/json": {"schema": {
                    "type": "array", "items": {"$ref": f"#/components/schemas/{response[1]}"}}}}}
            elif isinstance(response, tuple) and response[0] == "anyOf":
                answer = {"content": {"application/json": {"schema": {"anyOf": [
                    {"$ref": f"#/components/schemas/{name}"} for name in response[1:]]}}}}
            else:
                answer = {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{response}"}}}}
            schema["responses"] = {"200": answer}
            paths.setdefault(endpoint["path"], {})[endpoint["method"]] = schema
        return {"openapi": "3.1.0", "info": {"title": "CryoSPARC API", "version": self.version}, "paths": paths,
                "components": {"schemas": {}}}

    def _v5(self, role: str, method: str, path: str, query: dict[str, list[str]], headers: Any, body: bytes
            ) -> tuple[int, str, bytes]:
        api = f"{self.prefix}/api/cmd"
        if role != "web" or not path.startswith(api):
            if role == "web":
                return 200, "text/html", b"<!DOCTYPE html><html><body>CryoSPARC</body></html>"
            raise Refusal("Not Found", 404)
        path = path[len(api):] or "/"
        if path == "/openapi.json" and method == "GET":
            return 200, "application/json", json.dumps(self.openapi()).encode()
        for endpoint in self._endpoints():
            pattern = "^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", endpoint["path"]) + "$"
            match = re.match(pattern, path)
            if match and endpoint["method"].upper() == method:
                break
        else:
            raise Refusal("Not Found", 404)
        user_id = None
        if endpoint.get("auth", True):
            user_id = self._bearer(headers)
        arguments = dict(match.groupdict())
        for name, values in query.items():
            arguments[name] = values if name in ("slots", "gpus") else values[-1]
        handler = getattr(self, "_v5_" + endpoint["summary"].replace(".", "_"))
        result = handler(user_id, arguments, body)
        if isinstance(result, tuple):
            return result
        return 200, "application/json", json.dumps(result).encode()

    def _bearer(self, headers: Any) -> str:
        token = str(headers.get("Authorization", "")).removeprefix("Bearer ").strip()
        entry = self.tokens.get(token)
        if entry is None:
            raise Refusal("Not authenticated", 401)
        if entry[1] is not None:
            if entry[1] <= 0:
                raise Refusal("Token expired", 401)
            entry[1] -= 1
        return str(entry[0])

    def _v5_health(self, user: Any, arguments: dict[str, Any], body: bytes) -> Any:
        return "OK"

    def _v5_login(self, user: Any, arguments: dict[str, Any], body: bytes) -> Any:
        form = {key: values[-1] for key, values in parse_qs(body.decode()).items()}
        username, password = form.get("username", ""), form.get("password", "")
        if form.get("grant_type") not in (None, "password"):
            raise Refusal("Unsupported grant type", 400)
        account = None
        if username == "cryosparc" and password == hashlib.sha256(self.license.encode()).hexdigest():
            account = self.licence_user
        elif username in self.users and self.users[username].password is not None and password == hashlib.sha256(
                str(self.users[username].password).encode()).hexdigest():
            account = self.users[username]
        if account is None:
            raise Refusal("Incorrect username or password", 401)
        token = secrets.token_hex(16)
        self.tokens[token] = [account.id, self.token_uses]
        self.logins.append(account.email)
        self.record("login", user=account.email)
        return {"access_token": token, "token_type": "bearer"}

    def _v5_users_me(self, user: str, arguments: dict[str, Any], body: bytes) -> Any:
        account = self._user(user)
        return {"_id": account.id, "name": account.name, "first_name": account.name, "last_name": "",
                "emails": [{"address": account.email, "verified": True}]}

    def _v5_config_get_version(self, user: str, arguments: dict[str, Any], body: bytes) -> Any:
        return self.version

    def _v5_projects_find_one(self, user: str, arguments: dict[str, Any], body: bytes) -> Any:
        project = arguments["project_uid"]
        if project not in self.projects:
            raise Refusal(f"Project {project} not found", 404)
        return {"_id": "p" * 24, "uid": project, "uid_num": int(project[1:]), "title": project,
                "project_dir": f"/projects/{project}", "owner_user_id": user,
                "size_last_updated": "2025-01-01T00:00:00Z"}

    def _v5_projects_download_file(self, user: str, arguments: dict[str, Any], body: bytes) -> Any:
        path = arguments.get("path", "")
        if path not in self.files:
            raise Refusal(f"File {path} not found", 404)
        self.record("download", path=path)
        return 200, "application/octet-stream", self.files[path]

    def _v5_workspaces_find_one(self, user: str, arguments: dict[str, Any], body: bytes) -> Any:
        project, workspace = arguments["project_uid"], arguments["workspace_uid"]
        self._workspace(project, workspace)
        return {"_id": "w" * 24, "uid": workspace, "project_uid": project, "workspace_type": "base",
                "uid_num": int(workspace[1:]), "project_uid_num": int(project[1:])}

    def _v5_resources_find_lanes(self, user: str, arguments: dict[str, Any], body: bytes) -> Any:
        return [{"name": lane, "type": "node", "title": lane} for lane in self.lanes]

    def _v5_jobs_find_one(self, user: str, arguments: dict[str, Any], body: bytes) -> Any:
        job = self._job(arguments["project_uid"], arguments["job_uid"])
        self.read(job)
        return self._job_model(job)

    def _v5_jobs_delete(self, user: str, arguments: dict[str, Any], body: bytes) -> Any:
        self.delete(self._job(arguments["project_uid"], arguments["job_uid"]))
        return None

    def _v5_jobs_create(self, user: str, arguments: dict[str, Any], body: bytes) -> Any:
        params = json.loads(body or b"{}")
        job = self.create_job(arguments["project_uid"], arguments["workspace_uid"], arguments["type"], params,
                              arguments.get("title", ""), user)
        return self._job_model(job)

    def _v5_jobs_connect(self, user: str, arguments: dict[str, Any], body: bytes) -> Any:
        job = self._job(arguments["project_uid"], arguments["job_uid"])
        self.connect(job, arguments["input_name"], arguments["source_job_uid"], arguments["source_output_name"])
        return self._job_model(job)

    def _v5_jobs_enqueue(self, user: str, arguments: dict[str, Any], body: bytes) -> Any:
        job = self._job(arguments["project_uid"], arguments["job_uid"])
        self.enqueue(job, arguments.get("lane"), user)
        return self._job_model(job)

    def _v5_jobs_kill(self, user: str, arguments: dict[str, Any], body: bytes) -> Any:
        job = self._job(arguments["project_uid"], arguments["job_uid"])
        self.kill(job)
        return self._job_model(job)

    @staticmethod
    def _slots(arguments: dict[str, Any]) -> str | list[str]:
        values = arguments.get("slots")
        if not values:
            return "default"
        return values[0] if len(values) == 1 and values[0] in ("default", "passthrough", "all") else list(values)

    def _v5_jobs_load_output(self, user: str, arguments: dict[str, Any], body: bytes) -> Any:
        job = self._job(arguments["project_uid"], arguments["job_uid"])
        self.record("load_output_request", uid=job.uid, slots=arguments.get("slots"))
        data = self.load_output(job, arguments["output_name"], self._slots(arguments))
        return 200, "application/x-cryosparc-dataset", dataset_bytes(data)

    def _v5_jobs_load_input(self, user: str, arguments: dict[str, Any], body: bytes) -> Any:
        job = self._job(arguments["project_uid"], arguments["job_uid"])
        data = self.load_input(job, arguments["input_name"], self._slots(arguments))
        return 200, "application/x-cryosparc-dataset", dataset_bytes(data)

    def _v5_jobs_save_output(self, user: str, arguments: dict[str, Any], body: bytes) -> Any:
        job = self._job(arguments["project_uid"], arguments["job_uid"])
        self.save_output(job, arguments["output_name"], Dataset.load(io.BytesIO(body)))
        return self._job_model(job)

    def _v5_jobs_add_external_input(self, user: str, arguments: dict[str, Any], body: bytes) -> Any:
        job = self._job(arguments["project_uid"], arguments["job_uid"])
        spec = json.loads(body)
        slots = [slot if isinstance(slot, str) else slot["name"] for slot in spec.get("slots", [])]
        self.add_external_input(job, arguments["input_name"], spec["type"], slots, int(spec.get("count_min", 0)))
        return self._job_model(job)

    def _v5_jobs_add_external_output(self, user: str, arguments: dict[str, Any], body: bytes) -> Any:
        job = self._job(arguments["project_uid"], arguments["job_uid"])
        spec = json.loads(body)
        slots = [slot if isinstance(slot, str) else slot["name"] for slot in spec.get("slots", [])]
        self.add_external_output(job, arguments["output_name"], spec["type"], slots, spec.get("passthrough"))
        return self._job_model(job)

    def _v5_jobs_mark_running(self, user: str, arguments: dict[str, Any], body: bytes) -> Any:
        job = self._job(arguments["project_uid"], arguments["job_uid"])
        self.mark(job, arguments.get("status", "running"))
        return self._job_model(job)

    def _v5_jobs_mark_completed(self, user: str, arguments: dict[str, Any], body: bytes) -> Any:
        job = self._job(arguments["project_uid"], arguments["job_uid"])
        self.mark(job, "completed")
        return self._job_model(job)

    def _v5_jobs_mark_failed(self, user: str, arguments: dict[str, Any], body: bytes) -> Any:
        job = self._job(arguments["project_uid"], arguments["job_uid"])
        self.mark(job, "failed")
        return self._job_model(job)

    def _job_model(self, job: Job) -> dict[str, Any]:
        """The job as CryoSPARC v5 answers it (cryosparc-tools 5's ``Job`` model)."""
        from cryosparc.models.job import Job as JobModel
        from cryosparc.models.job_spec import (
            Connection,
            InputResult,
            Inputs,
            InputSlot,
            JobSpec,
            OutputResult,
            Outputs,
            Params,
            ResourceSpec,
        )
        from cryosparc.models.job_spec import Input as InputModel
        from cryosparc.models.job_spec import Output as OutputModel

        inputs = {}
        for name, item in job.inputs.items():
            connections = []
            for source_uid, source_output in item.connections:
                source = self.jobs[source_uid].outputs[source_output]
                connections.append(Connection(job_uid=source_uid, output=source_output, results=[
                    InputResult(name=result.name if result.name in item.slots else None, dtype=result.dtype,
                                job_uid=source_uid, output=source_output, result=result.name)
                    for result in source.results]))
            inputs[name] = InputModel(type=item.type, title=name, count_min=item.count_min,
                                      slots=[InputSlot(name=slot, dtype=slot, required=True) for slot in item.slots],
                                      connections=connections)
        outputs = {}
        for name, output in job.outputs.items():
            count = len(output.data) if output.data is not None else 0
            results = []
            for result in output.results:
                metafile = self.metafile(job, name, result)
                results.append(OutputResult(name=result.name, dtype=result.dtype, passthrough=result.passthrough,
                                            versions=[0] if metafile else [], metafiles=[metafile] if metafile else [],
                                            num_items=[count] if metafile else []))
            outputs[name] = OutputModel(type=output.type, title=name, passthrough=output.passthrough, results=results,
                                        num_items=count)
        model = JobModel(uid=job.uid, uid_num=int(job.uid[1:]), project_uid=job.project,
                         project_uid_num=int(job.project[1:]), status_num=len(job.history), build_errors=[],
                         workspace_uids=[job.workspace], job_dir=job.uid,
                         job_dir_size_last_updated=datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC),
                         title=job.title, status=job.status, created_by_user_id=job.created_by,
                         spec=JobSpec(type=job.type if job.type != "source" else "homo_refine_new",
                                      params=Params(**job.params), inputs=Inputs(inputs), outputs=Outputs(outputs),
                                      ui_tile_width=1, ui_tile_height=1, resource_spec=ResourceSpec()))
        return model.model_dump(mode="json", by_alias=True)

    # ======================================================================= CryoSPARC v4: JSON-RPC

    def _v4(self, role: str, method: str, path: str, headers: Any, body: bytes) -> tuple[int, str, bytes]:
        if role == "web":
            return 200, "text/html", b"<!DOCTYPE html><html><body>CryoSPARC</body></html>"
        if headers.get("License-ID") != self.license:
            return 403, "text/html", b"<html><body>403 Forbidden: License ID is invalid</body></html>"
        if method != "POST":
            return 405, "text/plain", b"Method Not Allowed"
        if path == "/api":
            return self._rpc(role, json.loads(body))
        if role != "vis":
            return 404, "text/plain", b"Not Found"
        match = re.match(r"^/external/projects/(\w+)/jobs/(\w+)/outputs/([^/]+)/dataset$", path)
        try:
            if match:
                job = self._job(match.group(1), match.group(2))
                self.save_output(job, match.group(3), Dataset.load(io.BytesIO(body)))
                return 200, "text/plain", b"Dataset saved"
            request = json.loads(body)
            if path == "/load_job_input":
                job = self._job(request["project_uid"], request["job_uid"])
                slots = list(request.get("slots") or [])
                data = self.load_input(job, request["input_name"], slots or "all")
                return 200, "application/x-cryosparc-dataset", dataset_bytes(data)
            if path == "/get_project_file":
                if request["path"] not in self.files:
                    return 404, "text/plain", b"File not found"
                self.record("download", path=request["path"])
                return 200, "application/octet-stream", self.files[request["path"]]
        except Refusal as refusal:
            return refusal.status, "text/plain", str(refusal).encode()
        return 404, "text/plain", b"Not Found"

    def _rpc(self, role: str, request: dict[str, Any]) -> tuple[int, str, bytes]:
        functions = {name.removeprefix(f"_{role}_").replace("__", "."): getattr(self, name)
                     for name in dir(self) if name.startswith(f"_{role}_")}
        answer: dict[str, Any] = {"jsonrpc": "2.0", "id": request.get("id")}
        function = functions.get(request.get("method", ""))
        if function is None:
            answer["error"] = {"code": -32601, "name": "MethodNotFound",
                               "message": f"no method {request.get('method')}"}
            return 200, "application/json", json.dumps(answer).encode()
        params = request.get("params") or []
        try:
            bound = inspect.signature(function).bind(*params) if isinstance(params, list) else \
                inspect.signature(function).bind(**params)
        except TypeError as error:
            answer["error"] = {"code": -32602, "name": "TypeError", "message": f"{request['method']}: {error}"}
            return 200, "application/json", json.dumps(answer).encode()
        try:
            answer["result"] = function(*bound.args, **bound.kwargs)
        except Refusal as refusal:
            answer["error"] = {"code": 500, "name": "AssertionError", "message": str(refusal)}
        return 200, "application/json", json.dumps(answer).encode()

    def _procs(self, role: str) -> dict[str, Any]:
        names = [name.removeprefix(f"_{role}_").replace("__", ".") for name in dir(self)
                 if name.startswith(f"_{role}_")]
        return {"procs": [{"name": name} for name in names]}

    def _job_doc(self, job: Job) -> dict[str, Any]:
        """The job document CryoSPARC v4 answers (what cryosparc-tools 4's job.py reads of it)."""
        results = []
        for name, output in job.outputs.items():
            for result in output.results:
                metafile = self.metafile(job, name, result)
                results.append({"group_name": name, "name": result.name, "type": result.dtype,
                                "passthrough": result.passthrough, "metafiles": [metafile] if metafile else [],
                                "versions": [0] if metafile else [],
                                "num_items": [len(output.data)] if output.data is not None else [],
                                "min_fields": [[spec[0], spec[1]] for spec in SLOT_FIELDS[result.dtype]]})
        return {"uid": job.uid, "project_uid": job.project, "workspace_uids": [job.workspace],
                "job_type": job.type if job.type != "source" else "homo_refine_new", "title": job.title,
                "status": job.status, "created_by_user_id": job.created_by,
                "params_spec": {name: {"value": value} for name, value in job.params.items()},
                "input_slot_groups": [{"name": name, "type": item.type, "count_min": item.count_min,
                                       "slots": [{"name": slot, "type": slot, "optional": False}
                                                 for slot in item.slots],
                                       "connections": [{"job_uid": source, "group_name": output}
                                                       for source, output in item.connections]}
                                      for name, item in job.inputs.items()],
                "output_result_groups": [{"name": name, "type": output.type, "passthrough": output.passthrough}
                                         for name, output in job.outputs.items()],
                "output_results": results}

    # -- command_core (base port + 2)
    def _core_system__describe(self) -> Any:
        return self._procs("core")

    def _core_get_running_version(self) -> str:
        return self.version

    def _core_get_id_by_email(self, email: str) -> str:
        if email not in self.users:
            raise Refusal(f"User {email} not found")
        return self.users[email].id

    def _core_get_id_by_email_password(self, email: str, password: str) -> str:
        user = self.users.get(email)
        if user is None or user.password is None or user.password != password:
            raise Refusal("Incorrect email or password")
        return user.id

    def _core_get_project(self, project_uid: str) -> Any:
        if project_uid not in self.projects:
            raise Refusal(f"Project {project_uid} not found")
        return {"uid": project_uid, "title": project_uid, "project_dir": f"/projects/{project_uid}"}

    def _core_get_workspace(self, project_uid: str, workspace_uid: str) -> Any:
        self._workspace(project_uid, workspace_uid)
        return {"uid": workspace_uid, "project_uid": project_uid}

    def _core_get_scheduler_lanes(self) -> Any:
        return [{"name": lane, "type": "node", "title": lane, "desc": ""} for lane in self.lanes]

    def _core_get_job(self, project_uid: str, job_uid: str, *fields: str) -> Any:
        job = self._job(project_uid, job_uid)
        self.read(job)
        return self._job_doc(job)

    def _core_make_job(self, job_type: str, project_uid: str, workspace_uid: str, user_id: str, uid: Any = None,
                       created_by_job_uid: Any = None, title: Any = None, desc: Any = None, params: Any = None,
                       input_group_connects: Any = None, enable_bench: bool = False, priority: Any = None,
                       do_layout: bool = True) -> str:
        self._user(user_id)
        job = self.create_job(project_uid, workspace_uid, job_type, dict(params or {}), title or "", user_id)
        try:
            for name, sources in (input_group_connects or {}).items():
                for source in ([sources] if isinstance(sources, str) else sources):
                    source_uid, source_output = source.split(".", 1)
                    self.connect(job, name, source_uid, source_output)
        except Refusal:
            del self.jobs[job.uid]  # one call: made with its connections, or not at all
            raise
        return job.uid

    def _core_enqueue_job(self, project_uid: str, job_uid: str, lane: Any = None, user_id: Any = None,
                          hostname: Any = None, gpus: Any = False, no_check_inputs_ready: bool = False) -> str:
        self.enqueue(self._job(project_uid, job_uid), lane, user_id)
        return "queued"

    def _core_kill_job(self, project_uid: str, job_uid: str, killed_by_user_id: Any = None) -> Any:
        self.kill(self._job(project_uid, job_uid))
        return True

    def _core_delete_job(self, project_uid: str, job_uid: str, force: bool = False) -> Any:
        self.delete(self._job(project_uid, job_uid))
        return True

    def _core_run_external_job(self, project_uid: str, job_uid: str, status: str = "waiting") -> Any:
        self.mark(self._job(project_uid, job_uid), status)
        return status

    def _core_set_job_status(self, project_uid: str, job_uid: str, status: str) -> Any:
        job = self._job(project_uid, job_uid)
        if job.type != "snowflake":
            raise Refusal("only External jobs' status is set")
        self.mark(job, status)
        return status

    # -- command_vis (base port + 3)
    def _vis_system__describe(self) -> Any:
        return self._procs("vis")

    def _vis_create_external_job(self, project_uid: str, workspace_uid: str, user: str, title: Any = None,
                                 desc: Any = None) -> str:
        return self.create_job(project_uid, workspace_uid, "snowflake", {}, title or "", user).uid

    def _vis_add_external_job_input(self, project_uid: str, job_uid: str, type: str, name: str,
                                    min: int = 0, max: Any = "inf", slots: Any = None, title: Any = None) -> Any:
        slots = [slot if isinstance(slot, str) else slot["prefix"] for slot in (slots or [])]
        self.add_external_input(self._job(project_uid, job_uid), name, type, slots, min)
        return True

    def _vis_add_external_job_output(self, project_uid: str, job_uid: str, type: str, name: str,
                                     slots: Any = None, passthrough: Any = None, title: Any = None) -> Any:
        slots = [slot if isinstance(slot, str) else slot["prefix"] for slot in (slots or [])]
        self.add_external_output(self._job(project_uid, job_uid), name, type, slots, passthrough)
        return True

    def _vis_connect_external_job(self, project_uid: str, source_job_uid: str, source_output: str,
                                  target_job_uid: str, target_input: str, slots: Any = None, title: Any = None,
                                  desc: Any = None) -> Any:
        job = self._job(project_uid, target_job_uid)
        if target_input not in job.inputs:  # made here, with the given slots (at least one: job.py's connect)
            source = self._job(project_uid, source_job_uid)
            kind = source.outputs[source_output].type if source_output in source.outputs else "particle"
            self.add_external_input(job, target_input, kind, [slot if isinstance(slot, str) else slot["prefix"]
                                                             for slot in (slots or [])], 1)
        self.connect(job, target_input, source_job_uid, source_output)
        return True

    # -- command_rtp (base port + 5)
    def _rtp_system__describe(self) -> Any:
        return {"procs": [{"name": "system.describe"}]}


@contextlib.contextmanager
def running(major: int, **options: Any) -> Iterator[FakeCryoSPARC]:
    """A started server, stopped at the end."""
    server = FakeCryoSPARC(major, **options)
    with server:
        yield server


def unused_port() -> int:
    """A port nothing listens on (an unreachable server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    sock.close()
    return port


__all__ = ["FakeCryoSPARC", "band_limited_half_maps", "running", "unused_port", "uuid"]
