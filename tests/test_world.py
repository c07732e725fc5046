"""One job in several processes (:mod:`cryosieve.world`): ``torchrun`` with 2 and 3 CPU ranks, two "nodes" on
loopback, and ranks that fail, die or freeze. The answer must be that of one process: the same kept sets and
scores byte for byte, maps equal to float tolerance."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryosieve.errors import CryoSieveInputError
from cryosieve.scoring.loop import shard_batches
from cryosieve.simulate import SimulationSettings, simulate_particles
from cryosieve.world import World, _ranks_on_this_machine, _seconds, launched_by_torchrun

#: Seconds a launched job may take before the test gives up on it (a guard against a hang, not a measure: a
#: shared 2-core machine has been seen to take several times as long as an idle one).
JOB_LIMIT = 900


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return int(handle.getsockname()[1])


def torchrun(ranks: int, module: str, args: list[str], *, nodes: int = 1, node_rank: int = 0,
             port: int | None = None) -> list[str]:
    """The command line of ``torchrun`` running ``python -m module args`` with ``ranks`` ranks per node."""
    line = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks)]
    if nodes > 1:
        line += ["--nnodes", str(nodes), "--node_rank", str(node_rank), "--master_addr", "127.0.0.1",
                 "--master_port", str(port)]
    else:
        line += ["--standalone"]
    return [*line, "-m", module, *args]


def job_environment(**extra: str) -> dict[str, str]:
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    source = str(Path(__file__).resolve().parents[1] / "src")
    environment["PYTHONPATH"] = source + os.pathsep + environment.get("PYTHONPATH", "")
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        environment.pop(name, None)
    return {**environment, **extra}


def run_job(command: list[str], cwd: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, env=job_environment(**extra), capture_output=True, text=True,
                          timeout=JOB_LIMIT)


def run_one(module: str, args: list[str], cwd: Path) -> None:
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=job_environment(),
                            capture_output=True, text=True, timeout=JOB_LIMIT)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,200 realistic particles at box 48 with their half maps."""
    folder = tmp_path_factory.mktemp("world") / "data"
    settings = replace(SimulationSettings(num_particles=1200, box=48, pixel_size=3.0, seed=41).realistic())
    simulate_particles(folder, settings)
    return folder


def core_args(out: str, *extra: str) -> list[str]:
    return ["--i", "particles.star", "--o", out, "--volume", "half1.mrc", "--volume", "half2.mrc",
            "--mask", "mask.mrc", "--frequency", "15", "--quiet", *extra]


def test_shares_are_contiguous_and_cover_everything() -> None:
    rows = np.arange(17) * 3
    for size in (1, 2, 3, 5):
        shares = [World(rank=rank, size=size).share(rows) for rank in range(size)]
        assert np.array_equal(np.concatenate(shares), rows)
        assert max(len(share) for share in shares) - min(len(share) for share in shares) <= 1
        batches = [shard_batches(rows, 4, rank, size) for rank in range(size)]
        flat = [batch for part in batches for batch in part]
        assert np.array_equal(np.concatenate(flat), rows)  # in order: contiguous runs of batches
        assert all(len(batch) == 4 for batch in flat[:-1])  # the same batches as one process


def test_torchrun_environment_is_recognised() -> None:
    assert launched_by_torchrun({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert not launched_by_torchrun({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "h"})
    assert not launched_by_torchrun({})


def test_timeouts_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CRYOSIEVE_RANK_TIMEOUT", raising=False)
    assert _seconds("CRYOSIEVE_RANK_TIMEOUT", 60.0) == 60.0
    monkeypatch.setenv("CRYOSIEVE_RANK_TIMEOUT", " 7.5 ")
    assert _seconds("CRYOSIEVE_RANK_TIMEOUT", 60.0) == 7.5
    for bad in ("0", "-3", "soon", "nan", "inf"):
        monkeypatch.setenv("CRYOSIEVE_RANK_TIMEOUT", bad)
        with pytest.raises(CryoSieveInputError, match="CRYOSIEVE_RANK_TIMEOUT="):
            _seconds("CRYOSIEVE_RANK_TIMEOUT", 60.0)


def test_ranks_on_this_machine_are_found_by_their_start_environment() -> None:
    """A rank is known by its job's marks in its start environment; a process it started (same environment) is
    not taken for it, nor is a rank of another job."""
    marks = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "3",
             "TORCHELASTIC_RUN_ID": "test", "TORCHELASTIC_RESTART_COUNT": "0"}
    parent = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              "time.sleep(60)")
    ours = subprocess.Popen([sys.executable, "-c", parent], env={**os.environ, **marks, "RANK": "1"},
                            start_new_session=True)
    another_job = {**marks, "MASTER_PORT": str(int(marks["MASTER_PORT"]) + 1), "RANK": "2"}
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True,
                             env={**os.environ, **another_job})
    try:
        deadline = time.monotonic() + 30
        while len(job_processes_with(marks)) < 2 and time.monotonic() < deadline:  # the rank and its child
            time.sleep(0.05)
        found = _ranks_on_this_machine(marks, [1, 2])
        assert list(found) == [1] and found[1][0] == ours.pid
        assert _ranks_on_this_machine(marks, [2]) == {}
    finally:
        for process in (ours, other):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def job_processes_with(marks: dict[str, str]) -> list[int]:
    """Process ids whose start environment has ``marks``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                words = set((entry / "environ").read_bytes().split(b"\0"))
                if all(f"{name}={value}".encode() in words for name, value in marks.items()):
                    found.append(int(entry.name))
    return found


@pytest.mark.parametrize("ranks", [2, 3])
def test_core_gives_the_answer_of_one_process(data: Path, ranks: int) -> None:
    extra = ["--retention_ratio", "auto"] if ranks == 3 else []
    run_one("cryosieve.cli.core", core_args("one/k.star", *extra), data)
    result = run_job(torchrun(ranks, "cryosieve.cli.core", core_args(f"ranks{ranks}/k.star", *extra)), data)
    assert result.returncode == 0, result.stderr
    names = ["k.star", "k_sieved.star", "k_scores.csv"] + (["k_retention.csv"] if extra else [])
    for name in names:
        assert (data / f"ranks{ranks}" / name).read_bytes() == (data / "one" / name).read_bytes(), name


def test_reconstruct_gives_the_map_of_one_process(data: Path) -> None:
    args = ["--i", "particles.star", "--ctf", "--quiet"]
    run_one("cryosieve.cli.reconstruct", [*args, "--o", "one.mrc"], data)
    result = run_job(torchrun(3, "cryosieve.cli.reconstruct", [*args, "--o", "three.mrc"]), data)
    assert result.returncode == 0, result.stderr
    one, three = mrcfile.read(data / "one.mrc"), mrcfile.read(data / "three.mrc")
    np.testing.assert_allclose(three, one, rtol=0, atol=1e-6 * float(np.abs(one).max()))


@pytest.mark.slow
def test_pipeline_gives_the_sets_of_one_process(data: Path) -> None:
    args = ["--i", "particles.star", "--mask", "mask.mrc", "--num_iters", "2", "--frequency_start", "20",
            "--frequency_end", "12", "--quiet", "--no-report"]
    run_one("cryosieve.cli.pipeline", [*args, "--o", "pipe1/p"], data)
    result = run_job(torchrun(2, "cryosieve.cli.pipeline", [*args, "--o", "pipe2/p"]), data)
    assert result.returncode == 0, result.stderr
    for name in ("p_iter1.star", "p_iter2.star", "p_iter1_sieved.star", "p_iter2_sieved.star"):
        assert (data / "pipe2" / name).read_bytes() == (data / "pipe1" / name).read_bytes(), name
    # The half maps are sums over the ranks in another order: equal to float tolerance, and so the scores
    # of the rounds after the first.
    for name in ("p_iter1_scores.csv", "p_iter2_scores.csv"):
        one, two = (pd.read_csv(data / folder / name) for folder in ("pipe1", "pipe2"))
        assert two["kept"].tolist() == one["kept"].tolist()
        scale = float(np.abs(one["score"]).max())
        np.testing.assert_allclose(two["score"], one["score"], rtol=0, atol=1e-6 * scale)
    one, two = (pd.read_csv(data / folder / "p_summary.csv") for folder in ("pipe1", "pipe2"))
    pd.testing.assert_frame_equal(two, one, check_exact=False, rtol=1e-5)
    for half in (1, 2):
        one, two = (mrcfile.read(data / folder / f"p_iter1_half{half}.mrc") for folder in ("pipe1", "pipe2"))
        np.testing.assert_allclose(two, one, rtol=0, atol=1e-6 * float(np.abs(one).max()))


@pytest.mark.slow
def test_two_nodes_on_loopback(data: Path) -> None:
    run_one("cryosieve.cli.core", core_args("one/k.star"), data)
    port = free_port()
    nodes = [subprocess.Popen(torchrun(1, "cryosieve.cli.core", core_args("nodes/k.star"), nodes=2, node_rank=rank,
                                       port=port), cwd=data, env=job_environment(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=JOB_LIMIT) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    for name in ("k.star", "k_sieved.star", "k_scores.csv"):
        assert (data / "nodes" / name).read_bytes() == (data / "one" / name).read_bytes(), name


def test_bad_image_on_another_rank_is_one_line(data: Path, tmp_path: Path) -> None:
    for name in ("particles.star", "half1.mrc", "half2.mrc", "mask.mrc"):
        (tmp_path / name).symlink_to(data / name)
    images = mrcfile.read(data / "particles.mrcs").copy()
    images[-3] = np.nan  # near the end of the stack: read by the last rank
    with mrcfile.new(tmp_path / "particles.mrcs") as handle:
        handle.set_data(images)
    result = run_job(torchrun(2, "cryosieve.cli.core", core_args("out/k.star")), tmp_path)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("core.py: ") or "error:" in line]
    assert ours and f"image {len(images) - 2:06d}@particles.mrcs contains NaN" in ours[0], result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


#: This machine's name, as a lost rank's message gives it.
HOST = socket.gethostname()
#: CRYOSIEVE_RANK_TIMEOUT of the jobs whose ranks freeze or die (s).
RANK_TIMEOUT = 5
#: The most seconds a job may take to end once its lost rank can be noticed: a few on an idle machine (the
#: ranks' and torchrun's exits included), several times that on a shared one; a hang takes minutes.
END_WITHIN = 60


def job_processes(marker: str) -> dict[int, int]:
    """``pid: rank`` of the live processes of the job started with ``CRYOSIEVE_TEST_JOB=marker`` (-1: the
    launcher), found by their start environment."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            words = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        environ = dict(word.decode(errors="replace").split("=", 1) for word in words if b"=" in word)
        if environ.get("CRYOSIEVE_TEST_JOB") == marker:
            found[int(entry.name)] = int(environ.get("RANK", "-1"))
    return found


class Job:
    """A 3-rank sieve with an automatic ratio under ``torchrun``, in a session of its own, its error output read
    as it comes; every process of it is killed (SIGKILL, which ends stopped ones too) when the test is over."""

    def __init__(self, data: Path, out: Path) -> None:
        self.marker = f"{os.getpid()}-{time.monotonic_ns()}"
        args = [arg for arg in core_args(str(out / "k.star"), "--retention_ratio", "auto", "--batch_size", "16")
                if arg != "--quiet"]  # the progress bars tell when the ranks are at work
        self.launcher = subprocess.Popen(torchrun(3, "cryosieve.cli.core", args), cwd=data, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, start_new_session=True,
                                         env=job_environment(CRYOSIEVE_RANK_TIMEOUT=str(RANK_TIMEOUT),
                                                             CRYOSIEVE_TEST_JOB=self.marker))
        self.error = b""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.launcher.stderr is not None
        while chunk := os.read(self.launcher.stderr.fileno(), 65536):
            self.error += chunk

    def rank_pid(self, rank: int, within: float = JOB_LIMIT) -> int:
        """The process id of ``rank`` once it has started."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for pid, found in job_processes(self.marker).items():
                if found == rank:
                    return pid
            time.sleep(0.01)
        raise AssertionError(f"rank {rank} did not start within {within} s")

    def wait_for_work(self, within: float = JOB_LIMIT) -> None:
        """Until rank 0's scoring bar has counted particles (every rank scores its part)."""
        deadline = time.monotonic() + within
        while not re.search(rb"scoring: +\d+%\|[^|]*\| +[1-9]\d*/1200", self.error):
            assert self.launcher.poll() is None, self.error.decode(errors="replace")
            assert time.monotonic() < deadline, "the ranks did not start scoring"
            time.sleep(0.02)

    def end(self) -> tuple[int, str, float, dict[int, int]]:
        """Wait for the job to end: (exit code, our lines, seconds since now, the processes left behind)."""
        started = time.monotonic()
        code = self.launcher.wait(timeout=JOB_LIMIT)
        seconds = time.monotonic() - started
        left = job_processes(self.marker)
        self.reader.join(timeout=10)
        text = self.error.decode(errors="replace")
        ours = re.findall(r"cryosieve-core: [^\r\n]*", text)
        return code, "\n".join(ours), seconds, left

    def close(self) -> None:
        for pid in job_processes(self.marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.launcher.poll() is None:
            self.launcher.wait()


def nothing_written(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


def test_a_rank_frozen_at_start_up_is_noticed(data: Path, tmp_path: Path) -> None:
    """Rank 0 stopped as soon as it exists (importing; the others meet without it): noticed by its stopped
    process, the job ends with one line naming it, and it is killed."""
    job = Job(data, tmp_path / "out")
    try:
        os.kill(job.rank_pid(0), signal.SIGSTOP)
        code, ours, seconds, left = job.end()
    finally:
        job.close()
    assert code != 0 and left == {}, (ours, left)
    assert re.fullmatch(rf"cryosieve-core: error: rank 0 \(on {re.escape(HOST)}\) (is stopped \(a SIGSTOP or "
                        rf"Ctrl-Z\) and has not joined the job|stopped responding: no heartbeat) for "
                        rf"{RANK_TIMEOUT} s; stopping the job", ours), ours
    assert seconds < RANK_TIMEOUT + 60  # the others' start-up included
    assert nothing_written(tmp_path / "out")


def test_a_frozen_rank_is_noticed(data: Path, tmp_path: Path) -> None:
    """Rank 1 stopped while the ranks score: noticed by its heartbeat, one line naming it, killed."""
    job = Job(data, tmp_path / "out")
    try:
        victim = job.rank_pid(1)
        job.wait_for_work()
        os.kill(victim, signal.SIGSTOP)
        code, ours, seconds, left = job.end()
    finally:
        job.close()
    assert code != 0 and left == {}, (ours, left)
    assert ours == (f"cryosieve-core: error: rank 1 (on {HOST}) stopped responding: no heartbeat for {RANK_TIMEOUT} s; "
                    "stopping the job"), ours
    # the last beat it gave came up to one heartbeat (1 s) before it was stopped
    assert RANK_TIMEOUT - 1.5 < seconds < RANK_TIMEOUT + END_WITHIN
    assert nothing_written(tmp_path / "out")


def test_a_killed_rank_stops_the_job(data: Path, tmp_path: Path) -> None:
    """Rank 2 killed while the ranks score: torchrun stops the others with SIGTERM, and the others' collectives
    fail; whichever comes first, one line names the lost rank."""
    job = Job(data, tmp_path / "out")
    try:
        victim = job.rank_pid(2)
        job.wait_for_work()
        os.kill(victim, signal.SIGKILL)
        code, ours, seconds, left = job.end()
    finally:
        job.close()
    assert code != 0 and left == {}, (ours, left)
    assert ours == (f"cryosieve-core: error: rank 2 (on {HOST}) ended unexpectedly (killed, or it crashed); "
                    "stopping the job"), ours
    assert seconds < END_WITHIN
    assert nothing_written(tmp_path / "out")


@pytest.mark.parametrize(("target", "number", "word"), [("torchrun", signal.SIGINT, "interrupted"),
                                                        ("rank 1", signal.SIGTERM, "terminated")])
def test_a_stop_signal_ends_the_job_with_one_line(data: Path, tmp_path: Path, target: str, number: int,
                                                  word: str) -> None:
    """Ctrl-C (SIGINT to torchrun, which passes it on to every rank) or SIGTERM to one rank while the ranks
    score: the job stops, rank 0 says so once, nothing is written or left."""
    job = Job(data, tmp_path / "out")
    try:
        victim = job.launcher.pid if target == "torchrun" else job.rank_pid(1)
        job.wait_for_work()
        os.kill(victim, number)
        code, ours, seconds, left = job.end()
    finally:
        job.close()
    assert code != 0 and left == {}, (ours, left)
    assert ours == f"cryosieve-core: {word}", ours
    assert seconds < END_WITHIN
    assert nothing_written(tmp_path / "out")


@pytest.mark.parametrize("alone", [0, 1])
def test_a_rank_that_never_comes_ends_the_rendezvous(data: Path, tmp_path: Path, alone: int) -> None:
    """A job of two ranks started without torchrun, one of which never comes: rank 0 alone (it serves the
    job's store) gives up on rank 1, rank 1 alone on reaching rank 0, each after CRYOSIEVE_RENDEZVOUS_TIMEOUT."""
    port = free_port()
    environment = job_environment(RANK=str(alone), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=str(port), CRYOSIEVE_RENDEZVOUS_TIMEOUT="5")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "cryosieve.cli.core", *core_args(str(tmp_path / "out" / "k.star"))],
                            cwd=data, env=environment, capture_output=True, text=True, timeout=JOB_LIMIT)
    seconds = time.monotonic() - started
    ours = re.findall(r"cryosieve-core: [^\r\n]*", result.stderr)
    expected = ("cryosieve-core: error: rank 1 (host unknown) has not joined the job within 5 s; stopping the job"
                if alone == 0 else
                f"cryosieve-core: error: rank 1: could not reach the job's rendezvous at 127.0.0.1:{port} within 5 s")
    assert result.returncode == 1 and ours == [expected], result.stderr
    assert 5 < seconds < 5 + 90  # imports included; the default is 300 s
    assert nothing_written(tmp_path / "out")
