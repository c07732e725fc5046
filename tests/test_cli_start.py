"""Every command answers help, a misspelled flag and a bad input before it loads torch (seconds on a cold
machine), and a misspelled flag is answered with the nearest one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from safety_helpers import SmallData, make_small_data

#: Run a command's ``main`` in a fresh interpreter; print its exit code and the heavy modules it loaded.
PROBE = """
import contextlib, importlib, io, sys
module = importlib.import_module("cryosieve.cli." + sys.argv[1])
error = io.StringIO()
with contextlib.redirect_stderr(error), contextlib.redirect_stdout(io.StringIO()):
    try:
        code = module.main(sys.argv[2:])
    except SystemExit as stop:
        code = stop.code
print(code)
print(",".join(name for name in ("torch", "gemmi", "matplotlib") if name in sys.modules))
print(error.getvalue().strip().splitlines()[-1] if error.getvalue().strip() else "")
"""


def probe(command: str, *args: str) -> tuple[int, list[str], str]:
    """``(exit code, heavy modules loaded, last line on stderr)`` of ``cryosieve.cli.COMMAND`` with ``args``."""
    result = subprocess.run([sys.executable, "-c", PROBE, command, *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    code, loaded, last = [*result.stdout.splitlines(), "", "", ""][:3]
    return int(code), [name for name in loaded.split(",") if name], last


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> SmallData:
    return make_small_data(tmp_path_factory.mktemp("start") / "data", count=40)


@pytest.mark.parametrize("command", ["core", "pipeline", "reconstruct", "postprocess", "simulate", "refine",
                                     "rhbfactor"])
def test_help_loads_nothing_heavy(command: str) -> None:
    code, loaded, _ = probe(command, "-h")
    assert code == 0 and loaded == []


def test_a_misspelled_flag_gets_the_nearest_one(small: SmallData, tmp_path: Path) -> None:
    code, loaded, last = probe("core", "--i", str(small.star), "--o", str(tmp_path / "k.star"), "--volume",
                               str(small.half1), "--frequencyy", "20")
    assert code == 2 and loaded == []
    assert last == "cryosieve-core: error: unrecognised option --frequencyy; did you mean --frequency?", last
    code, _, last = probe("pipeline", "--i", str(small.star), "--o", str(tmp_path / "p_"), "--mask", str(small.mask),
                          "--retention-ratio", "0.7")
    assert code == 2 and last.endswith("did you mean --retention_ratio?"), last
    code, _, last = probe("core", "--i", "x", "--o", "y", "--volume", "v", "--frequency", "9", "--zzz")
    assert code == 2 and last.endswith("unrecognised option --zzz (see cryosieve-core -h)"), last
    assert not (tmp_path / "k.star").exists() and not list(tmp_path.iterdir())


def test_bad_input_is_answered_before_torch_loads(small: SmallData, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.mrc")
    cases = [
        ("core", ["--i", str(small.star), "--o", str(tmp_path / "k.star"), "--directory", str(small.folder),
                  "--volume", str(small.half1), "--volume", missing, "--frequency", "20"], "missing.mrc"),
        ("core", ["--i", str(small.star), "--o", str(tmp_path / "k.star"), "--directory", str(small.folder),
                  "--volume", str(small.half1), "--volume", str(small.half2), "--frequency", "2"], "Nyquist"),
        ("pipeline", ["--i", str(small.star), "--o", str(tmp_path / "p_"), "--directory", str(small.folder),
                      "--mask", missing], "missing.mrc"),
        ("pipeline", ["--i", str(small.star), "--o", str(tmp_path / "p_"), "--directory", str(small.folder),
                      "--mask", str(small.mask), "--frequency_end", "1"], "--frequency_end"),
        ("reconstruct", ["--i", str(tmp_path / "missing.star"), "--o", str(tmp_path / "m.mrc")], "missing.star"),
        ("postprocess", ["--i", str(small.half1), "--i2", missing, "--mask", str(small.mask), "--o",
                         str(tmp_path / "post")], "missing.mrc"),
        ("simulate", ["--o", str(tmp_path / "sim"), "--num_particles", "0"], "--num_particles"),
        ("refine", ["--i", str(tmp_path / "missing.star"), "--o", str(tmp_path / "r.csv"), "--backend", "fixed"],
         "missing.star"),
        ("refine", ["--i", str(tmp_path / "missing.star"), "--o", str(tmp_path / "r.csv"), "--backend", "builtin"],
         "missing.star"),
        ("refine", ["--i", str(small.star), "--o", str(tmp_path / "r.csv"), "--backend", "builtin", "--search_range",
                    "0"], "--search_range"),
    ]
    for command, args, named in cases:
        code, loaded, last = probe(command, *args)
        assert code == 2 and named in last, (command, last)
        assert "torch" not in loaded, (command, loaded)
    assert not list(tmp_path.iterdir())
