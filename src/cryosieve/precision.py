"""Number formats of the tensor paths, decided per device in this one place.

The per-particle tensor code (scoring in :mod:`cryosieve.scoring.fourier`, insertion in
:mod:`cryosieve.reconstruct.tensor_path`) keeps images and their spectra in float32 /
complex64 ("data"), and works out the per-particle geometry (origin phases, CTF) and
the sums (scores, reconstruction grids) in float64, on any device that has float64
(the CPU, CUDA).

Apple's GPUs (``mps``) have no float64 at all: a float64 tensor cannot even be created
there. On such a device

* the geometry and the score sums are float32 (:func:`real_dtype`): a score is a sum of
  about ``N^2 / 2`` terms of one image (tree-summed, relative error about ``1e-6``);
* a reconstruction grid is a float32 sum over particles with Kahan compensation
  (:class:`GridSum`): each few thousand particles are added into a float32 grid of their
  own, which then joins the running total with its rounding error carried along, so the
  error does not grow with the number of particles;
* work on whole maps (building the projector's grid, finishing a reconstruction, FSC,
  post-processing) runs on the CPU in float64 (:func:`map_device`).

Values go from the host to such a device cast on the host first (:func:`to_device`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

#: Device types without float64 (Apple's Metal Performance Shaders).
FLOAT32_ONLY = frozenset({"mps"})

#: Particles added into a float32 grid of their own before it joins the compensated total
#: (:class:`GridSum`): the plain float32 sum of this many contributions to a voxel has a
#: relative error of at most about ``4096 * 6e-8 = 2.4e-4`` (typically ``64 * 6e-8``).
FLUSH_PARTICLES = 4096


def device_type(device: torch.device | str) -> str:
    """``"cuda"`` of ``"cuda:1"`` or of a ``torch.device``: the kind of a device (no torch import)."""
    return device.type if hasattr(device, "type") else str(device).split(":")[0]


def has_float64(device: torch.device | str) -> bool:
    """Whether tensors on ``device`` can be float64."""
    return device_type(device) not in FLOAT32_ONLY


def real_dtype(device: torch.device | str) -> torch.dtype:
    """The real dtype of per-particle geometry and sums on ``device``: float64, or float32 without float64."""
    import torch

    return torch.float64 if has_float64(device) else torch.float32


def complex_dtype(device: torch.device | str) -> torch.dtype:
    """The complex dtype matching :func:`real_dtype`: complex128 or complex64."""
    import torch

    return torch.complex128 if has_float64(device) else torch.complex64


def map_device(device: torch.device | str) -> torch.device:
    """Where whole-map work (projector set-up, finishing, FSC, post-processing) runs: ``device``
    itself, or the CPU for a device without float64."""
    import torch

    return torch.device(device) if has_float64(device) else torch.device("cpu")


def to_device(values: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``values`` as a tensor on ``device``: real floating values as :func:`real_dtype`, complex ones as
    :func:`complex_dtype`, others (integers, booleans) as they are. The cast is done on the host, before
    the transfer, so no float64 value ever reaches a device without float64."""
    import torch

    if isinstance(values, torch.Tensor):
        if values.is_floating_point():
            values = values.to(real_dtype(device))
        elif values.is_complex():
            values = values.to(complex_dtype(device))
        return values.to(device)
    array = np.asarray(values)
    if np.issubdtype(array.dtype, np.complexfloating):
        array = array.astype(np.complex128 if has_float64(device) else np.complex64, copy=False)
    elif np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float64 if has_float64(device) else np.float32, copy=False)
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


class GridSum:
    """A sum of reconstruction grids on one device, read back as float64.

    Where the device has float64 it is one float64 tensor (:attr:`target` itself). Without
    float64, :attr:`target` is a float32 grid that takes the insertions of up to
    :data:`FLUSH_PARTICLES` particles; it then joins a float32 total by Kahan's compensated
    summation (``y = target - c; t = total + y; c = (t - total) - y; total = t``), and
    :meth:`result` returns ``total - c`` in float64 on the CPU.

    ``shape``: the grid's shape (:func:`cryosieve.reconstruct.grid.grid_shape`).
    """

    def __init__(self, shape: tuple[int, ...], device: torch.device | str) -> None:
        import torch

        self.device = torch.device(device)
        self.compensated = not has_float64(self.device)
        self.target = torch.zeros(shape, dtype=real_dtype(self.device), device=self.device)
        self._pending = 0
        self._total: torch.Tensor | None = None
        self._carry: torch.Tensor | None = None
        if self.compensated:
            self._total = torch.zeros_like(self.target)
            self._carry = torch.zeros_like(self.target)

    def added(self, particles: int) -> None:
        """Record that ``particles`` were just inserted into :attr:`target`; flushes it into the
        compensated total once :data:`FLUSH_PARTICLES` have gathered."""
        self._pending += particles
        if self.compensated and self._pending >= FLUSH_PARTICLES:
            self._flush()

    def _flush(self) -> None:
        assert self._total is not None and self._carry is not None
        if self._pending == 0:
            return
        corrected = self.target - self._carry
        total = self._total + corrected
        self._carry = (total - self._total) - corrected
        self._total = total
        self.target.zero_()
        self._pending = 0

    def result(self, copy: bool = False) -> torch.Tensor:
        """The sum so far: the float64 tensor on the device (a copy with ``copy``, else the one
        accumulated into), or, compensated, a new float64 tensor on the CPU."""
        import torch

        if not self.compensated:
            return self.target.clone() if copy else self.target
        self._flush()
        assert self._total is not None and self._carry is not None
        return self._total.cpu().to(torch.float64) - self._carry.cpu().to(torch.float64)
