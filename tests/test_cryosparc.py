"""The CryoSPARC commands against an in-process stand-in of cryosparc-tools' client
(``tests/cryosparc_standin.py``): connection, job graph, parallel jobs, resumption, failures,
results, and selections given back as External jobs. No CryoSPARC server was available."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from cryosparc.dataset import Dataset

from cryosieve.backends.cryosparc import CryoSparcRefiner
from cryosieve.cli.core import main as core_main
from cryosieve.cli.csrefine import main as csrefine_main
from cryosieve.cli.csrhbfactor import main as csrhbfactor_main
from cryosieve.cli.pipeline import main as pipeline_main
from cryosieve.cli.refine import main as refine_main
from cryosieve.cryosparc import session
from cryosieve.cryosparc.connection import Connection, connect, connection_from_environment, parse_cryosparcm_env
from cryosieve.cryosparc.graph import RefinementOptions, refinement_graph
from cryosieve.cryosparc.source import parse_source_job, source_of_path
from cryosieve.errors import CryoSieveInputError
from cryosieve.io.cs import particles_to_dataset
from cryosieve.io.star import read_particles
from cryosieve.refine import RefineSettings, refine_files
from cryosparc_standin import Server
from safety_helpers import SmallData, make_small_data, tree

BOX, PIXEL = 64, 2.5


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> SmallData:
    return make_small_data(tmp_path_factory.mktemp("cryosparc") / "data", count=160)


@pytest.fixture()
def data(small: SmallData, tmp_path: Path) -> SmallData:
    folder = tmp_path / "data"
    shutil.copytree(small.folder, folder)
    return SmallData(folder)


@pytest.fixture()
def server(monkeypatch: pytest.MonkeyPatch) -> Server:
    """The stand-in, reached through ``cryosparc.tools.CryoSPARC`` as the commands reach CryoSPARC."""
    import cryosparc.tools

    server = Server(box=BOX, pixel=PIXEL, resolution_shell=lambda count: 20)
    monkeypatch.setattr(cryosparc.tools, "CryoSPARC", server.client_class())
    monkeypatch.setattr(session, "POLL_SECONDS", 0.01)
    for name, value in (("CRYOSPARC_MASTER_HOSTNAME", "csmaster"), ("CRYOSPARC_BASE_PORT", "39000"),
                        ("CRYOSPARC_LICENSE_ID", server.license), ("CRYOSPARC_COMMAND_RETRY_SECONDS", "0")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("CRYOSPARC_PASSWORD", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")  # no cryosparcm here
    return server


def cs_in_job_folder(data: SmallData, server: Server, job: str = "J7") -> Path:
    """The data set's particles as the .cs output ``particles`` of CryoSPARC job ``job`` (in its folder)."""
    dataset = particles_to_dataset(read_particles(data.star), seed=5)
    folder = data.folder / job
    folder.mkdir()
    path = folder / f"{job}_particles.cs"
    with open(path, "wb") as handle:
        dataset.save(handle)
    for name in ("blob/path",):  # image paths relative to the data folder, as --directory gives it
        dataset[name] = np.array([str(value) for value in dataset[name]], dtype=object)
    server.add_source_job(job, "particles", Dataset.load(str(path)))
    return path


def uids(path: Path) -> np.ndarray:
    return np.sort(np.asarray(Dataset.load(str(path))["uid"]))


# ----------------------------------------------------------------------------- connection


def test_cryosparcm_env_is_parsed_and_fills_what_the_environment_lacks() -> None:
    text = ('export "CRYOSPARC_MASTER_HOSTNAME=gpu01"\nexport "CRYOSPARC_BASE_PORT=61000"\n'
            'export "CRYOSPARC_LICENSE_ID=abc-licence"\necho unrelated\n')
    assert parse_cryosparcm_env(text) == {"CRYOSPARC_MASTER_HOSTNAME": "gpu01", "CRYOSPARC_BASE_PORT": "61000",
                                          "CRYOSPARC_LICENSE_ID": "abc-licence"}
    connection = connection_from_environment("me@lab.org", {"CRYOSPARC_MASTER_HOSTNAME": "here"},
                                             lambda: parse_cryosparcm_env(text))
    assert (connection.host, connection.base_port, connection.license) == ("here", 61000, "abc-licence")
    assert "abc-licence" not in repr(connection) and "abc-licence" not in connection.describe()
    with pytest.raises(CryoSieveInputError, match="CRYOSPARC_MASTER_HOSTNAME"):
        connection_from_environment("me@lab.org", {}, dict)
    with pytest.raises(CryoSieveInputError, match="CRYOSPARC_BASE_PORT"):
        connection_from_environment(None, {"CRYOSPARC_MASTER_HOSTNAME": "h", "CRYOSPARC_BASE_PORT": "x"}, dict)


def test_an_unreachable_server_is_tried_a_bounded_number_of_times() -> None:
    server = Server(reachable=False)
    waits: list[float] = []
    connection = Connection("csmaster", 39000, "me@lab.org", license=server.license, retries=4, retry_seconds=7)
    with pytest.raises(CryoSieveInputError, match="cannot reach CryoSPARC at http://csmaster:39000") as error:
        connect(connection, server.client_class(), sleep=waits.append)
    assert server.connections == 4 and waits == [7, 7, 7]
    assert server.license not in str(error.value) and "\n" not in str(error.value)


def test_a_wrong_licence_is_refused_at_once_and_never_shown() -> None:
    server = Server()
    wrong = "ffffffff-1111-4222-8333-444444444444"
    connection = Connection("csmaster", 39000, "me@lab.org", license=wrong, retries=3, retry_seconds=0)
    with pytest.raises(CryoSieveInputError, match="refused the credentials") as error:
        connect(connection, server.client_class())
    assert server.connections == 1
    assert wrong not in str(error.value)


# ----------------------------------------------------------------------------- job graph


def test_the_job_graph_follows_the_original() -> None:
    options = RefinementOptions(lane="gpu")
    plain = refinement_graph(star=Path("/a/p.star"), blob_folder=Path("/a"), source=None, reference=None,
                             symmetry="C1", ini_high=30.0, options=options)
    assert [(job.step, job.kind, job.lane) for job in plain] == [
        ("particles", "import_particles", None), ("reference", "homo_abinit", "gpu"),
        ("refine", "homo_refine_new", "gpu")]
    assert plain[0].params == {"particle_meta_path": "/a/p.star", "particle_blob_path": "/a"}
    assert plain[2].connections == {"particles": ("particles", "imported_particles"),
                                    "volume": ("reference", "volume_class_0")}
    assert plain[2].params == {"refine_symmetry": "C1", "refine_gs_resplit": False, "refine_res_init": 30.0}
    full = refinement_graph(star=None, blob_folder=Path("/a"), source=("J7", "particles"), reference=Path("/r.mrc"),
                            symmetry="D2", ini_high=12.0,
                            options=RefinementOptions(lane="gpu", nu=True, local=True, min_angular_step=0.05,
                                                      resplit=True))
    assert [(job.step, job.kind) for job in full] == [
        ("particles", "external"), ("reference", "import_volumes"), ("refine", "nonuniform_refine_new"),
        ("local", "new_local_refine")]
    assert full[1].params == {"volume_blob_path": "/r.mrc"}
    assert full[2].params == {"refine_symmetry": "D2", "refine_gs_resplit": True, "refine_res_init": 12.0}
    assert full[3].params == {"refine_symmetry": "D2", "use_alignment_prior": True, "min_angular_step": 0.05}
    assert full[3].connections == {"particles": ("refine", "particles"), "volume": ("refine", "volume"),
                                   "mask": ("refine", "mask")}


def test_source_jobs_from_names_and_paths(tmp_path: Path) -> None:
    assert parse_source_job("J42") == ("J42", "particles")
    assert parse_source_job("J42.particles_selected") == ("J42", "particles_selected")
    with pytest.raises(CryoSieveInputError, match="source_job"):
        parse_source_job("42")
    for name, output in (("J42_particles.cs", "particles"), ("J42_passthrough_particles.cs", "particles"),
                         ("J42_008_particles.cs", "particles"), ("J42_particles_selected.cs", "particles_selected")):
        (tmp_path / "J42").mkdir(exist_ok=True)
        assert source_of_path(tmp_path / "J42" / name) == ("J42", output)
    assert source_of_path(tmp_path / "J42_particles.cs") is None  # not in the job's folder
    assert source_of_path(tmp_path / "J42" / "J43_particles.cs") is None


# ----------------------------------------------------------------------------- refinement


def run_csrefine(data: SmallData, out: Path, *extra: str) -> int:
    return csrefine_main(["--i", str(data.star), "--directory", str(data.folder), "--o", str(out), "--user",
                          "me@lab.org", "--project", "P3", "--workspace", "W1", "--lane", "gpu", "--quiet", *extra])


def test_csrefine_runs_the_graph_in_parallel_and_reads_the_results(data: SmallData, server: Server,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "out" / "summary.csv"
    out.parent.mkdir()
    assert run_csrefine(data, out, "--repeat", "2", "--nu", "--local", "--min_angular_step", "0.1") == 0
    kinds = [kind for _, kind in server.made()]
    assert sorted(kinds) == sorted(["import_particles", "homo_abinit", "nonuniform_refine_new",
                                    "new_local_refine"] * 2)
    queued = [arguments for name, arguments in server.calls if name == "queue"]
    assert {item["lane"] for item in queued if item["type"] != "import_particles"} == {"gpu"}
    assert {item["lane"] for item in queued if item["type"] == "import_particles"} == {None}
    created = [arguments for name, arguments in server.calls if name == "create_job"]
    local = [item for item in created if item["type"] == "new_local_refine"]
    assert all(item["params"]["min_angular_step"] == 0.1 for item in local)
    assert all(item["workspace_uid"] == "W1" and item["project_uid"] == "P3" for item in created)
    table = pd.read_csv(out)
    assert list(table.columns[:5]) == ["filename", "number of particles", "resolution (A)", "b-factor (A^2)",
                                       "alignment3D"]
    assert list(table["number of particles"]) == [160, 160]
    # the stand-in's half maps share their signal up to Fourier shell 20 of the 64-pixel box at 2.5 Å: 8 Å
    for resolution in table["resolution (A)"]:
        assert BOX * PIXEL / 21 <= resolution <= BOX * PIXEL / 19
    assert list(table["fixed pose"]) == [False, False]
    for path in table["alignment3D"]:
        assert len(Dataset.load(path)) == 160
    record = (out.parent / "summary_jobs").glob("*/cryosparc_jobs.json")
    assert len(list(record)) == 2


def test_cryosparc_tools_4_sessions_and_lanes(data: SmallData, server: Server, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    server.tools = 4
    assert run_csrefine(data, tmp_path / "a.csv") == 2  # 4.x needs the password too
    message = capsys.readouterr().err
    assert "refused the credentials" in message and "Invalid or unspecified password" in message
    monkeypatch.setenv("CRYOSPARC_PASSWORD", "secret-password")
    assert run_csrefine(data, tmp_path / "b.csv") == 0
    assert "secret-password" not in capsys.readouterr().err
    assert run_csrefine(data, tmp_path / "c.csv", "--lane", "nowhere") == 2
    assert "lane 'nowhere': not found (lanes: default, gpu)" in capsys.readouterr().err
    server.reachable = False
    before = server.connections
    assert run_csrefine(data, tmp_path / "d.csv") == 2
    assert "cannot reach CryoSPARC" in capsys.readouterr().err and server.connections == before + 3


def test_csrefine_resumes_without_new_jobs(data: SmallData, server: Server, tmp_path: Path) -> None:
    out = tmp_path / "summary.csv"
    assert run_csrefine(data, out) == 0
    made = len(server.made())
    first = out.read_bytes()
    out.unlink()
    assert run_csrefine(data, out) == 0
    assert len(server.made()) == made and out.read_bytes() == first


def test_a_failed_job_stops_the_run_with_its_id_and_kills_the_others(data: SmallData, server: Server,
                                                                     tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    server.fail_titles = {"trial1: refine"}
    server.slow_titles = {"trial2: particles"}  # made at once, never ends: running when trial 1 fails
    out = tmp_path / "summary.csv"
    code = run_csrefine(data, out, "--repeat", "3")
    message = capsys.readouterr().err
    failed = [uid for uid, job in server.jobs.items() if job.status == "failed"]
    assert code != 0 and len(failed) == 1
    assert f"CryoSPARC job P3 {failed[0]} (homo_refine_new)" in message and "Traceback" not in message
    jobs = tmp_path / "summary_jobs"
    assert not out.exists() and not (jobs / "01_particles_trial1").exists()
    assert not (jobs / "01_particles_trial2").exists() and not list(jobs.glob(".*"))
    slow = [job for job in server.jobs.values() if "trial2: particles" in job.title]
    assert len(slow) == 1 and slow[0].status == "killed"
    assert ("kill", {"job": slow[0].uid}) in server.calls


def test_dry_run_plans_without_connecting(data: SmallData, server: Server, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("CRYOSPARC_MASTER_HOSTNAME")
    out = tmp_path / "summary.csv"
    assert run_csrefine(data, out, "--dry_run", "--ref", str(data.half1)) == 0
    plan = capsys.readouterr().out
    assert server.connections == 0 and not out.exists() and not (tmp_path / "summary_jobs").exists()
    for text in ("particles: import_particles", "reference: import_volumes", "refine: homo_refine_new on lane gpu",
                 "refine_res_init=30.0", "volume <- reference.imported_volume_1"):
        assert text in plan


def test_cs_input_uses_the_existing_particles(data: SmallData, server: Server, tmp_path: Path) -> None:
    path = cs_in_job_folder(data, server)
    server.resolution_shell = lambda count: 20 if count > 100 else 14  # fewer particles, lower resolution
    out = tmp_path / "rh.csv"
    code = csrhbfactor_main(["--i", str(path), "--directory", str(data.folder), "--o", str(out), "--user", "me@lab.org",
                             "--project", "P3", "--workspace", "W1", "--lane", "gpu", "--halves", "1", "--quiet"])
    assert code == 0
    assert "import_particles" not in [kind for _, kind in server.made()]
    connected = [arguments["source"] for name, arguments in server.calls if name == "connect_input"]
    assert connected == [("J7", "particles")] * 2
    raw = pd.read_csv(tmp_path / "rh_raw.csv")
    assert sorted(raw["number of particles"]) == [80, 160]
    everything = uids(path)
    for _, row in raw.iterrows():  # each refinement's particles are a subset of the source's, uid kept
        refined = uids(Path(row["alignment3D"]))
        assert len(refined) == row["number of particles"] and np.isin(refined, everything).all()
    assert (tmp_path / "rh_rh.png").is_file()


def test_a_cs_subset_outside_a_job_folder_needs_its_source_job(data: SmallData, server: Server,
                                                              tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = cs_in_job_folder(data, server)
    moved = data.folder / "subset.cs"
    shutil.copy(path, moved)
    args = ["--i", str(moved), "--directory", str(data.folder), "--o", str(tmp_path / "s.csv"), "--user", "me@lab.org",
            "--project", "P3", "--workspace", "W1", "--lane", "gpu", "--quiet"]
    assert csrefine_main(args) == 2
    assert "--source_job" in capsys.readouterr().err and server.made() == []
    assert csrefine_main([*args, "--source_job", "J7.particles"]) == 0


@pytest.mark.parametrize(("change", "expected"), [
    (("--project", "P9"), "CryoSPARC project P9"), (("--workspace", "W9"), "workspace W9"),
    (("--lane", "nowhere"), "lane 'nowhere'")])
def test_unknown_project_workspace_or_lane(data: SmallData, server: Server, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str], change: tuple[str, str],
                                           expected: str) -> None:
    args = {"--project": "P3", "--workspace": "W1", "--lane": "gpu"}
    args[change[0]] = change[1]
    out = tmp_path / "summary.csv"
    code = refine_main(["--backend", "cryosparc", "--i", str(data.star), "--directory", str(data.folder), "--o",
                        str(out), "--user", "me@lab.org", *[item for pair in args.items() for item in pair],
                        "--quiet"])
    message = capsys.readouterr().err
    assert code == 2 and expected in message and message.count("\n") == 1
    assert server.made() == [] and not out.exists() and not (tmp_path / "summary_jobs").exists()


def test_unreachable_server_and_wrong_licence_exit_2_in_one_line(data: SmallData, server: Server, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    server.reachable = False
    assert run_csrefine(data, tmp_path / "a.csv") == 2
    lines = capsys.readouterr().err.splitlines()
    assert "cannot reach CryoSPARC at http://csmaster:39000" in lines[-1] and "error:" in lines[-1]
    assert [line for line in lines[:-1] if "attempt" in line] == lines[:-1] and len(lines) == 3  # the retries
    assert server.connections == 3
    server.reachable = True
    wrong = "ffffffff-1111-4222-8333-444444444444"
    monkeypatch.setenv("CRYOSPARC_LICENSE_ID", wrong)
    assert run_csrefine(data, tmp_path / "b.csv") == 2
    message = capsys.readouterr().err
    assert "refused the credentials" in message and wrong not in message
    assert tree(tmp_path) == {key: value for key, value in tree(tmp_path).items() if key.startswith("data")}


# ----------------------------------------------------------------------------- selections back to CryoSPARC


def core_args(data: SmallData, particles: Path, out: Path) -> list[str]:
    return ["--i", str(particles), "--directory", str(data.folder), "--o", str(out), "--volume", str(data.half1),
            "--volume", str(data.half2), "--mask", str(data.mask), "--frequency", "20", "--retention_ratio", "0.6",
            "--quiet", "--cryosparc_project", "P3", "--cryosparc_workspace", "W2"]


def test_core_gives_the_selection_back_as_an_external_job(data: SmallData, server: Server, tmp_path: Path) -> None:
    path = cs_in_job_folder(data, server)
    out = tmp_path / "kept.cs"
    assert core_main(core_args(data, path, out)) == 0
    external = [job for job in server.jobs.values() if job.type == "snowflake"]
    assert len(external) == 1 and external[0].workspace == "W2"
    assert external[0].connections == {"particles": ("J7", "particles")}
    assert np.array_equal(np.sort(np.asarray(external[0].outputs["kept"]["uid"])), uids(out))
    assert np.array_equal(np.sort(np.asarray(external[0].outputs["sieved"]["uid"])), uids(tmp_path / "kept_sieved.cs"))
    assert len(uids(out)) + len(uids(tmp_path / "kept_sieved.cs")) == 160


@pytest.mark.parametrize("problem", ["project", "star", "foreign uids"])
def test_core_refuses_a_return_it_cannot_make_before_writing(data: SmallData, server: Server, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str], problem: str) -> None:
    path = cs_in_job_folder(data, server)
    args = core_args(data, path, tmp_path / "kept.cs")
    if problem == "project":
        args[args.index("--cryosparc_project") + 1] = "P9"
    elif problem == "star":
        args = core_args(data, data.star, tmp_path / "kept.star")
    else:
        other = Dataset.load(str(path))
        other["uid"] = np.asarray(other["uid"]) + np.uint64(1)
        server.jobs["J7"].outputs["particles"] = other
    assert core_main(args) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "Traceback" not in message
    assert not list(tmp_path.glob("kept*")) and not any(job.type == "snowflake" for job in server.jobs.values())


def test_pipeline_validates_with_cryosparc_and_gives_the_last_selection_back(data: SmallData, server: Server,
                                                                             tmp_path: Path) -> None:
    path = cs_in_job_folder(data, server)
    prefix = tmp_path / "run" / "cs"
    args = ["--i", str(path), "--directory", str(data.folder), "--o", str(prefix), "--mask", str(data.mask),
            "--num_iters", "2", "--frequency_start", "40", "--frequency_end", "20", "--retention_ratio", "0.7",
            "--no-report", "--quiet", "--validate", "cryosparc", "--cryosparc_user", "me@lab.org",
            "--cryosparc_project", "P3", "--cryosparc_workspace", "W1", "--cryosparc_lane", "gpu"]
    assert pipeline_main(args) == 0
    summary = pd.read_csv(str(prefix) + "_summary.csv")
    validated = summary["validated_resolution_angstrom"]
    # measured with the run's own mask, whose soft edge carries the signal a shell or two past shell 20
    assert validated.notna().all() and ((validated >= BOX * PIXEL / 23) & (validated <= BOX * PIXEL / 19)).all()
    external = [job for job in server.jobs.values() if job.type == "snowflake"]
    returned = [job for job in external if "kept" in job.outputs]
    assert len(returned) == 1 and len(external) == 1 + 3  # one subset per validated set
    assert np.array_equal(np.sort(np.asarray(returned[0].outputs["kept"]["uid"])), uids(Path(f"{prefix}_iter2.cs")))
    made = len(server.jobs)
    assert pipeline_main([*args, "--continue"]) == 0
    assert len(server.jobs) == made


def refiner_for(server: Server) -> Any:
    connection = Connection("csmaster", 39000, "me@lab.org", license=server.license, retries=1, retry_seconds=0)
    return CryoSparcRefiner(connection, "P3", "W1", RefinementOptions(lane="default"), poll_seconds=0.01,
                            client_class=server.client_class())


def test_library_refine_files_with_a_given_client(data: SmallData, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    server = Server(box=BOX, pixel=PIXEL, resolution_shell=lambda count: 16)
    logger = logging.getLogger("cryosieve")  # the commands' console set-up stops it propagating
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("INFO", logger="cryosieve"):
            outcome = refine_files(RefineSettings(inputs=(str(data.star),), output=str(tmp_path / "s.csv"),
                                                  directory=str(data.folder), workers=None, repeat=2),
                                   refiner_for(server))
    finally:
        logger.removeHandler(caplog.handler)
    messages = [record.getMessage() for record in caplog.records]
    assert sum("made, " in message for message in messages) == 6
    assert any(message.endswith("completed, 6/6") for message in messages)
    assert outcome.summary is not None
    assert BOX * PIXEL / 17 <= float(outcome.summary["resolution (A)"][0]) <= BOX * PIXEL / 15
