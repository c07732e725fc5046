"""What the data set's tables hold: the STAR file's optics and particle blocks and ``truth.csv``.

Units as stated in :mod:`cryosieve.simulate`; values as drawn by
:func:`cryosieve.simulate.parameters.draw_parameters`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cryosieve.simulate.parameters import ParticleParameters, SimulationSettings

#: File names of the stack, the STAR file and the per-particle truth within the data set's folder.
STACK_NAME = "particles.mrcs"
STAR_NAME = "particles.star"
TRUTH_CSV_NAME = "truth.csv"


def image_names(count: int) -> list[str]:
    """``000001@particles.mrcs`` ... (1-based image numbers in the stack)."""
    width = max(6, len(str(count)))
    return [f"{index + 1:0{width}d}@{STACK_NAME}" for index in range(count)]


def star_blocks(parameters: ParticleParameters, settings: SimulationSettings) -> dict[str, pd.DataFrame]:
    """The RELION 3.1 blocks of the STAR file: ``{"optics": ..., "particles": ...}``.

    One optics group (voltage, Cs, amplitude contrast, pixel size, box); per particle its
    image, pose, origin in Å, CTF (``rlnPhaseShift`` when not 0), optics group 1 and half-set
    ``rlnRandomSubset`` 1/2. Never the B-factor or the junk flag (truth only).
    """
    return {"optics": _optics_table(settings), "particles": _particles_table(parameters, settings)}


def _optics_table(settings: SimulationSettings) -> pd.DataFrame:
    """``data_optics``: one row, optics group 1."""
    return pd.DataFrame({
        "rlnOpticsGroup": [1],
        "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnVoltage": [float(settings.voltage)],
        "rlnSphericalAberration": [float(settings.spherical_aberration)],
        "rlnAmplitudeContrast": [float(settings.amplitude_contrast)],
        "rlnImagePixelSize": [float(settings.pixel_size)],
        "rlnImageSize": [int(settings.box)],
        "rlnImageDimensionality": [2],
    })


def _particles_table(parameters: ParticleParameters, settings: SimulationSettings) -> pd.DataFrame:
    """``data_particles``: one row a particle, in stack order."""
    columns: dict[str, object] = {"rlnImageName": image_names(len(parameters))}
    if parameters.micrograph is not None:
        columns["rlnMicrographName"] = [f"micrographs/mic{index:04d}.mrc" for index in parameters.micrograph]
    columns |= {
        "rlnAngleRot": parameters.reported("rot"),
        "rlnAngleTilt": parameters.reported("tilt"),
        "rlnAnglePsi": parameters.reported("psi"),
        "rlnOriginXAngst": parameters.reported("origin_x"),
        "rlnOriginYAngst": parameters.reported("origin_y"),
        "rlnDefocusU": parameters.defocus_u,
        "rlnDefocusV": parameters.defocus_v,
        "rlnDefocusAngle": parameters.defocus_angle,
    }
    if settings.phase_shift != 0:
        columns["rlnPhaseShift"] = np.full(len(parameters), float(settings.phase_shift))
    columns["rlnOpticsGroup"] = np.ones(len(parameters), dtype=np.int64)
    columns["rlnRandomSubset"] = parameters.random_subset
    return pd.DataFrame(columns)


def truth_table(parameters: ParticleParameters) -> pd.DataFrame:
    """The rows of ``truth.csv``: every particle's image name, junk flag, B-factor (Å^2), true pose,
    origin (Å), defocus and half-set, as drawn; with realistic defects also its ``kind`` (good, junk,
    empty, misaligned, wrong_origin), ``is_bad`` (any but good), ``pose_error`` (degrees) and
    ``origin_error`` (Å) of its STAR row, ``contrast``, ``micrograph`` and ``noise_scale``."""
    table = pd.DataFrame({
        "rlnImageName": image_names(len(parameters)),
        "is_junk": parameters.is_junk,
        "bfactor": parameters.bfactor,
        "rot": parameters.rot,
        "tilt": parameters.tilt,
        "psi": parameters.psi,
        "origin_x_angst": parameters.origin_x,
        "origin_y_angst": parameters.origin_y,
        "defocus_u": parameters.defocus_u,
        "defocus_v": parameters.defocus_v,
        "defocus_angle": parameters.defocus_angle,
        "random_subset": parameters.random_subset,
    })
    if parameters.pose_error is not None:
        kinds = parameters.kinds()
        table["kind"] = kinds
        table["is_bad"] = kinds != "good"
        for name in ("pose_error", "origin_error", "contrast", "micrograph", "noise_scale"):
            value = getattr(parameters, name)
            if value is not None:
                table[name] = value
    return table

