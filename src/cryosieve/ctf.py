"""RELION's contrast transfer function, evaluated at arbitrary 2D frequencies.

``CTF(k) = scale * exp(-B |k|^2 / 4) * -sin(chi(k))`` with
``chi = -pi lambda dz(k) |k|^2 + pi/2 Cs lambda^3 |k|^4 - phase_shift - atan(Q0 / sqrt(1 - Q0^2))``
and ``dz(k) = (dU + dV)/2 + (dU - dV)/2 cos(2 (angle(k) - defocus_angle))``, exactly
RELION's ``CTF::getCTF`` (defocus positive for underfocus; the CTF is +Q0 at zero
frequency, so particles are bright on a dark background).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:
    import torch

Array = TypeVar("Array", np.ndarray, "torch.Tensor")


def electron_wavelength(voltage_kv: Array) -> Array:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV (tensor or array)."""
    volts = voltage_kv * 1000.0
    return 12.2643247 / (volts * (1.0 + volts * 0.978466e-6)) ** 0.5


def ctf_2d(
    frequency_x: torch.Tensor,
    frequency_y: torch.Tensor,
    defocus_u: torch.Tensor,
    defocus_v: torch.Tensor,
    defocus_angle: torch.Tensor,
    voltage: torch.Tensor,
    spherical_aberration: torch.Tensor,
    amplitude_contrast: torch.Tensor,
    phase_shift: torch.Tensor,
    bfactor: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Evaluate the CTF of ``b`` particles at ``p`` frequencies.

    Parameters
    ----------
    frequency_x, frequency_y:
        ``(p,)`` or ``(b, p)`` spatial frequencies in 1/Å (x along image columns).
    defocus_u, defocus_v:
        ``(b,)`` defocus in Å (positive: underfocus).
    defocus_angle:
        ``(b,)`` astigmatism angle in degrees.
    voltage:
        ``(b,)`` kV.
    spherical_aberration:
        ``(b,)`` mm.
    amplitude_contrast:
        ``(b,)`` fraction in [0, 1).
    phase_shift:
        ``(b,)`` degrees.
    bfactor, scale:
        Optional ``(b,)`` envelope B-factor in Å^2 and scale factor.

    Returns
    -------
    ``(b, p)`` real CTF values, dtype of ``frequency_x``.
    """
    import torch

    dtype = frequency_x.dtype

    def column(value: torch.Tensor) -> torch.Tensor:
        return value.to(dtype=dtype, device=frequency_x.device)[:, None]

    wavelength = electron_wavelength(column(voltage))
    cs_angstrom = column(spherical_aberration) * 1e7
    u2 = frequency_x * frequency_x + frequency_y * frequency_y
    angle = torch.atan2(frequency_y, frequency_x)
    average = (column(defocus_u) + column(defocus_v)) / 2
    deviation = (column(defocus_u) - column(defocus_v)) / 2
    defocus = average + deviation * torch.cos(2 * (angle - torch.deg2rad(column(defocus_angle))))
    q0 = column(amplitude_contrast)
    chi = (
        -math.pi * wavelength * defocus * u2
        + (math.pi / 2) * cs_angstrom * wavelength**3 * u2 * u2
        - torch.deg2rad(column(phase_shift))
        - torch.atan(q0 / torch.sqrt(1 - q0 * q0))
    )
    ctf = -torch.sin(chi)
    if bfactor is not None:
        ctf = ctf * torch.exp(-column(bfactor) * u2 / 4)
    if scale is not None:
        ctf = ctf * column(scale)
    return ctf
