"""The CryoSPARC commands through the real cryosparc-tools client, 5.x (installed) and 4.x
(``build/cryosparc-tools-4``, put there by scripts/setup.sh), against a CryoSPARC server on 127.0.0.1
(``tests/cryosparc_server.py``) that checks every request as CryoSPARC does.

The 5.x client runs in this process; the 4.x client in a command started with its folder first on
``PYTHONPATH`` (both are the package ``cryosparc``). Poll and retry intervals are set tiny through their
environment variables."""

from __future__ import annotations

import importlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tomllib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from cryosparc.dataset import Dataset

from cryosieve.backends.cryosparc import CryoSparcRefiner
from cryosieve.cryosparc.connection import Connection, connection_from_environment, parse_cryosparcm_env
from cryosieve.cryosparc.graph import RefinementOptions, refinement_graph
from cryosieve.cryosparc.session import connect
from cryosieve.cryosparc.source import parse_source_job, source_of_path
from cryosieve.errors import CryoSieveInputError
from cryosieve.io.cs import particles_to_dataset
from cryosieve.io.star import read_particles
from cryosieve.refine import RefineSettings, refine_files
from cryosparc_server import SLOT_FIELDS, FakeCryoSPARC, unused_port
from safety_helpers import SmallData, make_small_data, tree

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
#: cryosparc-tools 4, installed apart by scripts/setup.sh (the same package name as the 5.x one).
TOOLS4 = Path(os.environ.get("CRYOSIEVE_CRYOSPARC_TOOLS_4", ROOT / "build" / "cryosparc-tools-4"))
BOX, PIXEL = 64, 2.5
#: Tiny intervals for the tests (the defaults are 20 s, 30 s and 300 s).
FAST = {"CRYOSPARC_POLL_SECONDS": "0.01", "CRYOSPARC_COMMAND_RETRY_SECONDS": "0",
        "CRYOSPARC_WAIT_RETRY_SECONDS": "5"}
MAJORS = [pytest.param(5, id="tools5"), pytest.param(4, id="tools4")]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> SmallData:
    return make_small_data(tmp_path_factory.mktemp("cryosparc") / "data", count=160)


@pytest.fixture()
def data(small: SmallData, tmp_path: Path) -> SmallData:
    folder = tmp_path / "data"
    shutil.copytree(small.folder, folder)
    return SmallData(folder)


@pytest.fixture(autouse=True)
def no_cryosparc_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CRYOSPARC_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PATH", "/nonexistent")  # no cryosparcm here
    monkeypatch.setenv("XDG_CONFIG_HOME", "/nonexistent")  # no stored cryosparc-tools login either


def tools4() -> Path:
    if not (TOOLS4 / "cryosparc").is_dir():
        pytest.fail(f"cryosparc-tools 4 is not in {TOOLS4}: run scripts/setup.sh (as .ci/run does)")
    return TOOLS4


@pytest.fixture()
def server(request: pytest.FixtureRequest) -> Iterator[FakeCryoSPARC]:
    """A v5 server for the 5.x client, a v4 one for the 4.x client (``major`` parameter, 5 by default)."""
    major = getattr(request, "param", 5)
    with FakeCryoSPARC(major, box=BOX, pixel=PIXEL, resolution_shell=lambda count: 20) as fake:
        yield fake


class Runner:
    """Runs a command with the 5.x client in this process (or, ``fresh``, in a new one), or with the 4.x
    client in a new one; returns the exit status and standard error (standard output in :attr:`out`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
        self.monkeypatch, self.capsys = monkeypatch, capsys
        self.out = ""

    def __call__(self, major: int, program: str, args: list[str], env: dict[str, str],
                 fresh: bool = False) -> tuple[int, str]:
        environment = {**FAST, **env}
        if major == 5 and not fresh:
            for name in list(os.environ):
                if name.startswith("CRYOSPARC_"):
                    self.monkeypatch.delenv(name)
            for name, value in environment.items():
                self.monkeypatch.setenv(name, value)
            self.capsys.readouterr()
            code = importlib.import_module(f"cryosieve.cli.{program}").main(args)
            captured = self.capsys.readouterr()
            self.out = captured.out
            return code, captured.err
        full = {name: value for name, value in os.environ.items() if not name.startswith("CRYOSPARC_")}
        path = [str(tools4()), str(SRC)] if major == 4 else [str(SRC)]
        full.update(environment, PATH="/usr/bin:/bin", PYTHONPATH=os.pathsep.join(path))
        done = subprocess.run([sys.executable, "-m", f"cryosieve.cli.{program}", *args], env=full,
                              capture_output=True, text=True, timeout=300, check=False)
        self.out = done.stdout
        return done.returncode, done.stderr


@pytest.fixture()
def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Runner:
    return Runner(monkeypatch, capsys)


def source_dataset(data: SmallData, seed: int = 5) -> Dataset:
    """The data set's particles as CryoSPARC holds them (every field of the blob and ctf slots)."""
    dataset = particles_to_dataset(read_particles(data.star), seed=seed)
    present = set(dataset.fields())
    dataset.add_fields([(f"{slot}/{spec[0]}", *spec[1:]) for slot in ("blob", "ctf") for spec in SLOT_FIELDS[slot]
                        if f"{slot}/{spec[0]}" not in present])
    dataset["blob/sign"] = -1.0
    dataset["blob/import_sig"] = np.arange(len(dataset), dtype=np.uint64) + 11
    dataset["ctf/type"] = np.array(["spline"] * len(dataset), dtype=object)
    return dataset


def cs_in_job_folder(data: SmallData, server: FakeCryoSPARC, job: str = "J7") -> Path:
    """The particles as the .cs output ``particles`` of CryoSPARC job ``job``, in its folder and on the server."""
    dataset = source_dataset(data)
    folder = data.folder / job
    folder.mkdir()
    path = folder / f"{job}_particles.cs"
    with open(path, "wb") as handle:
        dataset.save(handle)
    server.add_source_job(job, "particles", Dataset.load(str(path)), passthrough=("blob", "ctf"))
    return path


def uids(path: Path) -> np.ndarray:
    return np.sort(np.asarray(Dataset.load(str(path))["uid"]))


def refine_args(data: SmallData, out: Path, *extra: str, inputs: tuple[str, ...] = ()) -> list[str]:
    return ["--i", *(inputs or (str(data.star),)), "--directory", str(data.folder), "--o", str(out), "--user",
            "me@lab.org", "--project", "P3", "--workspace", "W1", "--lane", "gpu", "--quiet", *extra]


def core_args(data: SmallData, particles: Path, out: Path) -> list[str]:
    return ["--i", str(particles), "--directory", str(data.folder), "--o", str(out), "--volume", str(data.half1),
            "--volume", str(data.half2), "--mask", str(data.mask), "--frequency", "20", "--retention_ratio", "0.6",
            "--quiet", "--cryosparc_user", "me@lab.org", "--cryosparc_project", "P3", "--cryosparc_workspace", "W2"]


def one_line(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- where and who (item 4)


def test_the_original_variables_and_base_url_are_read() -> None:
    # CryoSieve 1.3.3 reads CRYOSPARC_MASTER_HOSTNAME and CRYOSPARC_COMMAND_CORE_PORT (base port + 2)
    original = connection_from_environment("me@lab.org", {"CRYOSPARC_MASTER_HOSTNAME": "gpu01",
                                                          "CRYOSPARC_COMMAND_CORE_PORT": "39002"}, dict)
    assert original.url == "http://gpu01:39000" and original.host_and_base_port == ("gpu01", 39000)
    assert "CRYOSPARC_COMMAND_CORE_PORT" in original.origin
    text = ('export "CRYOSPARC_MASTER_HOSTNAME=gpu01"\nexport "CRYOSPARC_BASE_PORT=61000"\n'
            'export "CRYOSPARC_LICENSE_ID=abc-licence"\necho unrelated\n')
    assert parse_cryosparcm_env(text) == {"CRYOSPARC_MASTER_HOSTNAME": "gpu01", "CRYOSPARC_BASE_PORT": "61000",
                                          "CRYOSPARC_LICENSE_ID": "abc-licence"}
    filled = connection_from_environment("me@lab.org", {"CRYOSPARC_MASTER_HOSTNAME": "here"},
                                         lambda: parse_cryosparcm_env(text))
    assert (filled.url, filled.license) == ("http://here:61000", "abc-licence")
    assert "abc-licence" not in repr(filled) and "abc-licence" not in filled.describe()
    proxied = connection_from_environment(None, {"CRYOSPARC_BASE_URL": "https://cs.lab.org/cryosparc/",
                                                 "CRYOSPARC_MASTER_HOSTNAME": "ignored", "CRYOSPARC_BASE_PORT": "1"},
                                          dict)
    assert proxied.url == "https://cs.lab.org/cryosparc" and proxied.host_and_base_port is None
    with pytest.raises(CryoSieveInputError, match="CRYOSPARC_BASE_URL"):
        connection_from_environment("me@lab.org", {}, dict)
    with pytest.raises(CryoSieveInputError, match="CRYOSPARC_BASE_PORT"):
        connection_from_environment(None, {"CRYOSPARC_MASTER_HOSTNAME": "h", "CRYOSPARC_BASE_PORT": "x"}, dict)
    with pytest.raises(CryoSieveInputError, match="CRYOSPARC_BASE_URL"):
        connection_from_environment(None, {"CRYOSPARC_BASE_URL": "cs.lab.org:39000"}, dict)


def original_environment(server: FakeCryoSPARC) -> dict[str, str]:
    """What a user set up for CryoSieve 1.3.3 has: host, command_core port and licence id, no password."""
    return {"CRYOSPARC_MASTER_HOSTNAME": "127.0.0.1", "CRYOSPARC_COMMAND_CORE_PORT": str(server.base_port + 2),
            "CRYOSPARC_LICENSE_ID": server.license}


def test_a_1_3_3_setup_connects_with_cryosparc_tools_4(data: SmallData, run: Runner, tmp_path: Path) -> None:
    """Licence id, host and command_core port, no password, no cryosparcm on PATH (item 4; the jobs made so are
    the user's: test_cs_input_is_refined_through_an_external_job_of_its_rows[tools4])."""
    with FakeCryoSPARC(4) as server:
        code, err = run(4, "csrefine", refine_args(data, tmp_path / "s.csv", "--lane", "nowhere"),
                        original_environment(server))
        assert code == 2 and one_line(err) == [
            "cryosieve-csrefine: error: CryoSPARC lane 'nowhere': not found (lanes: default, gpu)"], err
        assert ("core", "POST", "/api") in server.requests


# ----------------------------------------------------------------------------- errors by cause (item 2)


def v5_connection(server: FakeCryoSPARC, **options: Any) -> Connection:
    env = {**server.environment(), **FAST}
    connection = connection_from_environment("me@lab.org", env, dict)
    return Connection(**{**connection.__dict__, **options})


@pytest.mark.parametrize(("fault", "expected"), [
    (("web GET .*/openapi.json$", 503, "Service Unavailable", "text/plain"), "HTTP 503"),
    (("web GET .*/openapi.json$", 200, "<html><body>Welcome</body></html>", "text/html"), "not JSON"),
    (("web GET .*/openapi.json$", 404, '{"detail":"Not Found"}', "application/json"), "HTTP 404"),
    (("web GET .*/users/me$", 500, '{"detail":"database down"}', "application/json"), "database down")])
def test_server_errors_are_retried_and_named_not_taken_for_refused_credentials(
        server: FakeCryoSPARC, fault: tuple[str, int, str, str], expected: str) -> None:
    server.fail(fault[0], fault[1], fault[2], fault[3], times=10)
    waits: list[float] = []
    with pytest.raises(CryoSieveInputError) as error:
        connect(v5_connection(server, retries=3, retry_seconds=0.5), sleep=waits.append)
    message = str(error.value)
    assert "refused the credentials" not in message and "server errors" in message and expected in message
    assert server.url in message and "after 3 attempts" in message and waits == [0.5, 0.5]
    assert "\n" not in message and "secret-pw" not in message and server.license not in message


def test_refused_credentials_are_refused_at_once_and_never_shown(server: FakeCryoSPARC) -> None:
    waits: list[float] = []
    wrong = Connection(server.url, "me@lab.org", password="not-the-password", retries=3)
    with pytest.raises(CryoSieveInputError, match="refused the credentials") as error:
        connect(wrong, sleep=waits.append)
    assert waits == [] and len(server.named("login")) == 0
    assert "not-the-password" not in str(error.value)
    assert [path for _, _, path in server.requests].count("/api/cmd/login") == 1


def test_an_unreachable_server_is_tried_the_stated_number_of_times_and_the_library_stays_quiet() -> None:
    connection = Connection(f"http://127.0.0.1:{unused_port()}", "me@lab.org", password="pw", retries=4,
                            retry_seconds=7)
    waits: list[float] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CryoSieveInputError, match="cannot reach CryoSPARC at http://127") as error:
            connect(connection, sleep=waits.append)
    assert waits == [7, 7, 7] and "after 4 attempts" in str(error.value) and "refused" in str(error.value).lower()
    assert [str(item.message) for item in caught if "cryosparc" in item.filename] == []


@pytest.mark.parametrize("major", MAJORS)
def test_an_unreachable_server_prints_our_lines_only(major: int, data: SmallData, run: Runner,
                                                     tmp_path: Path) -> None:
    """The library's own retry warnings stay off the console; each of our attempts makes one request (a
    retry count of 1 makes one, not none) and waits only our interval (item 5)."""
    port = unused_port()
    for retries in (3, 1) if major == 4 else (3,):
        env = {"CRYOSPARC_MASTER_HOSTNAME": "127.0.0.1", "CRYOSPARC_BASE_PORT": str(port),
               "CRYOSPARC_LICENSE_ID": "0123abcd-0000-4000-8000-00000000beef", "CRYOSPARC_PASSWORD": "pw",
               "CRYOSPARC_COMMAND_RETRIES": str(retries), "CRYOSPARC_COMMAND_RETRY_SECONDS": "0.05"}
        code, err = run(major, "csrefine", refine_args(data, tmp_path / "s.csv"), env, fresh=True)
        lines = one_line(err)
        assert code == 2 and "cannot reach CryoSPARC" in lines[-1] and f"after {retries} attempts" in lines[-1]
        assert "refused" in lines[-1].lower()  # the cause: connection refused, not "<unknown>"
        assert len(lines) == retries and all("attempt" in line for line in lines[:-1]), err
        assert "***" not in err and "Warning" not in err and "Traceback" not in err


@pytest.mark.parametrize("major", MAJORS)
def test_a_wrong_licence_or_password_is_refused_in_one_line(major: int, data: SmallData, run: Runner,
                                                            tmp_path: Path) -> None:
    with FakeCryoSPARC(major) as server:
        wrong = "ffffffff-1111-4222-8333-444444444444"
        env = {**server.environment(), "CRYOSPARC_PASSWORD": "wrong-password", "CRYOSPARC_LICENSE_ID": wrong}
        code, err = run(major, "csrefine", refine_args(data, tmp_path / "s.csv"), env)
        assert code == 2 and one_line(err)[-1].count("refused the credentials") == 1, err
        assert wrong not in err and "wrong-password" not in err and len(one_line(err)) == 1
        assert server.made() == []


# ----------------------------------------------------------------------------- versions (items 3, 9)


def test_cryosparc_tools_5_is_refused_by_a_v4_server_with_what_to_install(data: SmallData, run: Runner,
                                                                         tmp_path: Path) -> None:
    with FakeCryoSPARC(4) as server:
        code, err = run(5, "csrefine", refine_args(data, tmp_path / "s.csv"), server.environment())
    message = one_line(err)[-1]
    assert code == 2 and "is v4.7.1" in message and "cryosparc-tools>=4.4,<5" in message, err
    assert "refused the credentials" not in err and len(one_line(err)) == 1


def test_cryosparc_tools_4_is_refused_by_a_v5_server_with_what_to_install(data: SmallData, run: Runner,
                                                                         tmp_path: Path) -> None:
    with FakeCryoSPARC(5) as server:
        code, err = run(4, "csrefine", refine_args(data, tmp_path / "s.csv"), server.environment())
    assert code == 2 and "is v5.0.3" in one_line(err)[-1] and "cryosparc-tools>=5,<6" in one_line(err)[-1], err
    assert "refused the credentials" not in err


def test_each_cryosparc_extra_declares_one_major_of_cryosparc_tools() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["cryosparc"] == ["cryosparc-tools>=5.0,<6"]
    assert extras["cryosparc4"] == ["cryosparc-tools>=4.4,<5"]


def test_a_base_url_behind_a_proxy_is_reached_whatever_else_is_set(data: SmallData, run: Runner,
                                                                   tmp_path: Path) -> None:  # item 3
    """cryosparc-tools 5 reads CRYOSPARC_BASE_URL at its import: host and port given as well made it refuse.
    (The command, started with the variables set, logs in through the proxy's path and reads the lanes.)"""
    with FakeCryoSPARC(5, prefix="/cryosparc") as server:
        env = {"CRYOSPARC_BASE_URL": server.url, "CRYOSPARC_MASTER_HOSTNAME": "elsewhere",
               "CRYOSPARC_BASE_PORT": "1", "CRYOSPARC_PASSWORD": "secret-pw"}
        code, err = run(5, "csrefine", refine_args(data, tmp_path / "s.csv", "--lane", "nowhere"), env, fresh=True)
        assert code == 2 and one_line(err) == [
            "cryosieve-csrefine: error: CryoSPARC lane 'nowhere': not found (lanes: default, gpu)"], err
        assert server.logins == ["me@lab.org"]
        assert {path for _, _, path in server.requests} >= {"/cryosparc/api/cmd/resources/lanes"}
        assert all(path.startswith("/cryosparc/api/cmd/") for _, _, path in server.requests)


# ----------------------------------------------------------------------------- selections given back (items 1, 7)


@pytest.mark.parametrize("server", MAJORS, indirect=True)
def test_a_selection_goes_back_as_the_source_jobs_own_rows(server: FakeCryoSPARC, data: SmallData, run: Runner,
                                                           tmp_path: Path) -> None:
    path = cs_in_job_folder(data, server)
    out = tmp_path / "kept.cs"
    code, err = run(server.major, "core", core_args(data, path, out), server.environment())
    assert code == 0, err
    external = [job for job in server.made() if job.type == "snowflake"]
    assert len(external) == 1 and external[0].workspace == "W2" and external[0].status == "completed"
    job = external[0]
    assert job.inputs["particles"].slots == ["blob"] and job.inputs["particles"].connections == [("J7", "particles")]
    source = server.output("J7", "particles")
    order = np.argsort(np.asarray(source["uid"]))
    for name, file in (("kept", out), ("sieved", tmp_path / "kept_sieved.cs")):
        assert job.outputs[name].passthrough == "particles"
        given = server.output(job.uid, name)
        assert np.array_equal(np.sort(np.asarray(given["uid"])), uids(file))
        assert set(given.fields()) == set(source.fields())
        rows = order[np.searchsorted(np.asarray(source["uid"])[order], np.asarray(given["uid"]))]
        for field in source.fields():  # every field the source's own, nothing zero-filled
            assert np.array_equal(np.asarray(given[field]), np.asarray(source[field])[rows]), field
    assert len(uids(out)) + len(uids(tmp_path / "kept_sieved.cs")) == 160
    assert_read_once(server)


def assert_read_once(server: FakeCryoSPARC) -> None:
    """The source job's particles were read once, from one slot named (item 7)."""
    if server.major == 5:
        reads = [item for item in server.named("load_output_request") if item["uid"] == "J7"]
        assert len(reads) == 1 and reads[0]["slots"] is not None and len(reads[0]["slots"]) == 1, reads
    else:  # cryosparc-tools 4 downloads the files of the slots asked for
        downloads = [item["path"] for item in server.named("download") if item["path"].startswith("J7/")]
        assert len(downloads) == 1, downloads


@pytest.mark.parametrize("server", MAJORS, indirect=True)
def test_the_source_particles_are_read_from_one_named_slot(server: FakeCryoSPARC, data: SmallData, run: Runner,
                                                           tmp_path: Path) -> None:
    """Item 7: checking a selection reads one slot of the source (5.x loaded the server's default slots for an
    empty list, 4.x every slot's file)."""
    path = cs_in_job_folder(data, server)
    other = Dataset.load(str(path))
    other["uid"] = np.asarray(other["uid"]) + np.uint64(1)  # then refused, having read them
    server.jobs["J7"].outputs["particles"].data = other
    server._write_files(server.jobs["J7"])
    code, err = run(server.major, "core", core_args(data, path, tmp_path / "kept.cs"), server.environment())
    assert code == 2 and "are not among the output 'particles'" in err, err
    assert_read_once(server)


@pytest.mark.parametrize("problem", ["project", "star", "foreign uids"])
def test_a_return_that_cannot_be_made_is_refused_before_writing(server: FakeCryoSPARC, data: SmallData,
                                                                run: Runner, tmp_path: Path, problem: str) -> None:
    path = cs_in_job_folder(data, server)
    args = core_args(data, path, tmp_path / "kept.cs")
    if problem == "project":
        args[args.index("--cryosparc_project") + 1] = "P9"
    elif problem == "star":
        args = core_args(data, data.star, tmp_path / "kept.star")
    else:
        other = Dataset.load(str(path))
        other["uid"] = np.asarray(other["uid"]) + np.uint64(1)
        server.jobs["J7"].outputs["particles"].data = other
    code, err = run(5, "core", args, server.environment())
    assert code == 2 and len(one_line(err)) == 1 and "Traceback" not in err
    assert not list(tmp_path.glob("kept*")) and server.made() == []


def test_an_external_job_that_fails_is_deleted_and_named(server: FakeCryoSPARC, data: SmallData, run: Runner,
                                                         tmp_path: Path) -> None:
    path = cs_in_job_folder(data, server)
    server.fail("web POST .*/outputs/sieved/dataset$", 422, '{"detail":"Output sieved: disk full"}')
    code, err = run(5, "core", core_args(data, path, tmp_path / "kept.cs"), server.environment())
    external = [uid for item in server.named("create") for uid in [item["uid"]] if item["type"] == "snowflake"]
    assert code != 0 and len(external) == 1
    assert f"External job P3 {external[0]}" in err and "deleted" in err and "disk full" in err
    assert external[0] not in server.jobs  # nothing left behind
    assert (tmp_path / "kept.cs").is_file()  # the files are written; the message says so
    assert "the selection is written" in err


# ----------------------------------------------------------------------------- refinement


def test_the_job_graph_follows_the_original() -> None:
    options = RefinementOptions(lane="gpu")
    plain = refinement_graph(star=Path("/a/p.star"), blob_folder=Path("/a"), source=None, reference=None,
                             symmetry="C1", ini_high=None, options=options)
    assert [(job.step, job.kind, job.lane, job.shared) for job in plain] == [
        ("particles", "import_particles", None, "set"), ("reference", "homo_abinit", "gpu", "set"),
        ("refine", "homo_refine_new", "gpu", None)]
    assert plain[0].params == {"particle_meta_path": "/a/p.star", "particle_blob_path": "/a"}
    assert plain[2].params == {"refine_symmetry": "C1", "refine_gs_resplit": False}  # no refine_res_init (item 11)
    full = refinement_graph(star=None, blob_folder=Path("/a"), source=("J7", "particles"), reference=Path("/r.mrc"),
                            symmetry="D2", ini_high=12.0,
                            options=RefinementOptions(lane="gpu", nu=True, local=True, min_angular_step=0.05,
                                                      resplit=True))
    assert [(job.step, job.kind, job.shared) for job in full] == [
        ("particles", "external", "set"), ("reference", "import_volumes", "run"),
        ("refine", "nonuniform_refine_new", None), ("local", "new_local_refine", None)]
    assert full[2].params == {"refine_symmetry": "D2", "refine_gs_resplit": True, "refine_res_init": 12.0}
    assert full[3].params == {"refine_symmetry": "D2", "use_alignment_prior": True, "min_angular_step": 0.05}


def test_source_jobs_from_names_and_paths(tmp_path: Path) -> None:
    assert parse_source_job("J42") == ("J42", "particles")
    assert parse_source_job("J42.particles_selected") == ("J42", "particles_selected")
    with pytest.raises(CryoSieveInputError, match="source_job"):
        parse_source_job("42")
    for name, output in (("J42_particles.cs", "particles"), ("J42_passthrough_particles.cs", "particles"),
                         ("J42_008_particles.cs", "particles"), ("J42_particles_selected.cs", "particles_selected")):
        (tmp_path / "J42").mkdir(exist_ok=True)
        assert source_of_path(tmp_path / "J42" / name) == ("J42", output)
    assert source_of_path(tmp_path / "J42_particles.cs") is None
    assert source_of_path(tmp_path / "J42" / "J43_particles.cs") is None


def test_trials_share_one_import_and_ab_initio_and_ini_high_is_sent_only_when_given(
        server: FakeCryoSPARC, data: SmallData, run: Runner, tmp_path: Path) -> None:
    """As 1.3.3 (item 11): one import and one ab-initio per input for its --repeat trials."""
    code, err = run(5, "csrefine", refine_args(data, tmp_path / "a.csv", "--repeat", "3"), server.environment())
    assert code == 0, err
    kinds = [item["type"] for item in server.named("create")]
    assert sorted(kinds) == sorted(["import_particles", "homo_abinit"] + ["homo_refine_new"] * 3)
    refines = [item for item in server.named("create") if item["type"] == "homo_refine_new"]
    assert all("refine_res_init" not in item["params"] for item in refines)
    abinit = next(job for job in server.made() if job.type == "homo_abinit")
    assert all(job.inputs["volume"].connections == [(abinit.uid, "volume_class_0")]
               for job in server.made() if job.type == "homo_refine_new")
    assert len(pd.read_csv(tmp_path / "a.csv")) == 3
    before = len(server.made())
    code, err = run(5, "csrefine", refine_args(data, tmp_path / "b.csv", "--ini_high", "12"), server.environment())
    assert code == 0, err
    new = [item for item in server.named("create")[before:] if item["type"] == "homo_refine_new"]
    assert [item["params"]["refine_res_init"] for item in new] == [12.0]


def test_csrefine_runs_the_graph_and_reads_the_results(server: FakeCryoSPARC, data: SmallData, run: Runner,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "out" / "summary.csv"
    out.parent.mkdir()
    code, err = run(5, "csrefine", refine_args(data, out, "--repeat", "2", "--nu", "--local",
                                                "--min_angular_step", "0.1"), server.environment())
    assert code == 0, err
    kinds = sorted(job.type for job in server.made())
    assert kinds == sorted(["import_particles", "homo_abinit"] + ["nonuniform_refine_new", "new_local_refine"] * 2)
    queued = server.named("queue")
    assert {item["lane"] for item in queued if item["type"] != "import_particles"} == {"gpu"}
    assert {item["lane"] for item in queued if item["type"] == "import_particles"} == {None}
    for job in server.made():  # every job passed through each state to completed
        assert job.history == ["building", "queued", "launched", "started", "running", "completed"], job.history
    local = [item for item in server.named("create") if item["type"] == "new_local_refine"]
    assert all(item["params"]["min_angular_step"] == 0.1 for item in local)
    table = pd.read_csv(out)
    assert list(table["number of particles"]) == [160, 160] and list(table["fixed pose"]) == [False, False]
    for resolution in table["resolution (A)"]:  # half maps sharing their signal up to shell 20: 8 Å
        assert BOX * PIXEL / 21 <= resolution <= BOX * PIXEL / 19
    for path in table["alignment3D"]:
        assert len(Dataset.load(path)) == 160
    assert all(item["slots"] for item in server.named("load_output"))  # slots always named (item 7)


@pytest.mark.parametrize("server", MAJORS, indirect=True)
def test_cs_input_is_refined_through_an_external_job_of_its_rows(server: FakeCryoSPARC, data: SmallData,
                                                                 run: Runner, tmp_path: Path) -> None:
    """Item 1: the External job declares its slots (5.x refused it before making anything, 4.x could not
    allocate it); its output is the source's rows; no import."""
    path = cs_in_job_folder(data, server)
    # with cryosparc-tools 4, as a user set up for 1.3.3 (no password): the jobs are made as --user (item 8)
    env = original_environment(server) if server.major == 4 else server.environment()
    code, err = run(server.major, "csrefine", refine_args(data, tmp_path / "s.csv", "--repeat", "2",
                                                          inputs=(str(path),)), env)
    assert code == 0, err
    assert {item["user"] for item in server.named("create") + server.named("queue")} == {"me@lab.org"}
    kinds = sorted(job.type for job in server.made())
    assert kinds == sorted(["snowflake", "homo_abinit", "homo_refine_new", "homo_refine_new"])
    external = next(job for job in server.made() if job.type == "snowflake")
    assert external.outputs["particles"].passthrough == "particles"
    given = server.output(external.uid, "particles")
    assert np.array_equal(np.sort(np.asarray(given["uid"])), uids(path))
    assert np.array_equal(np.asarray(given["blob/path"]), np.asarray(server.output("J7", "particles")["blob/path"]))
    table = pd.read_csv(tmp_path / "s.csv")
    assert list(table["number of particles"]) == [160, 160]
    for alignment in table["alignment3D"]:
        assert np.isin(uids(Path(alignment)), uids(path)).all()


def test_csrhbfactor_on_cs_input(server: FakeCryoSPARC, data: SmallData, run: Runner, tmp_path: Path) -> None:
    path = cs_in_job_folder(data, server)
    server.resolution_shell = lambda count: 20 if count > 100 else 14
    out = tmp_path / "rh.csv"
    code, err = run(5, "csrhbfactor", ["--i", str(path), "--directory", str(data.folder), "--o", str(out), "--user",
                                       "me@lab.org", "--project", "P3", "--workspace", "W1", "--lane", "gpu",
                                       "--halves", "1", "--quiet"], server.environment())
    assert code == 0, err
    raw = pd.read_csv(tmp_path / "rh_raw.csv")
    assert sorted(raw["number of particles"]) == [80, 160]
    assert sorted(len(server.output(job.uid, "particles")) for job in server.made() if job.type == "snowflake") == \
        [80, 160]
    assert (tmp_path / "rh_rh.png").is_file()


def test_csrefine_resumes_without_new_jobs(server: FakeCryoSPARC, data: SmallData, run: Runner,
                                           tmp_path: Path) -> None:
    out = tmp_path / "summary.csv"
    assert run(5, "csrefine", refine_args(data, out), server.environment())[0] == 0
    made = len(server.made())
    first = out.read_bytes()
    out.unlink()
    assert run(5, "csrefine", refine_args(data, out), server.environment())[0] == 0
    assert len(server.made()) == made and out.read_bytes() == first


def test_a_failed_job_stops_the_run_names_it_and_kills_the_others(server: FakeCryoSPARC, data: SmallData,
                                                                  run: Runner, tmp_path: Path) -> None:
    second = data.folder / "second.star"
    shutil.copy(data.star, second)
    server.fail_titles = {"01_particles_trial1: refine"}
    server.hang_titles = {"02_second_trial1: particles"}  # made at once, running when the other fails
    out = tmp_path / "summary.csv"
    code, err = run(5, "csrefine", refine_args(data, out, inputs=(str(data.star), str(second))),
                    server.environment())
    failed = [job for job in server.made() if job.status == "failed"]
    assert code != 0 and len(failed) == 1
    assert f"CryoSPARC job P3 {failed[0].uid} (homo_refine_new)" in err and "Traceback" not in err
    hung = [job for job in server.made() if "02_second_trial1: particles" in job.title]
    assert len(hung) == 1 and hung[0].status == "killed"
    assert not out.exists() and not list((tmp_path / "summary_jobs").glob("0*"))
    assert not list((tmp_path / "summary_jobs").glob(".*"))


@pytest.mark.parametrize("server", MAJORS, indirect=True)
def test_a_short_restart_while_waiting_is_survived(server: FakeCryoSPARC, data: SmallData, run: Runner,
                                                   tmp_path: Path) -> None:
    """Item 6: a lost connection while a job runs is retried with back-off; the run goes on."""
    server.outage_at = ("refine", "running", 0.4)
    code, err = run(server.major, "csrefine", refine_args(data, tmp_path / "s.csv"),
                    {**server.environment(), "CRYOSPARC_WAIT_RETRY_SECONDS": "8"})
    assert code == 0, err
    assert server.outage_at is None and server.named("kill") == []
    assert len(pd.read_csv(tmp_path / "s.csv")) == 1


def test_a_lost_connection_stops_the_run_in_one_line_and_kills_nothing(server: FakeCryoSPARC, data: SmallData,
                                                                       run: Runner, tmp_path: Path) -> None:
    second = data.folder / "second.star"
    shutil.copy(data.star, second)
    server.hang_titles = {"02_second_trial1: particles"}  # waited on when the connection is lost
    server.outage_at = ("01_particles_trial1: refine", "running", None)  # down for good
    code, err = run(5, "csrefine", refine_args(data, tmp_path / "s.csv", inputs=(str(data.star), str(second))),
                    {**server.environment(), "CRYOSPARC_WAIT_RETRY_SECONDS": "0.3"})
    lines = [line for line in one_line(err) if "error:" in line]
    assert code == 1 and len(lines) == 1 and "CRYOSPARC_WAIT_RETRY_SECONDS" in lines[0], err
    assert "did not answer for 0.3 s" in lines[0] and "Traceback" not in err
    server.start()
    assert server.named("kill") == []  # a lost connection is not a failed job
    assert all(job.status in ("running", "completed") for job in server.made())


def test_an_expired_token_is_renewed(data: SmallData, run: Runner, tmp_path: Path) -> None:
    with FakeCryoSPARC(5, box=BOX, pixel=PIXEL, resolution_shell=lambda count: 20, token_uses=15) as server:
        code, err = run(5, "csrefine", refine_args(data, tmp_path / "s.csv", "--repeat", "2"), server.environment())
        assert code == 0, err
        assert len(server.logins) >= 2 and set(server.logins) == {"me@lab.org"}


def test_licence_only_login_with_cryosparc_tools_5_says_whose_jobs_they_are(server: FakeCryoSPARC, data: SmallData,
                                                                            run: Runner, tmp_path: Path) -> None:
    """Item 8: 5.x logs in with the licence id as the licence's account; the jobs are that account's."""
    code, err = run(5, "csrefine", refine_args(data, tmp_path / "s.csv"), server.environment(password=False))
    assert code == 0, err
    assert {item["user"] for item in server.named("create")} == {"cryosparc@licence"}
    warning = [line for line in one_line(err) if "not by me@lab.org" in line]
    assert len(warning) == 1 and "cryosparc@licence" in warning[0] and "CRYOSPARC_PASSWORD" in warning[0]
    before = len(server.events)
    code, err = run(5, "csrefine", refine_args(data, tmp_path / "t.csv"), server.environment())
    assert code == 0 and {item["user"] for item in server.named("create")[-3:]} == {"me@lab.org"}
    assert not [line for line in one_line(err) if "not by" in line] and len(server.events) > before


@pytest.mark.parametrize(("change", "expected"), [
    (("--project", "P9"), "CryoSPARC project P9"), (("--workspace", "W9"), "workspace W9"),
    (("--lane", "nowhere"), "lane 'nowhere': not found (lanes: default, gpu)")])
def test_unknown_project_workspace_or_lane(server: FakeCryoSPARC, data: SmallData, run: Runner, tmp_path: Path,
                                           change: tuple[str, str], expected: str) -> None:
    args = refine_args(data, tmp_path / "summary.csv")
    args[args.index(change[0]) + 1] = change[1]
    code, err = run(5, "refine", ["--backend", "cryosparc", *args], server.environment())
    assert code == 2 and expected in err and len(one_line(err)) == 1, err
    assert server.made() == [] and tree(tmp_path) == {k: v for k, v in tree(tmp_path).items() if k.startswith("data")}


def test_dry_run_plans_without_connecting(server: FakeCryoSPARC, data: SmallData, run: Runner,
                                          tmp_path: Path) -> None:
    out = tmp_path / "summary.csv"
    code, err = run(5, "csrefine", refine_args(data, out, "--dry_run", "--ref", str(data.half1), "--repeat", "2"), {})
    plan = run.out
    assert code == 0 and server.requests == [] and not out.exists(), err
    for text in ("particles: import_particles", "shared by the trials of the set", "reference: import_volumes",
                 "shared by the run", "refine: homo_refine_new on lane gpu", "volume <- reference.imported_volume_1"):
        assert text in plan
    assert "refine_res_init" not in plan


def test_a_cs_subset_outside_a_job_folder_needs_its_source_job(server: FakeCryoSPARC, data: SmallData, run: Runner,
                                                              tmp_path: Path) -> None:
    path = cs_in_job_folder(data, server)
    moved = data.folder / "subset.cs"
    shutil.copy(path, moved)
    args = refine_args(data, tmp_path / "s.csv", inputs=(str(moved),))
    code, err = run(5, "csrefine", args, server.environment())
    assert code == 2 and "--source_job" in err and server.made() == []
    assert run(5, "csrefine", [*args, "--source_job", "J7.particles"], server.environment())[0] == 0


def test_pipeline_validates_with_cryosparc_and_gives_the_last_selection_back(server: FakeCryoSPARC, data: SmallData,
                                                                             run: Runner, tmp_path: Path) -> None:
    path = cs_in_job_folder(data, server)
    prefix = tmp_path / "run" / "cs"
    args = ["--i", str(path), "--directory", str(data.folder), "--o", str(prefix), "--mask", str(data.mask),
            "--num_iters", "2", "--frequency_start", "40", "--frequency_end", "20", "--retention_ratio", "0.7",
            "--no-report", "--quiet", "--validate", "cryosparc", "--cryosparc_user", "me@lab.org",
            "--cryosparc_project", "P3", "--cryosparc_workspace", "W1", "--cryosparc_lane", "gpu"]
    code, err = run(5, "pipeline", args, server.environment())
    assert code == 0, err
    validated = pd.read_csv(str(prefix) + "_summary.csv")["validated_resolution_angstrom"]
    assert validated.notna().all() and ((validated >= BOX * PIXEL / 23) & (validated <= BOX * PIXEL / 19)).all()
    external = [job for job in server.made() if job.type == "snowflake"]
    returned = [job for job in external if "kept" in job.outputs]
    assert len(returned) == 1 and len(external) == 1 + 3  # one External job per validated set
    assert np.array_equal(np.sort(np.asarray(server.output(returned[0].uid, "kept")["uid"])),
                          uids(Path(f"{prefix}_iter2.cs")))
    made = len(server.made())
    assert run(5, "pipeline", [*args, "--continue"], server.environment())[0] == 0
    assert len(server.made()) == made


def test_library_refine_files_with_one_session(server: FakeCryoSPARC, data: SmallData, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    server.resolution_shell = lambda count: 16
    connection = v5_connection(server)
    sessions = []

    def connector(given: Connection) -> Any:
        sessions.append(connect(given))
        return sessions[-1]

    refiner = CryoSparcRefiner(connection, "P3", "W1", RefinementOptions(lane="default"), connector=connector)
    logger = logging.getLogger("cryosieve")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("INFO", logger="cryosieve"):
            outcome = refine_files(RefineSettings(inputs=(str(data.star),), output=str(tmp_path / "s.csv"),
                                                  directory=str(data.folder), workers=None, repeat=2), refiner)
    finally:
        logger.removeHandler(caplog.handler)
    messages = [record.getMessage() for record in caplog.records]
    assert len(sessions) == 1 and len(server.logins) == 1  # one session for every thread of the run
    assert sum(" made, " in message for message in messages) == 4  # import and ab-initio shared by 2 trials
    assert any(message.endswith("completed, 4/4") for message in messages)
    assert outcome.summary is not None
    assert BOX * PIXEL / 17 <= float(outcome.summary["resolution (A)"][0]) <= BOX * PIXEL / 15


def test_messages_never_hold_the_secrets() -> None:
    connection = Connection("http://h:1", "me@lab.org", license="0123abcd-0000-4000-8000-00000000beef",
                            password="pw-123")
    import hashlib

    text = f"x {connection.license} y pw-123 z {hashlib.sha256(b'pw-123').hexdigest()}"
    assert connection.scrub(text) == "x <hidden> y <hidden> z <hidden>"
    assert "pw-123" not in repr(connection) and re.search("0123abcd", repr(connection)) is None
