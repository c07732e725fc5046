"""The particle sets a refinement command is given: STAR files named directly, by wildcard, or
listed in text files (as the original ``cryosieve-csrefine`` takes them)."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

from cryosieve.errors import CryoSieveInputError, setting


def expand_inputs(items: Sequence[str]) -> list[Path]:
    """Absolute STAR paths, in the order given: ``A.star`` as is, a wildcard (``out/_iter?.star``) as its
    matches in sorted order, a ``.txt`` file as the STAR paths it lists one per line (relative to the
    current folder, as the original reads them; blank lines and ``#`` comments skipped).

    A name that matches nothing, a missing file or a listed name that is not a STAR file is an
    input error naming it.
    """
    paths: list[Path] = []
    for item in items:
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not matches:
            raise CryoSieveInputError(f"{setting('inputs')} {item}: matches no file")
        for match in matches:
            path = Path(match)
            if path.suffix == ".txt":
                if not path.is_file():
                    raise CryoSieveInputError(f"{setting('inputs')} {path}: file not found")
                for number, line in enumerate(path.read_text().splitlines(), start=1):
                    name = line.strip()
                    if not name or name.startswith("#"):
                        continue
                    listed = Path(name)
                    if listed.suffix not in (".star", ".cs"):
                        raise CryoSieveInputError(f"{path}: line {number} ({name}) is not a STAR or .cs file")
                    if not listed.is_file():
                        raise CryoSieveInputError(f"{path}: line {number}: {name}: file not found")
                    paths.append(Path(os.path.abspath(listed)))
            elif path.suffix in (".star", ".cs"):
                if not path.is_file():
                    raise CryoSieveInputError(f"{setting('inputs')} {path}: file not found")
                paths.append(Path(os.path.abspath(path)))
            else:
                raise CryoSieveInputError(f"{setting('inputs')} {path}: neither a particle file (.star, .cs) nor "
                                          "a list (.txt) file")
    if not paths:
        raise CryoSieveInputError(f"{setting('inputs')}: no particle set given")
    return paths
