"""What a simulation needs before it computes: the bundled atomic models and the checks of the settings,
the model files and the output folder (:func:`check_inputs`). Light (no torch, no gemmi), so that a command
refuses a mistake at once.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

from cryosieve.errors import CryoSieveInputError, setting
from cryosieve.io.paths import InputFile, check_outputs
from cryosieve.simulate.parameters import SimulationSettings

DEFAULT_MODEL = "1BD2.pdb.gz"
DEFAULT_JUNK_MODEL = "4E43.pdb.gz"


def bundled_model(name: str) -> str:
    """Path of an atomic model shipped in ``cryosieve/data`` (e.g. ``"1BD2.pdb.gz"``)."""
    return str(importlib.resources.files("cryosieve") / "data" / name)


def check_output_folder(target: Path, overwrite: bool) -> None:
    """The output folder may be created, or replaced (an existing non-empty one only with ``overwrite``)."""
    if target.exists() and not target.is_dir():
        raise CryoSieveInputError(f"{target}: exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise CryoSieveInputError(f"{target}: output folder exists and is not empty (use {setting('overwrite')})")


def check_inputs(output_folder: str | os.PathLike[str], settings: SimulationSettings, *,
                 model: str | None = None, junk_model: str | None = None,
                 overwrite: bool = False) -> tuple[str, str]:
    """Check settings, model files and the output folder before any work.

    Returns the (model, junk model) paths with the bundled defaults filled in.
    Raises :class:`CryoSieveInputError` naming the option or file at fault.
    """
    settings.check()
    model = bundled_model(DEFAULT_MODEL) if model is None else str(model)
    junk_model = bundled_model(DEFAULT_JUNK_MODEL) if junk_model is None else str(junk_model)
    for path in (model, junk_model):
        if not os.path.isfile(path):
            raise CryoSieveInputError(f"{path}: atomic model file not found")
    target = Path(output_folder)
    if not str(output_folder).strip():
        raise CryoSieveInputError(f"{setting('output_folder')}: empty output path")
    check_output_folder(target, overwrite)
    check_outputs([], [InputFile(Path(model), setting("model")), InputFile(Path(junk_model), setting("junk_model"))],
                  [target])
    return model, junk_model
