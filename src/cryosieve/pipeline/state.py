"""``PREFIX_state.json``: what a run is (its record: the settings that decide its outputs, by field
name, the SHA-256 of each input file, and each particle stack's size, modification time and SHA-256 of its
first and last image), the steps it has completed and what each measured. Written
atomically after every step, so an interrupted run resumes where it stopped (``--continue``), and
refused when anything in the record changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from cryosieve.errors import CryoSieveInputError, setting
from cryosieve.io.atomic import write_text_atomic

log = logging.getLogger("cryosieve")

#: The state file's format (another one is not resumed).
STATE_FORMAT = 4
#: The record's particle stacks, path -> :func:`cryosieve.io.stack.stack_record`.
STACKS = "particle_stacks"
#: The last step of a run whose selection goes back to CryoSPARC.
GIVE_BACK = "give back to CryoSPARC"


def step_names(num_iters: int, validate: bool = False, give_back: bool = False, realign: bool = False) -> list[str]:
    """Every step of a run, in order."""
    names = ["prepare"]
    for iteration in range(num_iters):
        names += [f"reconstruct {iteration}", f"postprocess {iteration}"]
        names += [f"validate {iteration}"] if validate else []
        names += [f"realign {iteration}"] if realign else []
        names += [f"sieve {iteration}"]
    return names + ([f"validate {num_iters}"] if validate else []) + ([GIVE_BACK] if give_back else [])


def sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes (hexadecimal)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class State:
    """``PREFIX_state.json``: settings, completed steps and each round's outcome, rewritten atomically."""

    def __init__(self, path: Path, arguments: dict[str, Any], completed: list[str],
                 outcomes: dict[str, dict[str, Any]], command: str = "") -> None:
        self.path = path
        #: The command line that started the run (kept when it is resumed; not compared).
        self.command = command
        self.arguments = arguments
        self.completed = completed
        self.outcomes = outcomes

    def save(self) -> None:
        document = {"program": "cryosieve", "format": STATE_FORMAT, "arguments": self.arguments,
                    "command": self.command, "completed": self.completed, "outcomes": self.outcomes}
        write_text_atomic(self.path, json.dumps(document, indent=2) + "\n")

    def done(self, step: str) -> bool:
        return step in self.completed

    def record(self, step: str, outcome: dict[str, Any] | None = None) -> None:
        """Mark ``step`` done, with what it measured (saved in the same write)."""
        if outcome is not None:
            self.outcomes[step] = outcome
        self.completed.append(step)
        self.save()


def open_state(path: Path, record: dict[str, Any], resume: bool, steps: list[str], command: str = "") -> State:
    """The state at ``path``: a new one holding ``record`` and the ``command`` that starts the run (nothing
    written), or with ``resume`` the
    earlier run's, refused (one line) when its record differs from ``record`` (a setting or an input
    changed) or it holds a step not among ``steps``. Without ``resume`` an existing state is refused."""
    if not path.exists():
        if resume:
            log.info("resuming: no %s yet, starting from the beginning", path)
        return State(path, record, [], {}, command)
    if not resume:
        raise CryoSieveInputError(
            f"{setting('output_prefix')} {str(path).removesuffix('_state.json')}: {path} exists (an earlier run); "
            f"add {setting('resume')} to resume it or choose another output prefix")
    try:
        document = json.loads(path.read_text())
        version = int(document.get("format", 1))
        recorded = dict(document["arguments"])
        completed = [str(step) for step in document["completed"]]
        outcomes = dict(document.get("outcomes", {}))
        started_by = str(document.get("command", ""))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CryoSieveInputError(f"{path}: not a readable state file ({error})") from None
    if version != STATE_FORMAT:
        raise CryoSieveInputError(
            f"{setting('resume')}: {path} was written by another version of cryosieve (state format {version}, this "
            f"one reads {STATE_FORMAT}); start a new run with another output prefix")
    _compare(record, recorded, path)
    unknown = [step for step in completed if step not in steps]
    if unknown:
        raise CryoSieveInputError(f"{path}: unknown step {unknown[0]!r}")
    return State(path, record, completed, outcomes, started_by)


def _compare(record: dict[str, Any], recorded: dict[str, Any], path: Path) -> None:
    """Refuse a resume whose record differs from the one in ``path``, naming the first difference."""
    for name, value in record.items():
        if name not in recorded:
            raise CryoSieveInputError(f"{setting('resume')}: {path} does not record {name}; start a new run")
        if name == STACKS:
            _compare_stacks(value, recorded[name], path)
        elif isinstance(value, dict) and isinstance(recorded[name], dict):
            _compare(value, recorded[name], path)
        elif recorded[name] != value:
            if name.endswith("_sha256"):
                raise CryoSieveInputError(f"{setting('resume')}: the {setting(name[:-len('_sha256')])} file changed "
                                          f"since the run recorded in {path}")
            raise CryoSieveInputError(
                f"{setting('resume')}: {setting(name)} changed ({recorded[name]!r} in {path}, now {value!r})")


def _compare_stacks(now: dict[str, Any], recorded: dict[str, Any], path: Path) -> None:
    """Refuse to resume with a particle stack whose record (:func:`cryosieve.io.stack.stack_record`: size,
    modification time, first and last image) differs from the one in the state ``path``."""
    for stack, record in now.items():
        if recorded.get(stack) != record:
            what = "was not read by" if stack not in recorded else \
                "changed (size, modification time, first or last image) since"
            raise CryoSieveInputError(f"{setting('resume')}: the particle stack {stack} {what} the run recorded in "
                                      f"{path}; start a new run")
