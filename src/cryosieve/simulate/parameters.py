"""What to simulate (:class:`SimulationSettings`) and the values drawn for every particle.

Units as stated in :mod:`cryosieve.simulate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cryosieve.errors import CryoSieveInputError, setting
from cryosieve.geometry import uniform_random_euler


@dataclass(frozen=True)
class SimulationSettings:
    """What to simulate. Lengths in Å, B-factors in Å^2, angles in degrees.

    Attributes
    ----------
    num_particles, box, pixel_size:
        Particle count, image size (pixels, even, >= 16) and pixel size (Å).
    junk_fraction:
        Fraction in [0, 1) of particles that are projections of the junk model
        (exactly ``round(junk_fraction * num_particles)`` of them).
    snr:
        Signal variance / noise variance over the whole box, the signal variance pooled
        over the noiseless images of the main model's particles; ``math.inf``: no noise.
    bfactor_min, bfactor_max:
        Range of the per-particle envelope B-factor (uniform), the hidden quality.
    defocus_min, defocus_max:
        Range of defocus U (uniform, Å, positive = underfocus).
    astigmatism:
        Defocus V = U - uniform(0, astigmatism) Å; the astigmatism angle is uniform in
        [0, 180) degrees.
    max_origin:
        Origins (rlnOriginX/YAngst) are uniform in ``[-max_origin, max_origin]`` Å.
    voltage, spherical_aberration, amplitude_contrast, phase_shift:
        Optics (kV, mm, fraction, degrees); ``rlnPhaseShift`` is written when not 0.
    seed:
        Seed of every random draw; the same seed gives identical files.
    batch_size:
        Images rendered at once (memory ~ ``batch_size * box^2`` complex numbers).
    half_maps:
        Reconstruct ``half1.mrc``/``half2.mrc`` from the particles.
    """

    num_particles: int = 2000
    box: int = 64
    pixel_size: float = 2.5
    junk_fraction: float = 0.1
    snr: float = 0.05
    bfactor_min: float = 0.0
    bfactor_max: float = 300.0
    defocus_min: float = 5000.0
    defocus_max: float = 15000.0
    astigmatism: float = 500.0
    max_origin: float = 4.0
    voltage: float = 300.0
    spherical_aberration: float = 2.7
    amplitude_contrast: float = 0.1
    phase_shift: float = 0.0
    seed: int = 0
    batch_size: int = 256
    half_maps: bool = True

    def check(self) -> None:
        """Raise :class:`CryoSieveInputError` naming the first bad setting."""
        def bad(name: str, value: object, why: str) -> CryoSieveInputError:
            return CryoSieveInputError(f"{setting(name)} {value}: {why}")

        # the settings' names as users give them (cryosieve-simulate's flags)
        for name, value in (("angpix", self.pixel_size), ("snr", self.snr), ("bfactor_min", self.bfactor_min),
                            ("bfactor_max", self.bfactor_max), ("defocus_min", self.defocus_min),
                            ("defocus_max", self.defocus_max), ("astigmatism", self.astigmatism),
                            ("max_origin", self.max_origin), ("voltage", self.voltage),
                            ("cs", self.spherical_aberration), ("amplitude_contrast", self.amplitude_contrast),
                            ("phase_shift", self.phase_shift), ("junk_fraction", self.junk_fraction)):
            if math.isnan(value) or (math.isinf(value) and name != "snr"):
                raise bad(name, value, "must be a finite number")

        if self.num_particles < 1:
            raise bad("num_particles", self.num_particles, "must be at least 1")
        if self.half_maps and self.num_particles < 2:
            raise bad("num_particles", self.num_particles,
                      f"half maps need at least 2 particles (or {setting('half_maps')})")
        if self.box < 16 or self.box % 2:
            raise bad("box", self.box, "must be even and at least 16")
        if not (self.pixel_size > 0 and math.isfinite(self.pixel_size)):
            raise bad("angpix", self.pixel_size, "must be positive")
        if not 0 <= self.junk_fraction < 1:
            raise bad("junk_fraction", self.junk_fraction, "must be in [0, 1)")
        if not self.snr > 0:
            raise bad("snr", self.snr, "must be positive (inf: no noise)")
        if not 0 <= self.bfactor_min <= self.bfactor_max < math.inf:
            raise bad("bfactor_min", self.bfactor_min, f"need 0 <= bfactor_min <= bfactor_max ({self.bfactor_max})")
        if not 0 < self.defocus_min <= self.defocus_max < math.inf:
            raise bad("defocus_min", self.defocus_min, f"need 0 < defocus_min <= defocus_max ({self.defocus_max})")
        if not 0 <= self.astigmatism < self.defocus_min:
            raise bad("astigmatism", self.astigmatism, "must be in [0, defocus_min)")
        if not 0 <= self.max_origin < self.box * self.pixel_size / 4:
            raise bad("max_origin", self.max_origin, "must be in [0, box x angpix / 4)")
        if not self.voltage > 0:
            raise bad("voltage", self.voltage, "must be positive")
        if not self.spherical_aberration >= 0:
            raise bad("cs", self.spherical_aberration, "must be non-negative")
        if not 0 <= self.amplitude_contrast < 1:
            raise bad("amplitude_contrast", self.amplitude_contrast, "must be in [0, 1)")
        if not math.isfinite(self.phase_shift):
            raise bad("phase_shift", self.phase_shift, "must be finite")
        if self.batch_size < 1:
            raise bad("batch_size", self.batch_size, "must be at least 1")

    @property
    def junk_count(self) -> int:
        """How many particles are junk: ``round(junk_fraction * num_particles)``."""
        return round(self.junk_fraction * self.num_particles)


@dataclass
class ParticleParameters:
    """Drawn per-particle values, ``(n,)`` arrays: float64 rounded to 6 decimals unless stated.

    The STAR file and ``truth.csv`` hold these values exactly.
    """

    rot: np.ndarray  # degrees
    tilt: np.ndarray
    psi: np.ndarray
    origin_x: np.ndarray  # Å (rlnOriginXAngst)
    origin_y: np.ndarray  # Å
    defocus_u: np.ndarray  # Å
    defocus_v: np.ndarray  # Å
    defocus_angle: np.ndarray  # degrees
    bfactor: np.ndarray  # Å^2, truth only
    is_junk: np.ndarray  # bool
    random_subset: np.ndarray  # int64, 1 or 2

    def __len__(self) -> int:
        return len(self.rot)


def draw_parameters(settings: SimulationSettings, generator: np.random.Generator) -> ParticleParameters:
    """Random poses, origins, CTFs, B-factors, junk flags and half-sets for every particle.

    Poses are uniform on SO(3); values are rounded to 6 decimals, so that the STAR file
    holds them in short text, exactly: it reproduces the images. Draws come from
    ``generator`` in a fixed order (the same seed gives the same particles).
    """
    count = settings.num_particles
    is_junk = np.zeros(count, dtype=bool)
    is_junk[generator.choice(count, settings.junk_count, replace=False)] = True
    rot, tilt, psi = uniform_random_euler(count, generator)
    origin_x = generator.uniform(-settings.max_origin, settings.max_origin, count)
    origin_y = generator.uniform(-settings.max_origin, settings.max_origin, count)
    defocus_u = generator.uniform(settings.defocus_min, settings.defocus_max, count)
    defocus_v = defocus_u - generator.uniform(0.0, settings.astigmatism, count)
    defocus_angle = generator.uniform(0.0, 180.0, count)
    bfactor = generator.uniform(settings.bfactor_min, settings.bfactor_max, count)
    random_subset = generator.permutation(np.arange(count) % 2 + 1).astype(np.int64)

    def rounded(values: np.ndarray) -> np.ndarray:
        return np.round(values, 6)

    return ParticleParameters(
        rot=rounded(rot), tilt=rounded(tilt), psi=rounded(psi), origin_x=rounded(origin_x),
        origin_y=rounded(origin_y), defocus_u=rounded(defocus_u), defocus_v=rounded(defocus_v),
        defocus_angle=rounded(defocus_angle), bfactor=rounded(bfactor), is_junk=is_junk,
        random_subset=random_subset,
    )
