"""What a user sees on the console: log lines apart from progress bars, no third-party noise,
one line for an error, the long FSC vector only in the run's log file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from safety_helpers import SmallData, copy_data, make_small_data, patch_int32, truncate

LOG_LINE = re.compile(r"\d\d:\d\d:\d\d ")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> SmallData:
    return make_small_data(tmp_path_factory.mktemp("console") / "data")


def run(module: str, *arguments: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", f"cryosieve.cli.{module}", *map(str, arguments)],
                          capture_output=True, text=True, env={**os.environ, **(env or {})})


def segments(stream: str) -> list[str]:
    """The pieces of a terminal stream between line feeds and carriage returns."""
    return [piece for line in stream.split("\n") for piece in line.split("\r")]


def test_log_lines_never_share_a_line_with_a_progress_bar(small: SmallData, tmp_path: Path) -> None:
    result = run("core", "--i", small.star, "--o", tmp_path / "kept.star", "--directory", small.folder,
                 "--volume", small.half1, "--volume", small.half2, "--mask", small.mask, "--frequency", 20,
                 "--device", "cpu")
    assert result.returncode == 0, result.stderr
    pieces = segments(result.stderr)
    assert any("particle/s" in piece for piece in pieces), "no progress bar drawn"
    logged = [piece for piece in pieces if LOG_LINE.search(piece)]
    assert logged
    for piece in logged:
        assert LOG_LINE.match(piece), f"a log line glued to something else: {piece!r}"
    # the reference weighting: one summary line on the console, not the per-shell vector
    assert any("weight below 0.5" in piece or "weight at least 0.5" in piece for piece in logged)
    assert "per shell" not in result.stderr


def test_pipeline_log_file_keeps_the_per_shell_fsc(small: SmallData, tmp_path: Path) -> None:
    result = run("pipeline", "--i", small.star, "--o", f"{tmp_path}/run/", "--mask", small.mask, "--directory",
                 small.folder, "--num_iters", 1, "--frequency_start", 20, "--frequency_end", 20, "--device", "cpu",
                 "--no-report")
    assert result.returncode == 0, result.stderr
    assert "per shell" not in result.stderr
    log = (tmp_path / "run" / "_pipeline.log").read_text()
    assert re.search(r"per shell: 1\.000 ", log)


def test_no_third_party_messages_on_the_console(small: SmallData, tmp_path: Path) -> None:
    """A fresh matplotlib configuration makes matplotlib build its font cache and say so: not to our users."""
    result = run("postprocess", "--i", small.half1, "--i2", small.half2, "--mask", small.mask, "--o",
                 tmp_path / "post", "--auto_bfac", "--device", "cpu", env={"MPLCONFIGDIR": str(tmp_path / "mpl")})
    assert result.returncode == 0, result.stderr
    assert "fontManager" not in result.stderr and "matplotlib" not in result.stderr.lower()
    for line in result.stderr.strip().splitlines():
        assert LOG_LINE.match(line), line


@pytest.mark.parametrize("damage, fragment", [
    (lambda d: truncate(d.stack), "truncated: expected"),
    (lambda d: patch_int32(d.stack, 12, 1), "size does not match its header"),
    (lambda d: patch_int32(d.half1, 12, 3), "complex-valued"),
    (lambda d: patch_int32(d.half1, 8, 70), "truncated: expected"),
])
def test_a_damaged_file_gives_one_line_and_no_library_warning(small: SmallData, tmp_path: Path, damage,
                                                             fragment: str) -> None:
    data = copy_data(small, tmp_path / "data")
    damage(data)
    result = run("core", "--i", data.star, "--o", tmp_path / "out" / "kept.star", "--directory", data.folder,
                 "--volume", data.half1, "--volume", data.half2, "--mask", data.mask, "--frequency", 20,
                 "--device", "cpu", "--quiet")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cryosieve-core: error: ") and fragment in lines[0], result.stderr
    assert not (tmp_path / "out").exists()
