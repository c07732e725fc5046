"""One job in several processes (:mod:`cryosieve.world`): ``torchrun`` with 2 and 3 CPU ranks, two "nodes" on
loopback, and ranks that fail, die or freeze. The answer must be that of one process: the same kept sets and
scores byte for byte, maps equal to float tolerance."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryosieve.scoring.loop import shard_batches
from cryosieve.simulate import SimulationSettings, simulate_particles
from cryosieve.world import World, launched_by_torchrun

#: Seconds a launched job may take before the test gives up on it.
JOB_LIMIT = 300


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
    environment = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    source = str(Path(__file__).resolve().parents[1] / "src")
    environment["PYTHONPATH"] = source + os.pathsep + environment.get("PYTHONPATH", "")
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        environment.pop(name, None)
    return environment


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


def ranks_of(launcher: subprocess.Popen[str], module: str) -> list[int]:
    """Process ids of the ranks ``launcher`` started (children running ``module``), in start order."""
    listing = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout.splitlines()[1:]
    return sorted(int(line.split()[0]) for line in listing
                  if line.split()[1] == str(launcher.pid) and module in line)


def stop_a_rank_midway(data: Path, tmp_path: Path, how: signal.Signals) -> tuple[int, str, float]:
    """Start a 3-rank sieve with an automatic ratio, send ``how`` to one of its ranks once all are working;
    returns the launcher's exit code, its error output and the seconds it took to end after the signal."""
    launcher = subprocess.Popen(torchrun(3, "cryosieve.cli.core", core_args(str(tmp_path / "out" / "k.star"),
                                                                            "--retention_ratio", "auto",
                                                                            "--batch_size", "16")),
                                cwd=data, env=job_environment(CRYOSIEVE_RANK_TIMEOUT="8"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    victim = 0
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(ranks_of(launcher, "cryosieve.cli.core")) < 3:
            time.sleep(0.2)
        ranks = ranks_of(launcher, "cryosieve.cli.core")
        assert len(ranks) == 3
        time.sleep(6)  # imports, rendezvous, reading the inputs: the ranks are at work by now
        assert launcher.poll() is None, "the job ended before a rank could be stopped"
        victim = ranks[1]
        os.kill(victim, how)
        stopped = time.monotonic()
        _, error = launcher.communicate(timeout=120)
        return launcher.returncode, error, time.monotonic() - stopped
    finally:
        if victim:
            with_suppressed = [signal.SIGCONT, signal.SIGKILL]
            for number in with_suppressed:
                try:
                    os.kill(victim, number)
                except ProcessLookupError:
                    break
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def test_a_killed_rank_stops_the_job(data: Path, tmp_path: Path) -> None:
    code, error, seconds = stop_a_rank_midway(data, tmp_path, signal.SIGKILL)
    assert code != 0 and seconds < 60
    # The others stop either on the broken connection ("another rank of the job stopped") or, when torchrun's
    # agent is first, on its SIGTERM ("terminated"); both are one line of ours.
    assert "another rank of the job stopped" in error or "cryosieve-core: terminated" in error, error
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_frozen_rank_is_noticed(data: Path, tmp_path: Path) -> None:
    code, error, seconds = stop_a_rank_midway(data, tmp_path, signal.SIGSTOP)
    assert code != 0 and seconds < 60
    assert "stopped responding" in error, error
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
