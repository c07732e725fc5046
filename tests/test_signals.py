"""Interrupts, concurrent runs and killed runs.

* Ctrl-C (SIGINT) at several moments of ``cryosieve-core --num_gpus 2 --device cpu``, worker
  start-up and rendezvous included (each moment found by what the processes do, not by a time,
  so a loaded machine moves nothing): exit 130 within seconds, one line, no output, no worker
  left; SIGTERM: exit 143.
* Ctrl-C in the pipeline stops it (exit 130), and ``--continue`` then finishes it with the
  same bytes as an uninterrupted run.
* Two runs on one output prefix: the second is refused, naming the first; the lock of a
  killed run is taken over.
* Temporaries of killed processes are removed by the next run; those of live ones are not.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cryosieve.cli import core, pipeline
from cryosieve.io.atomic import remove_stale_temporaries_of, temporary_name
from cryosieve.io.lock import exclusive_lock
from safety_helpers import SmallData, make_small_data, tree

#: Largest time (s) an interrupted command may take to stop its work and say so.
STOP_WITHIN = 10.0
#: Largest time (s) it may take to exit: Python's own teardown with torch loaded takes about 2 s more on a
#: 2-core machine, and several times that when the machine is shared.
EXIT_WITHIN = 60.0
#: Seconds a run may take before the test gives up on it (a guard against a hang, not a measure: a shared
#: 2-core machine has been seen to take several times as long as an idle one).
RUN_LIMIT = 900.0


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> SmallData:
    return make_small_data(tmp_path_factory.mktemp("signals") / "data", count=600)


def core_command(data: SmallData, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cryosieve.cli.core", "--i", str(data.star), "--o", str(out), "--directory",
            str(data.folder), "--volume", str(data.half1), "--volume", str(data.half2), "--mask", str(data.mask),
            "--frequency", "20", "--device", "cpu", *extra]


def pipeline_command(data: SmallData, prefix: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cryosieve.cli.pipeline", "--i", str(data.star), "--o", prefix, "--mask",
            str(data.mask), "--directory", str(data.folder), "--num_iters", "2", "--frequency_start", "30",
            "--frequency_end", "12", "--device", "cpu", *extra]


def scoring_workers(marker: str) -> dict[int, int]:
    """``pid: sockets`` of the other ranks (``python -m cryosieve.world``) alive now of the command started
    with ``CRYOSIEVE_TEST_RUN=marker`` (they inherit its environment), with how many sockets each has open
    (one or two, the rendezvous under way: the job's store; three or more, connected to rank 0: scoring)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().split(b"\0")
                if b"cryosieve.world" not in command:
                    continue
                if f"CRYOSIEVE_TEST_RUN={marker}".encode() not in (entry / "environ").read_bytes().split(b"\0"):
                    continue
                links = [os.readlink(link) for link in (entry / "fd").iterdir()]
                found[int(entry.name)] = sum(link.startswith("socket:") for link in links)
            except OSError:
                continue
    return found


#: Moments of a two-process sieve, each the first time its test holds (workers: ``pid: sockets``):
#: the command's own start-up, a worker just started, the rendezvous under way, the workers connected
#: (scoring starts), and scoring.
MOMENTS: dict[str, Callable[[int, dict[int, int]], bool]] = {
    "start-up": lambda pid, workers: handles_sigterm(pid),
    "worker start": lambda pid, workers: len(workers) > 0,
    "rendezvous": lambda pid, workers: any(workers.values()),
    "connected": lambda pid, workers: len(workers) == 1 and min(workers.values()) >= 3,
}


def handles_sigterm(pid: int) -> bool:
    """Whether process ``pid`` catches SIGTERM: the command has begun (Python alone does not catch it, and
    a signal during its own start-up ends it before any code of the command runs)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def stop_and_wait(process: subprocess.Popen[str], number: int) -> tuple[str, float, float]:
    """Send ``number`` to ``process``; returns its error output, the seconds until its last line came (it
    stopped and said so) and until it exited."""
    assert process.stderr is not None
    chunks: list[tuple[float, str]] = []
    sent = time.monotonic()
    process.send_signal(number)

    def read() -> None:
        assert process.stderr is not None
        while chunk := os.read(process.stderr.fileno(), 65536):
            chunks.append((time.monotonic() - sent, chunk.decode(errors="replace")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        process.wait(timeout=EXIT_WITHIN)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"did not exit within {EXIT_WITHIN} s of the signal")
    exited = time.monotonic() - sent
    reader.join(timeout=10)
    said = max((when for when, text in chunks if text.strip()), default=exited)
    return "".join(text for _, text in chunks), said, exited


def interrupt_at(command: list[str], moment: str, number: int = signal.SIGINT) -> tuple[int, str, float, str]:
    """Run ``command``, send it ``number`` at ``moment`` (:data:`MOMENTS`, or ``"scoring"``: half a second after
    the workers connected); returns (exit code, stderr, seconds until it said it stopped, the run's marker)."""
    marker = f"{os.getpid()}-{time.monotonic_ns()}"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "CRYOSIEVE_TEST_RUN": marker})
    test = MOMENTS["connected" if moment == "scoring" else moment]
    while not test(process.pid, scoring_workers(marker)):
        assert process.poll() is None, f"finished before the moment {moment!r}"
        time.sleep(0.01)
    if moment == "scoring":
        time.sleep(0.5)
    assert process.poll() is None, f"finished before the signal at {moment!r}"
    err, said, _ = stop_and_wait(process, number)
    return process.returncode, err, said, marker


@pytest.mark.parametrize("moment", [*MOMENTS, "scoring"])
def test_ctrl_c_at_any_moment_of_a_two_process_sieve(small: SmallData, tmp_path: Path, moment: str) -> None:
    out = tmp_path / "run" / "kept.star"
    code, err, took, marker = interrupt_at(core_command(small, out, "--num_gpus", "2", "--quiet"), moment)
    assert code == 130, (moment, err)
    assert took < STOP_WITHIN, (moment, took)
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "cryosieve-core: interrupted", err
    assert not out.parent.exists() or not list(out.parent.iterdir())
    deadline = time.monotonic() + 5
    while scoring_workers(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not scoring_workers(marker), "a scoring worker outlived the interrupted command"


def test_sigterm_stops_a_sieve(small: SmallData, tmp_path: Path) -> None:
    code, err, took, _ = interrupt_at(core_command(small, tmp_path / "out" / "kept.star", "--num_gpus", "2",
                                                   "--quiet"), "rendezvous", signal.SIGTERM)
    assert code == 143 and took < STOP_WITHIN, err
    assert err.strip().splitlines()[-1] == "cryosieve-core: terminated"
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def _wait_for_step(state: Path, step: str, process: subprocess.Popen[str], timeout: float = RUN_LIMIT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before the step"
        try:
            if step in json.loads(state.read_text())["completed"]:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    pytest.fail(f"step {step!r} not reached")


def outputs(prefix: str) -> dict[str, str]:
    """Every output of a run below its folder with its sha256, logs apart (they hold times)."""
    return {name: digest for name, digest in tree(Path(prefix)).items() if not name.endswith(("_pipeline.log",))}


@pytest.mark.slow
def test_ctrl_c_stops_the_pipeline_and_continue_finishes_it(small: SmallData, tmp_path: Path) -> None:
    """Same prefix in two folders: the interrupted and continued run equals the uninterrupted one byte for byte."""
    (tmp_path / "reference").mkdir()
    (tmp_path / "interrupted").mkdir()
    reference = subprocess.run(pipeline_command(small, "run/", "--quiet"), capture_output=True, text=True,
                               cwd=tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr
    folder = tmp_path / "interrupted"
    process = subprocess.Popen(pipeline_command(small, "run/", "--quiet"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, cwd=folder)
    _wait_for_step(folder / "run/_state.json", "reconstruct 0", process)
    err, said, _ = stop_and_wait(process, signal.SIGINT)
    assert process.returncode == 130 and said < STOP_WITHIN, (said, err)
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "cryosieve: interrupted", err
    assert "sieve 1" not in json.loads((folder / "run/_state.json").read_text())["completed"]
    assert not (folder / "run/_run.lock").exists()
    again = subprocess.run(pipeline_command(small, "run/", "--quiet", "--continue"), capture_output=True, text=True,
                           cwd=folder)
    assert again.returncode == 0, again.stderr
    assert outputs(str(folder / "run")) == outputs(str(tmp_path / "reference" / "run"))


def test_a_second_run_on_the_same_output_is_refused(small: SmallData, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    first = subprocess.Popen(pipeline_command(small, "run/", "--quiet"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    _wait_for_step(Path("run/_state.json"), "prepare", first)
    for extra in ([], ["--continue"]):
        code = pipeline.main(pipeline_command(small, "run/", "--quiet", *extra)[3:])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, err
        if extra:  # the state file exists: only --continue gets as far as the lock
            assert err[-1].startswith("cryosieve: error: --o run/: another run is using it"), err
            assert f"process {first.pid} on" in err[-1], err
    _, err = first.communicate(timeout=RUN_LIMIT)
    assert first.returncode == 0, err


def test_the_lock_of_a_killed_run_is_taken_over(small: SmallData, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    process = subprocess.Popen(pipeline_command(small, "run/", "--quiet"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    _wait_for_step(Path("run/_state.json"), "reconstruct 0", process)  # type: ignore[arg-type]
    process.kill()
    process.wait()
    assert Path("run/_run.lock").exists()  # left by the killed run, with its process id
    finished = subprocess.run(pipeline_command(small, "run/", "--quiet", "--continue"), capture_output=True,
                              text=True)
    assert finished.returncode == 0, finished.stderr
    assert not Path("run/_run.lock").exists()
    assert not [name for name in os.listdir("run") if ".partial" in name]


def test_lock_held_by_this_process_refuses_and_names_it(tmp_path: Path) -> None:
    with (
        exclusive_lock(tmp_path / "x.lock", "--o here"),
        pytest.raises(Exception, match=f"process {os.getpid()} on"),
        exclusive_lock(tmp_path / "x.lock", "--o here"),
    ):
        pass
    assert not (tmp_path / "x.lock").exists()
    with exclusive_lock(tmp_path / "x.lock", "--o here"):  # free again
        pass


def test_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    target = tmp_path / "kept.star"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = target.with_name(f".kept.star.{dead.pid}-0123abcd.partial.star")
    stale.write_text("left by a killed run")
    live = temporary_name(target)  # this process's: still being written
    live.write_text("being written")
    other = tmp_path / f".other.star.{dead.pid}-0123abcd.partial.star"  # not a target of this command
    other.write_text("another command's")
    assert remove_stale_temporaries_of([target]) == [stale]
    assert live.exists() and other.exists() and not stale.exists()


def test_core_removes_temporaries_left_by_a_killed_run(small: SmallData, tmp_path: Path) -> None:
    out = tmp_path / "out" / "kept.star"
    out.parent.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name in ("kept.star", "kept_sieved.star", "kept_scores.csv"):
        (out.parent / f".{name}.{dead.pid}-89abcdef.partial{Path(name).suffix}").write_text("killed")
    assert core.main(core_command(small, out, "--quiet")[3:]) == 0
    assert sorted(os.listdir(out.parent)) == ["kept.star", "kept_scores.csv", "kept_sieved.star"]


def test_an_interrupt_swallowed_by_a_finaliser_still_stops_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    """Python prints and drops a KeyboardInterrupt raised inside a finaliser; the command must still stop."""
    from cryosieve.cli._common import checked, run_command

    updates = []

    def body(_argv: object) -> int:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except KeyboardInterrupt:
            pass  # swallowed, as in "Exception ignored in ..."
        update = checked(updates.append)
        with pytest.raises(KeyboardInterrupt):
            update(1)  # the next progress report stops the work
        return 0

    assert run_command("cryosieve", body, []) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "cryosieve: interrupted"
    assert updates == []


def test_an_interrupt_inside_a_c_callback_says_one_line(capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal that lands while C code calls back into Python (numba's compiler does, while a fresh
    installation compiles its kernels) cannot raise out of the callback; the command must still say one
    line, with no traceback, and stop at its next progress report."""
    import ctypes

    from cryosieve.cli._common import checked, run_command

    inside: list[bool] = []

    @ctypes.CFUNCTYPE(None)
    def callback() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # the handler runs here, between two bytecodes of the callback
            time.sleep(0.001)
        inside.append(True)  # not reached: the KeyboardInterrupt ended the callback

    updates: list[int] = []
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)  # Python's own, which prints

    def body(_argv: object) -> int:
        callback()
        with pytest.raises(KeyboardInterrupt):
            checked(updates.append)(1)
        return 0

    assert run_command("cryosieve", body, []) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["cryosieve: interrupted"], err
    assert inside == [] and updates == []
    assert sys.unraisablehook is sys.__unraisablehook__


def test_an_interrupt_inside_exec_of_a_string_ends_with_the_exit_code(tmp_path: Path) -> None:
    """A signal that lands while ``exec`` runs a string (dataclasses build their methods so, e.g. while torch
    is imported at the start of a job) must not turn ``python -m``'s exit code 130 into death by SIGINT."""
    (tmp_path / "interrupted_in_exec.py").write_text(
        "import os, signal, sys\n"
        "from cryosieve.cli._common import run_command\n"
        "def body(_argv):\n"
        "    exec('import time\\nos.kill(os.getpid(), signal.SIGINT)\\nfor _ in range(2000):\\n"
        "    time.sleep(0.001)')\n"
        "    return 0\n"
        "if __name__ == '__main__':\n"
        "    sys.exit(run_command('cryosieve', body, []))\n")
    done = subprocess.run([sys.executable, "-m", "interrupted_in_exec"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=RUN_LIMIT)
    assert (done.returncode, done.stderr) == (130, "cryosieve: interrupted\n")
