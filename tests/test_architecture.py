"""``docs/architecture.md`` is true to the code: every module it names exists, and every module of the
package is named in it (a new module is placed in the picture when it is added)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "cryosieve"
DOCUMENT = ROOT / "docs" / "architecture.md"

#: ``io/star.py``, ``scoring/``, ``cryosieve.scoring.fourier`` as written between backticks.
NAMED = re.compile(r"`((?:[a-z_]+/)*[a-z_]+\.py|(?:[a-z_]+/)+|cryosieve(?:\.[a-z_]+)+)`")


def modules() -> set[str]:
    """Every module and package of cryosieve, as paths relative to the package (``io/star.py``, ``io/``)."""
    found = {str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py") if path.name != "__init__.py"}
    found |= {str(path.parent.relative_to(PACKAGE)) + "/" for path in PACKAGE.rglob("__init__.py")
              if path.parent != PACKAGE}
    return found


def named_in_document() -> set[str]:
    names = set()
    for name in NAMED.findall(DOCUMENT.read_text()):
        if name.startswith("cryosieve."):
            parts = name.split(".")[1:]
            candidate = "/".join(parts)
            name = candidate + "/" if (PACKAGE / candidate).is_dir() else candidate + ".py"
        names.add(name)
    return names


#: Folders of the repository (not of the package) the document may name files in.
REPOSITORY = ("tests/", "benchmarks/", "scripts/", "docs/", "src/")


def test_every_module_named_exists() -> None:
    missing = sorted(name for name in named_in_document()
                     if not (ROOT / name if name.startswith(REPOSITORY) else PACKAGE / name).exists())
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"


#: Folders whose modules the document may name as a whole (one module per command).
WHOLE = ("cli/",)


def test_every_module_is_named() -> None:
    named = named_in_document()
    unnamed = sorted(name for name in modules() if name not in named
                     and not any(name.startswith(folder) and folder in named for folder in WHOLE))
    assert not unnamed, f"modules missing from docs/architecture.md: {unnamed}"
