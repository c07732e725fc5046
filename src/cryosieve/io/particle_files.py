"""Particle files of any supported format: RELION STAR (:mod:`cryosieve.io.star`) and CryoSPARC
``.cs`` (:mod:`cryosieve.io.cs`), chosen by the file's extension.

A set is written in the format of the name it is written to: in its own format with every
column or field as read, or converted (``--o x.star`` for a ``.cs`` input, and the reverse).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from cryosieve.errors import CryoSieveInputError, setting
from cryosieve.particles import ParticleSet


def format_of(path: str | os.PathLike[str]) -> str:
    """``"cs"`` for a ``.cs`` name, ``"star"`` otherwise."""
    return "cs" if Path(path).suffix.lower() == ".cs" else "star"


def read_particle_file(path: str | os.PathLike[str], angpix: float | None = None,
                       passthrough: tuple[str, ...] = ()) -> ParticleSet:
    """Read a STAR or ``.cs`` particle file (``passthrough``: further ``.cs`` files of the same
    particles, for a ``.cs`` input only)."""
    if format_of(path) == "cs":
        from cryosieve.io.cs import read_cs_particles

        return read_cs_particles(path, passthrough, angpix)
    if passthrough:
        raise CryoSieveInputError(f"{setting('passthrough')}: only for .cs particle files, not {path}")
    from cryosieve.io.star import read_particles

    return read_particles(path, angpix)


def in_format_of(particles: ParticleSet, path: str | os.PathLike[str]) -> ParticleSet:
    """``particles`` described in the format of ``path``: itself when it is already, else converted."""
    wanted = format_of(path)
    if particles.format == wanted:
        return particles
    if wanted == "star":
        from cryosieve.io.star import star_source_of

        return replace(particles, source=star_source_of(particles))
    from cryosieve.io.cs import CsSource, particles_to_dataset

    return replace(particles, source=CsSource(particles_to_dataset(particles)))
