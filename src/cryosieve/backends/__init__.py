"""Back-ends of the iterative pipeline that run external programs.

The built-in reconstruction (:mod:`cryosieve.reconstruct`) and post-processing
(:mod:`cryosieve.postprocess`) run in-process; :mod:`cryosieve.backends.relion` runs
RELION's ``relion_reconstruct`` and ``relion_postprocess`` (or any program with the same
command line) as the published CryoSieve does.
"""

from cryosieve.backends.relion import (
    ExternalCommandError,
    PostprocessOutcome,
    read_postprocess_star,
    reconstruct_half_maps,
    run_postprocess,
    split_command,
    with_launcher,
)

__all__ = [
    "ExternalCommandError",
    "PostprocessOutcome",
    "read_postprocess_star",
    "reconstruct_half_maps",
    "run_postprocess",
    "split_command",
    "with_launcher",
]
