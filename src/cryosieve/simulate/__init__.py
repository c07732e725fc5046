"""Known-truth particle data sets: maps from atomic models, simulated particle stacks.

The simulator writes a RELION 3.1 particle STAR file, one MRC stack of particle images,
the maps they were made from and the hidden truth of every particle. Its conventions,
stated here once for every module of this package:

Units
    Lengths in Å (pixel and voxel sizes, origins ``rlnOriginX/YAngst``, defocus), spatial
    frequencies ``s`` in 1/Å, B-factors in Å^2, angles in degrees (Euler angles ZYZ as
    RELION's ``rot``, ``tilt``, ``psi``; astigmatism angle; phase shift), voltage in kV,
    spherical aberration in mm, amplitude contrast as a fraction.

Grids
    Maps are ``(N, N, N)`` float32 arrays indexed ``[z, y, x]``, images ``(N, N)`` float32
    indexed ``[y, x]``. The centre of a map is voxel ``N // 2`` along each axis and the
    centre of an image pixel ``N // 2`` along each axis (where the model's centre of mass
    sits and where the projection of the map's centre falls). Frequencies ``k`` are in
    cycles per box, ``s = k / (N * pixel size)``.

Image formation
    For a particle with rotation ``A`` (from ``rot``, ``tilt``, ``psi``), origin
    ``(ox, oy)`` pixels (``rlnOriginX/YAngst`` / pixel size), CTF ``C`` and envelope
    B-factor ``B``::

        FT(I)(k) = C(k) exp(-B |s|^2 / 4) Vhat(A^T k) (-1)^(kx+ky) exp(+2 pi i (kx ox + ky oy) / N)

    for ``|k| < N/2`` (zero beyond), ``Vhat`` the 3D DFT of the map centred at voxel
    ``N // 2``. So the particle image is the CTF-modulated projection shifted by minus
    its origin, exactly what RELION's origin convention undoes (checked against
    ``relion_project --ctf``). ``C`` is RELION's CTF (:func:`cryosieve.ctf.ctf_2d`:
    defocus positive for underfocus, astigmatism angle from the x axis, +amplitude
    contrast at zero frequency, so particles are bright on a dark background).

Truth and noise
    Particle quality, the quantity a sieve must find, is the per-particle envelope
    B-factor; it is written to ``truth.csv`` only, never to the STAR file. A fraction of
    the particles ("junk") are projections of a second, different model whose STAR rows
    look like any other particle. White Gaussian noise is added at a chosen
    signal-to-noise ratio, defined as the variance of the noiseless images of the main
    model's particles (all pixels of the whole box, pooled over those particles) divided
    by the noise variance.

Modules: :mod:`~cryosieve.simulate.models` (maps of atomic models, bundled models; the mask is
:func:`cryosieve.mask.soft_mask`),
:mod:`~cryosieve.simulate.parameters`
(settings and per-particle draws), :mod:`~cryosieve.simulate.inputs` (bundled models, checks before any
work), :mod:`~cryosieve.simulate.images` (image formation and
noise), :mod:`~cryosieve.simulate.tables` (what the STAR file and ``truth.csv`` hold) and
:mod:`~cryosieve.simulate.dataset` (the whole data set, written through :mod:`cryosieve.io`).
"""

from typing import TYPE_CHECKING

from cryosieve._lazy import lazy_names

if TYPE_CHECKING:
    from cryosieve.mask import soft_mask
    from cryosieve.simulate.dataset import SimulationResult, reconstruct_half_maps, simulate_particles
    from cryosieve.simulate.images import ImageFormation, SignalStatistics, add_noise, noise_sigma
    from cryosieve.simulate.inputs import DEFAULT_JUNK_MODEL, DEFAULT_MODEL, bundled_model, check_inputs
    from cryosieve.simulate.models import (
        _read_model,  # noqa: F401  (the tests count the atoms of a model as read here)
        atomic_model_map,
    )
    from cryosieve.simulate.parameters import ParticleParameters, SimulationSettings, draw_parameters
    from cryosieve.simulate.tables import STACK_NAME, STAR_NAME, TRUTH_CSV_NAME, image_names

#: Where each name of the face lives (loaded on first use: the settings and their checks without torch).
_WHERE = {
    "soft_mask": "cryosieve.mask", "SimulationResult": "dataset", "check_inputs": "inputs",
    "reconstruct_half_maps": "dataset", "simulate_particles": "dataset", "ImageFormation": "images",
    "SignalStatistics": "images", "add_noise": "images", "noise_sigma": "images", "DEFAULT_JUNK_MODEL": "inputs",
    "DEFAULT_MODEL": "inputs", "_read_model": "models", "atomic_model_map": "models", "bundled_model": "inputs",
    "ParticleParameters": "parameters", "SimulationSettings": "parameters", "draw_parameters": "parameters",
    "STACK_NAME": "tables", "STAR_NAME": "tables", "TRUTH_CSV_NAME": "tables", "image_names": "tables",
}
__getattr__ = lazy_names(__name__, _WHERE)

__all__ = [
    "DEFAULT_JUNK_MODEL",
    "DEFAULT_MODEL",
    "STACK_NAME",
    "STAR_NAME",
    "TRUTH_CSV_NAME",
    "ImageFormation",
    "ParticleParameters",
    "SignalStatistics",
    "SimulationResult",
    "SimulationSettings",
    "add_noise",
    "atomic_model_map",
    "bundled_model",
    "check_inputs",
    "draw_parameters",
    "image_names",
    "noise_sigma",
    "reconstruct_half_maps",
    "simulate_particles",
    "soft_mask",
]
