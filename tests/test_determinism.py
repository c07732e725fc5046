"""Same input, same bytes: every output of a run (STAR, CSV, MRC, JSON, PNG, HTML; the log file
apart, which records times) is identical across repeated runs and process counts. Resumed
runs are compared in ``test_signals.py`` and ``test_pipeline.py``."""

from __future__ import annotations

import html
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from safety_helpers import SmallData, make_small_data, tree


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> SmallData:
    return make_small_data(tmp_path_factory.mktemp("determinism") / "data", count=400, seed=11)


#: Outputs that name the command that started the run (which differs by ``--num_gpus``).
NAMING_THE_COMMAND = ("_report.html", "_state.json")


def outputs(folder: Path) -> dict[str, str]:
    return {name: digest for name, digest in tree(folder).items()
            if not name.endswith(("_pipeline.log", *NAMING_THE_COMMAND))}


def without_command(folder: Path, command: list[str]) -> dict[str, str]:
    """The outputs that name the command, with the command's options past ``-m cryosieve.cli.pipeline``
    (written as the user typed them: shell-quoted, HTML-escaped in the report) taken out."""
    typed = " ".join(shlex.quote(word) for word in ["cryosieve", *command[3:]])
    texts = {}
    for name in NAMING_THE_COMMAND:
        text = (folder / name).read_text()
        assert typed in text or html.escape(typed) in text, name
        texts[name] = text.replace(html.escape(typed), "COMMAND").replace(typed, "COMMAND")
    return texts


@pytest.mark.slow
def test_pipeline_outputs_are_the_same_bytes_across_runs_and_process_counts(small: SmallData,
                                                                            tmp_path: Path) -> None:
    results = {}
    for name, extra in (("once", []), ("again", []), ("two_processes", ["--num_gpus", "2"])):
        folder = tmp_path / name
        folder.mkdir()
        command = [sys.executable, "-m", "cryosieve.cli.pipeline", "--i", str(small.star), "--o", "run/",
                   "--mask", str(small.mask), "--directory", str(small.folder), "--num_iters", "2",
                   "--frequency_start", "30", "--frequency_end", "12", "--balance", "--device", "cpu", "--quiet",
                   *extra]
        result = subprocess.run(command, capture_output=True, text=True, cwd=folder)
        assert result.returncode == 0, result.stderr
        results[name] = outputs(folder / "run")
        results[name]["named"] = without_command(folder / "run", command)  # type: ignore[assignment]
    assert len(results["once"]) > 25
    assert any(name.endswith(".png") for name in results["once"])
    assert results["again"] == results["once"]
    assert results["two_processes"] == results["once"]
