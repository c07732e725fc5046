"""``cryosieve.refine.inputs``: STAR files named directly, by wildcard, or listed in text files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cryosieve.errors import CryoSieveInputError
from cryosieve.refine.inputs import expand_inputs


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    for name in ("out/_iter0.star", "out/_iter1.star", "out/_iter10.star", "out/_iter2.star", "b.star"):
        (tmp_path / name).write_text("data_\n")
    return tmp_path


def test_names_wildcards_and_lists_in_order(folder: Path) -> None:
    (folder / "list.txt").write_text("# sets\nb.star\n\n  out/_iter2.star  \n")
    paths = expand_inputs(["b.star", "out/_iter?.star", "list.txt"])
    expected = ["b.star", "out/_iter0.star", "out/_iter1.star", "out/_iter2.star", "b.star", "out/_iter2.star"]
    assert paths == [Path(os.path.abspath(folder / name)) for name in expected]


@pytest.mark.parametrize(("items", "content", "message"), [
    (["out/_iter?.mrc"], None, "out/_iter\\?.mrc: matches no file"),
    (["missing.star"], None, "missing.star: file not found"),
    (["b.mrcs"], None, "neither a particle file"),
    (["list.txt"], "b.star\nparticles.mrcs\n", "list.txt: line 2 \\(particles.mrcs\\) is not a STAR or .cs file"),
    (["list.txt"], "gone.star\n", "list.txt: line 1: gone.star: file not found"),
    (["list.txt"], "# nothing\n", "no particle set given"),
])
def test_bad_inputs_are_named(folder: Path, items: list[str], content: str | None, message: str) -> None:
    (folder / "b.mrcs").write_text("")
    if content is not None:
        (folder / "list.txt").write_text(content)
    with pytest.raises(CryoSieveInputError, match=message):
        expand_inputs(items)
