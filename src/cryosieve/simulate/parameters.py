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

    Realistic defects (all off by default; :meth:`realistic` turns them on):

    empty_fraction:
        Fraction of "particles" that hold no particle: a blob or a carbon edge (half each),
        CTF-modulated, at the particles' signal variance; their STAR rows look like any other.
    misaligned_fraction, misalignment_min, misalignment_max:
        Fraction of the main model's particles whose STAR pose is the true one turned by an
        angle uniform in ``[misalignment_min, misalignment_max]`` degrees about a random axis.
    wrong_origin_fraction, origin_error:
        Fraction of the main model's particles (not misaligned) whose STAR origin is off by a
        distance uniform in ``[origin_error / 2, origin_error]`` Å in a random direction.
    contrast_spread:
        Per-particle amplitude scale ``exp(N(0, contrast_spread))`` (ice thickness), truth only.
    noise_bfactor, noise_floor:
        Coloured noise: power ``floor + (1 - floor) exp(-noise_bfactor s^2 / 4)`` (normalised to
        the variance the SNR asks), ``noise_bfactor`` in Å^2 (0: white noise).
    micrographs, noise_spread:
        Particles are spread over ``micrographs`` micrographs (``rlnMicrographName``; 0: none),
        each with a noise level ``exp(N(0, noise_spread))`` times the nominal one.
    preferred_fraction, preferred_spread:
        Fraction of the particles whose viewing direction lies within ``preferred_spread`` degrees of
        the top view (tilt 0, uniform over that cap): a preferred orientation.
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
    empty_fraction: float = 0.0
    misaligned_fraction: float = 0.0
    misalignment_min: float = 5.0
    misalignment_max: float = 30.0
    wrong_origin_fraction: float = 0.0
    origin_error: float = 8.0
    contrast_spread: float = 0.0
    noise_bfactor: float = 0.0
    noise_floor: float = 0.2
    micrographs: int = 0
    noise_spread: float = 0.0
    preferred_fraction: float = 0.0
    preferred_spread: float = 15.0

    def realistic(self) -> SimulationSettings:
        """These settings with data-like defects: 5 % empty images, 10 % misaligned by 5-30 degrees,
        5 % with origins off by 4-8 Å, contrast spread 0.25, noise falling with frequency
        (``noise_bfactor`` 150 Å^2, floor 0.3) over 40 micrographs whose noise level spreads by 0.2."""
        from dataclasses import replace

        return replace(self, empty_fraction=0.05, misaligned_fraction=0.10, misalignment_min=5.0,
                       misalignment_max=30.0, wrong_origin_fraction=0.05, origin_error=8.0, contrast_spread=0.25,
                       noise_bfactor=150.0, noise_floor=0.3, micrographs=40, noise_spread=0.2)

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
                            ("phase_shift", self.phase_shift), ("junk_fraction", self.junk_fraction),
                            ("empty_fraction", self.empty_fraction), ("misaligned_fraction", self.misaligned_fraction),
                            ("misalignment_min", self.misalignment_min), ("misalignment_max", self.misalignment_max),
                            ("wrong_origin_fraction", self.wrong_origin_fraction), ("origin_error", self.origin_error),
                            ("contrast_spread", self.contrast_spread), ("noise_bfactor", self.noise_bfactor),
                            ("noise_floor", self.noise_floor), ("noise_spread", self.noise_spread),
                            ("preferred_fraction", self.preferred_fraction),
                            ("preferred_spread", self.preferred_spread)):
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
        if not 0 <= self.empty_fraction < 1 or self.junk_fraction + self.empty_fraction >= 1:
            raise bad("empty_fraction", self.empty_fraction, "must be in [0, 1 - junk_fraction)")
        if not 0 <= self.misaligned_fraction + self.wrong_origin_fraction <= 1 or self.misaligned_fraction < 0 \
                or self.wrong_origin_fraction < 0:
            raise bad("misaligned_fraction", self.misaligned_fraction,
                      "misaligned_fraction and wrong_origin_fraction must be in [0, 1] with a sum of at most 1")
        if not 0 <= self.misalignment_min <= self.misalignment_max <= 180:
            raise bad("misalignment_min", self.misalignment_min,
                      f"need 0 <= misalignment_min <= misalignment_max ({self.misalignment_max}) <= 180")
        if not self.origin_error >= 0:
            raise bad("origin_error", self.origin_error, "must be non-negative")
        for name, value in (("contrast_spread", self.contrast_spread), ("noise_bfactor", self.noise_bfactor),
                            ("noise_spread", self.noise_spread)):
            if value < 0:
                raise bad(name, value, "must be non-negative")
        if not 0 < self.noise_floor <= 1:
            raise bad("noise_floor", self.noise_floor, "must be in (0, 1]")
        if self.micrographs < 0:
            raise bad("micrographs", self.micrographs, "must be 0 (none) or more")
        if not 0 <= self.preferred_fraction <= 1:
            raise bad("preferred_fraction", self.preferred_fraction, "must be in [0, 1]")
        if not 0 < self.preferred_spread <= 180:
            raise bad("preferred_spread", self.preferred_spread, "must be in (0, 180] degrees")

    @property
    def junk_count(self) -> int:
        """How many particles are junk: ``round(junk_fraction * num_particles)``."""
        return round(self.junk_fraction * self.num_particles)

    @property
    def empty_count(self) -> int:
        """How many images are empty: ``round(empty_fraction * num_particles)``."""
        return round(self.empty_fraction * self.num_particles)

    @property
    def defects(self) -> bool:
        """Whether any realistic defect is on (off: the particles drawn are exactly those of earlier versions)."""
        return bool(self.empty_fraction or self.misaligned_fraction or self.wrong_origin_fraction
                    or self.contrast_spread or self.noise_bfactor or self.micrographs or self.noise_spread
                    or self.preferred_fraction)


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
    # realistic defects (None: none); the pose and origin fields above are the truth, these what the STAR says
    is_empty: np.ndarray | None = None  # bool
    empty_kind: np.ndarray | None = None  # int64: 0 not empty, 1 blob, 2 carbon edge
    star_rot: np.ndarray | None = None
    star_tilt: np.ndarray | None = None
    star_psi: np.ndarray | None = None
    star_origin_x: np.ndarray | None = None  # Å
    star_origin_y: np.ndarray | None = None
    pose_error: np.ndarray | None = None  # degrees, angle between true and STAR rotations
    origin_error: np.ndarray | None = None  # Å
    contrast: np.ndarray | None = None  # amplitude scale, truth only
    micrograph: np.ndarray | None = None  # int64, 1-based
    noise_scale: np.ndarray | None = None  # the particle's noise level / the nominal one

    def __len__(self) -> int:
        return len(self.rot)

    def reported(self, name: str) -> np.ndarray:
        """What the STAR file says of ``rot``, ``tilt``, ``psi``, ``origin_x`` or ``origin_y``."""
        value = getattr(self, f"star_{name}")
        result: np.ndarray = getattr(self, name) if value is None else value
        return result

    def kinds(self) -> np.ndarray:
        """Each particle's kind, ``(n,)`` str: good, junk, empty, misaligned or wrong_origin."""
        kind = np.full(len(self), "good", dtype=object)
        if self.pose_error is not None:
            kind[self.pose_error > 0] = "misaligned"
        if self.origin_error is not None:
            kind[self.origin_error > 0] = "wrong_origin"
        kind[self.is_junk] = "junk"
        if self.is_empty is not None:
            kind[self.is_empty] = "empty"
        return kind


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

    parameters = ParticleParameters(
        rot=rounded(rot), tilt=rounded(tilt), psi=rounded(psi), origin_x=rounded(origin_x),
        origin_y=rounded(origin_y), defocus_u=rounded(defocus_u), defocus_v=rounded(defocus_v),
        defocus_angle=rounded(defocus_angle), bfactor=rounded(bfactor), is_junk=is_junk,
        random_subset=random_subset,
    )
    if settings.defects:  # drawn after everything above: without defects, the same particles as before
        _draw_defects(parameters, settings, generator)
    return parameters


def _draw_defects(parameters: ParticleParameters, settings: SimulationSettings, generator: np.random.Generator
                  ) -> None:
    """Empty images, misaligned particles, wrong origins, contrast and micrographs (see :class:`SimulationSettings`)."""
    from scipy.spatial.transform import Rotation

    from cryosieve.geometry import euler_to_matrix, matrix_to_euler

    count = len(parameters)
    preferred = generator.choice(count, round(settings.preferred_fraction * count), replace=False)
    cap = np.cos(np.radians(settings.preferred_spread))
    parameters.tilt[preferred] = np.round(np.degrees(np.arccos(generator.uniform(cap, 1.0, len(preferred)))), 6)
    others = np.flatnonzero(~parameters.is_junk)
    is_empty = np.zeros(count, dtype=bool)
    is_empty[generator.choice(others, settings.empty_count, replace=False)] = True
    empty_kind = np.where(is_empty, 1 + (generator.uniform(size=count) < 0.5), 0).astype(np.int64)
    good = np.flatnonzero(~parameters.is_junk & ~is_empty)
    order = generator.permutation(good)
    misaligned = order[:round(settings.misaligned_fraction * len(good))]
    shifted = order[len(misaligned):len(misaligned) + round(settings.wrong_origin_fraction * len(good))]
    angle = np.zeros(count)
    angle[misaligned] = generator.uniform(settings.misalignment_min, settings.misalignment_max, len(misaligned))
    axis = generator.normal(size=(count, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    truth = euler_to_matrix(parameters.rot, parameters.tilt, parameters.psi)
    turn = Rotation.from_rotvec(axis * np.radians(angle)[:, None]).as_matrix()
    rot, tilt, psi = matrix_to_euler(turn @ truth)
    star = {name: np.where(angle > 0, np.round(value, 6), getattr(parameters, name))
            for name, value in (("rot", rot), ("tilt", tilt), ("psi", psi))}
    reported = euler_to_matrix(star["rot"], star["tilt"], star["psi"])
    cosine = np.clip((np.einsum("nij,nij->n", reported, truth) - 1) / 2, -1.0, 1.0)
    distance = np.zeros(count)
    distance[shifted] = generator.uniform(settings.origin_error / 2, settings.origin_error, len(shifted))
    direction = generator.uniform(0, 2 * np.pi, count)
    star_x = np.round(parameters.origin_x + distance * np.cos(direction), 6)
    star_y = np.round(parameters.origin_y + distance * np.sin(direction), 6)
    contrast = np.exp(generator.normal(0.0, settings.contrast_spread, count)) if settings.contrast_spread \
        else np.ones(count)
    micrographs = max(settings.micrographs, 1)
    micrograph = np.sort(generator.integers(1, micrographs + 1, count)).astype(np.int64)
    level = np.exp(generator.normal(0.0, settings.noise_spread, micrographs)) if settings.noise_spread \
        else np.ones(micrographs)
    parameters.is_empty, parameters.empty_kind = is_empty, empty_kind
    parameters.star_rot, parameters.star_tilt, parameters.star_psi = star["rot"], star["tilt"], star["psi"]
    parameters.star_origin_x, parameters.star_origin_y = star_x, star_y
    parameters.pose_error = np.round(np.where(angle > 0, np.degrees(np.arccos(cosine)), 0.0), 6)
    parameters.origin_error = np.round(np.hypot(star_x - parameters.origin_x, star_y - parameters.origin_y), 6)
    parameters.contrast = np.round(contrast, 6)
    parameters.micrograph = micrograph if settings.micrographs else None
    parameters.noise_scale = np.round(level[micrograph - 1], 6)
