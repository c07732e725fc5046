"""``--validate``: each set refined with its poses re-estimated (a :class:`~cryosieve.backends.Refiner`),
and with ``--validate_rh`` nested halves of it for the Rosenthal-Henderson B-factor.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cryosieve.io.particle_files import read_particle_file
from cryosieve.pipeline.prepare import Prepared
from cryosieve.progress import ProgressFactory
from cryosieve.refine import jobs
from cryosieve.refine.rh import fit_rh, nested_subsets
from cryosieve.symmetry import group_order


def validate(prepared: Prepared, iteration: int, progress: ProgressFactory) -> dict[str, Any]:
    """Refine set ``iteration`` (``PREFIX_iter{i}.star``) with the validator, and with ``validate_rh`` nested
    halves of it for the Rosenthal-Henderson fit; returns the outcome the state records."""
    settings, names = prepared.settings, prepared.names
    validator = prepared.validator
    assert validator is not None
    star = names.star(iteration).absolute()
    particles = read_particle_file(star, prepared.angpix, settings.passthrough)
    job_settings = jobs.JobSettings(
        directory=Path(os.path.abspath(settings.directory)) if settings.directory else None,
        symmetry=prepared.symmetry, reference=None, ini_high=30.0, mask=Path(os.path.abspath(settings.mask)),
        particle_diameter=None, local=False,
        passthrough=tuple(Path(os.path.abspath(path)) for path in settings.passthrough))
    subsets = nested_subsets(len(particles), particles.random_subset,
                             settings.rh_halves if settings.validate_rh else 0, seed=1, resplit=False)
    specs = [jobs.JobSpec(name=f"set{iteration}_half{level}", source=star, trial=0, level=level, seed=1,
                          rows=None if level == 0 else rows) for level, rows in enumerate(subsets)]

    @contextlib.contextmanager
    def labelled(description: str, total: int) -> Iterator[Callable[[int], None]]:
        with progress(f"set {iteration}: validate", total) as update:
            yield update

    results = jobs.run(specs, job_settings, validator, names.validation, progress=labelled)
    full = results[specs[0].name]
    rh_bfactor = rh_classical = None
    if settings.validate_rh:
        fit = fit_rh(np.array([math.nan if results[spec.name].resolution_angstrom is None
                               else results[spec.name].resolution_angstrom for spec in specs]),
                     np.array([results[spec.name].particles for spec in specs]), group_order(prepared.symmetry),
                     round(float(particles.voltage[0])))
        rh_bfactor, rh_classical = fit.bfactor, fit.classical_bfactor
    return {"resolution_angstrom": full.resolution_angstrom, "bfactor": full.bfactor, "particles": full.particles,
            "alignment3D": str(names.validation / specs[0].name / full.alignment_star), "fixed_pose": full.fixed_pose,
            "rh_bfactor": rh_bfactor, "rh_bfactor_classical": rh_classical, "validator": validator.describe()}
