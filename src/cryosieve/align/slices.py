"""The reference's side of a local search: its central slices at chosen samples of a band.

The slices of a :class:`~cryosieve.projection.FourierSliceProjector` (the padded, Friedel-folded transform
of the weighted reference), sampled by trilinear interpolation: by the numba kernel of
:mod:`cryosieve.align._kernels` on the CPU (the projector's own tensor sampling gathers each neighbour
into a temporary, about 1 us per sample on 2 cores at box 64), by the projector's sampling elsewhere.
"""

from __future__ import annotations

import numpy as np
import torch

from cryosieve.align import _kernels
from cryosieve.projection import FourierSliceProjector


def slices(projector: FourierSliceProjector, rotations: np.ndarray, ky: np.ndarray, kx: np.ndarray) -> torch.Tensor:
    """The slices of ``rotations`` ``(b, 3, 3)`` (RELION matrices) at the frequencies ``ky``, ``kx`` ``(p,)``
    (cycles per box, ``|k| < n / 2``): ``(b, p)`` complex64 on the projector's device."""
    rotations = np.ascontiguousarray(rotations, dtype=np.float64).reshape(-1, 3, 3)
    if projector.device.type == "cpu" and _kernels.AVAILABLE and projector.grid.dtype == torch.complex64:
        real = np.empty((len(rotations), len(ky)), dtype=np.float32)
        imag = np.empty_like(real)
        _kernels.project_kernel(projector.grid.reshape(projector.shape).numpy(), projector.padded_size // 2,
                                float(projector.pad_factor), rotations, np.asarray(ky, dtype=np.float32),
                                np.asarray(kx, dtype=np.float32), real, imag)
        return torch.complex(torch.from_numpy(real), torch.from_numpy(imag))
    return projector.sample(torch.from_numpy(rotations), torch.from_numpy(np.asarray(ky, dtype=np.float32)),
                            torch.from_numpy(np.asarray(kx, dtype=np.float32)))
