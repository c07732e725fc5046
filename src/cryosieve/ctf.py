"""RELION's contrast transfer function: the one CTF of the package.

``CTF(k) = scale * exp(-B |k|^2 / 4) * -sin(chi(k))`` with
``chi = -pi lambda dz(k) |k|^2 + pi/2 Cs lambda^3 |k|^4 - phase_shift - atan(Q0 / sqrt(1 - Q0^2))``
and ``dz(k) = (dU + dV)/2 + (dU - dV)/2 cos(2 (angle(k) - defocus_angle))``, exactly
RELION's ``CTF::getCTF`` (defocus positive for underfocus; the CTF is +Q0 at zero
frequency, so particles are bright on a dark background). ``B`` is ``rlnCtfBfactor`` (Å^2,
0 when absent) and ``scale`` is ``rlnCtfScalefactor`` (1 when absent): RELION applies both
when it projects (``relion_project --ctf``), reconstructs and refines, and so does every
consumer here, scoring included, so a particle has one CTF everywhere.

Where to change the CTF model: :class:`CtfParameters` turns the per-particle values into
the terms every evaluator uses (:meth:`CtfParameters.from_values`), :meth:`CtfParameters.evaluate`
evaluates them on arrays or tensors (the torch scoring and reconstruction paths, the
simulator) and :func:`ctf_value` is the same formula for one sample inside the numba kernels
(scoring and reconstruction on the CPU), which take the terms packed by :meth:`CtfParameters.kernel_terms`
and read them through :func:`particle_terms`: a new term changes this module, the readers and the tests.
The published CryoSieve's own CTF (its wavelength formula and its Nyquist-row convention) is a named
variant in :mod:`cryosieve.scoring.published`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from cryosieve._fastmath import AVAILABLE as _NUMBA

if TYPE_CHECKING:
    import torch

Array = TypeVar("Array", np.ndarray, "torch.Tensor")


def electron_wavelength(voltage_kv: Array) -> Array:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV (tensor or array)."""
    volts = voltage_kv * 1000.0
    return 12.2643247 / (volts * (1.0 + volts * 0.978466e-6)) ** 0.5


@dataclass(frozen=True)
class CtfParameters:
    """The CTF terms of ``b`` particles, each a ``(b,)`` float64 array.

    Attributes
    ----------
    defocus_average, defocus_deviation:
        ``(dU + dV) / 2`` and ``(dU - dV) / 2``, Å.
    cos_angle2, sin_angle2:
        ``cos`` and ``sin`` of twice the astigmatism angle.
    k1:
        ``pi lambda``, Å.
    k2:
        ``pi / 2 Cs lambda^3``, Å^4.
    phase_constant:
        ``phase_shift + atan(Q0 / sqrt(1 - Q0^2))``, radians.
    envelope:
        ``B / 4``, Å^2.
    scale:
        The CTF's scale factor.
    """

    defocus_average: np.ndarray
    defocus_deviation: np.ndarray
    cos_angle2: np.ndarray
    sin_angle2: np.ndarray
    k1: np.ndarray
    k2: np.ndarray
    phase_constant: np.ndarray
    envelope: np.ndarray
    scale: np.ndarray

    @classmethod
    def from_values(cls, defocus_u: Any, defocus_v: Any, defocus_angle: Any, voltage: Any, spherical_aberration: Any,
                    amplitude_contrast: Any, phase_shift: Any, bfactor: Any = None, scale: Any = None
                    ) -> CtfParameters:
        """From RELION's values: defocus U, V (Å), astigmatism angle (degrees), voltage (kV),
        Cs (mm), amplitude contrast (fraction), phase shift (degrees), ``rlnCtfBfactor`` (Å^2,
        ``None``: 0) and ``rlnCtfScalefactor`` (``None``: 1). Each ``(b,)`` (arrays or tensors)."""

        def array(values: Any) -> np.ndarray:
            if hasattr(values, "detach"):
                values = values.detach().cpu().numpy()
            return np.atleast_1d(np.asarray(values, dtype=np.float64))

        defocus_u, defocus_v = array(defocus_u), array(defocus_v)
        angle2 = 2 * np.deg2rad(array(defocus_angle))
        wavelength = electron_wavelength(array(voltage))
        q0 = array(amplitude_contrast)
        count = len(defocus_u)
        return cls(
            defocus_average=(defocus_u + defocus_v) / 2, defocus_deviation=(defocus_u - defocus_v) / 2,
            cos_angle2=np.cos(angle2), sin_angle2=np.sin(angle2),
            k1=math.pi * wavelength, k2=0.5 * math.pi * array(spherical_aberration) * 1e7 * wavelength ** 3,
            phase_constant=np.deg2rad(array(phase_shift)) + np.arctan(q0 / np.sqrt(1 - q0 * q0)),
            envelope=np.zeros(count) if bfactor is None else array(bfactor) / 4,
            scale=np.ones(count) if scale is None else array(scale),
        )

    @classmethod
    def from_table(cls, table: Any, rows: Any) -> CtfParameters:
        """Of the particles ``rows`` of a :class:`~cryosieve.particles.ParticleSet`."""
        return cls.from_values(table.defocus_u[rows], table.defocus_v[rows], table.defocus_angle[rows],
                               table.voltage[rows], table.spherical_aberration[rows],
                               table.amplitude_contrast[rows], table.phase_shift[rows],
                               table.ctf_bfactor[rows], table.ctf_scalefactor[rows])

    def __len__(self) -> int:
        return len(self.defocus_average)

    def subset(self, rows: Any) -> CtfParameters:
        """The parameters of some particles."""
        return CtfParameters(**{field.name: getattr(self, field.name)[rows] for field in fields(self)})

    def kernel_terms(self, box: int, pixel_size: np.ndarray) -> np.ndarray:
        """The terms of :meth:`in_cycles_per_box` as the numba kernels take them: ``(b, T)`` float64,
        C-contiguous, one row per particle, columns in the order of :data:`KERNEL_TERMS`; a kernel hands
        row ``i`` to :func:`particle_terms` and the result to :func:`ctf_value`, so a new term changes
        this module only. ``pixel_size``: ``(b,)`` Å."""
        terms = self.in_cycles_per_box(box, pixel_size)
        return np.ascontiguousarray(np.stack([np.broadcast_to(np.asarray(terms[name], dtype=np.float64), (len(self),))
                                              for name in KERNEL_TERMS], axis=1))

    def in_cycles_per_box(self, box: int, pixel_size: np.ndarray) -> dict[str, np.ndarray]:
        """The terms for frequencies in cycles per box (``u = |k| box pixel_size``), as the numba
        kernels take them: :func:`ctf_value`'s per-particle arguments, each ``(b,)`` float64.

        ``pixel_size``: ``(b,)`` Å.
        """
        inverse2 = 1.0 / (box * np.asarray(pixel_size, dtype=np.float64)) ** 2
        return {
            "defocus_average": self.defocus_average, "deviation_cos": self.defocus_deviation * self.cos_angle2,
            "deviation_sin": self.defocus_deviation * self.sin_angle2, "k1": self.k1 * inverse2,
            "k2": self.k2 * inverse2 * inverse2, "phase_constant": self.phase_constant,
            "envelope": self.envelope * inverse2, "scale": self.scale,
        }

    def evaluate(self, frequency_x: Any, frequency_y: Any) -> Any:
        """The CTF of each particle at ``(p,)`` or ``(b, p)`` spatial frequencies (1/Å, x along image
        columns): ``(b, p)``, a tensor of ``frequency_x``'s dtype and device for tensors, else float64."""
        if hasattr(frequency_x, "detach"):
            import torch

            backend: Any = torch

            host = np.float32 if frequency_x.dtype == torch.float32 else np.float64

            def column(values: np.ndarray) -> Any:
                # cast on the host: a device without float64 (mps) never sees a float64 value
                array = np.ascontiguousarray(values, dtype=host)
                return torch.from_numpy(array).to(device=frequency_x.device, dtype=frequency_x.dtype)[:, None]
        else:
            backend = np
            frequency_x, frequency_y = np.asarray(frequency_x, np.float64), np.asarray(frequency_y, np.float64)

            def column(values: np.ndarray) -> Any:
                return values[:, None]

        u2 = frequency_x * frequency_x + frequency_y * frequency_y
        safe = backend.where(u2 > 0, u2, 1.0)
        cos2 = backend.where(u2 > 0, (frequency_x * frequency_x - frequency_y * frequency_y) / safe, 1.0)
        sin2 = backend.where(u2 > 0, 2 * frequency_x * frequency_y / safe, 0.0)
        defocus = (column(self.defocus_average) + column(self.defocus_deviation * self.cos_angle2) * cos2
                   + column(self.defocus_deviation * self.sin_angle2) * sin2)
        chi = -column(self.k1) * defocus * u2 + column(self.k2) * u2 * u2 - column(self.phase_constant)
        return -column(self.scale) * backend.exp(-column(self.envelope) * u2) * backend.sin(chi)


def ctf_2d(frequency_x: torch.Tensor, frequency_y: torch.Tensor, defocus_u: torch.Tensor, defocus_v: torch.Tensor,
           defocus_angle: torch.Tensor, voltage: torch.Tensor, spherical_aberration: torch.Tensor,
           amplitude_contrast: torch.Tensor, phase_shift: torch.Tensor, bfactor: torch.Tensor | None = None,
           scale: torch.Tensor | None = None) -> torch.Tensor:
    """The CTF of ``b`` particles at ``(p,)`` or ``(b, p)`` frequencies (1/Å): ``(b, p)`` of
    ``frequency_x``'s dtype. Values as :meth:`CtfParameters.from_values` takes them."""
    parameters = CtfParameters.from_values(defocus_u, defocus_v, defocus_angle, voltage, spherical_aberration,
                                           amplitude_contrast, phase_shift, bfactor, scale)
    result: torch.Tensor = parameters.evaluate(frequency_x, frequency_y)
    return result


#: The columns of :meth:`CtfParameters.kernel_terms`, in order (the names of :meth:`CtfParameters.in_cycles_per_box`).
KERNEL_TERMS = ("defocus_average", "deviation_cos", "deviation_sin", "k1", "k2", "phase_constant", "envelope", "scale")

if _NUMBA:
    import numba

    from cryosieve._fastmath import fast_exp_neg, fast_sin

    @numba.njit(inline="always", cache=True)
    def particle_terms(terms, i):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
        """Particle ``i``'s CTF terms (row ``i`` of :meth:`CtfParameters.kernel_terms`) as a tuple of
        scalars, read once per particle by a kernel and handed to :func:`ctf_value` for each sample."""
        return (terms[i, 0], terms[i, 1], terms[i, 2], terms[i, 3], terms[i, 4], terms[i, 5], terms[i, 6],
                terms[i, 7])

    @numba.njit(inline="always", cache=True)
    def ctf_value(u2, cos2, sin2, particle):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
        """The CTF at one sample for the numba kernels: ``u2`` = |k|^2 (cycles per box squared),
        ``cos2``, ``sin2`` of twice the sample's angle, ``particle`` one particle's terms
        (:func:`particle_terms`). The sine and exponential are the vectorisable ones of
        :mod:`cryosieve._fastmath`."""
        defocus_average, deviation_cos, deviation_sin, k1, k2, phase_constant, envelope, scale = particle
        defocus = defocus_average + deviation_cos * cos2 + deviation_sin * sin2
        value = -scale * fast_sin(-k1 * defocus * u2 + k2 * u2 * u2 - phase_constant)
        if envelope != 0.0:
            value = value * fast_exp_neg(envelope * u2)
        return value
