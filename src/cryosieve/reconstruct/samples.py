"""Which samples of each particle image are inserted into the grid.

An image of ``n`` pixels contributes the half-plane samples of its ``rfft2`` with
``|k| < n / 2`` (:class:`SliceSamples`), each multiplied by the particle's origin phase
(:func:`cryosieve.fourier.origin_phases`: the transform is taken about pixel ``n // 2`` and
moved by the particle's origin) and by its CTF (:class:`cryosieve.ctf.CtfParameters`), both
of a :class:`~cryosieve.batch.ParticleBatch`. Where these samples land in the Fourier grid is
defined in :mod:`cryosieve.reconstruct.grid`.

Numpy only: both engines (:mod:`.cpu`, :mod:`.tensor_path`) start from these arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cryosieve.fourier import image_frequencies


@dataclass(frozen=True)
class SliceSamples:
    """The half-plane samples of a ``box``-pixel image that are inserted.

    Samples of the ``rfft2`` grid with ``|k| < box / 2`` and (``kx > 0`` or ``ky >= 0``),
    so that each Friedel pair of the full image transform appears exactly once.

    Attributes
    ----------
    box:
        Image size ``n`` (pixels).
    flat_index:
        ``(p,)`` int64 indices into a flattened ``(box, box // 2 + 1)`` ``rfft2`` array.
    row, column:
        ``(p,)`` int64: the same as ``(row, column)`` of that array.
    frequency_y, frequency_x:
        ``(p,)`` float64 frequencies in cycles per box.
    multiplicity:
        ``(p,)`` float64: 1, except 0.5 for the zero frequency (its own Friedel mate,
        counted twice when the ``x = 0`` plane is made Hermitian).
    """

    box: int
    flat_index: np.ndarray
    row: np.ndarray
    column: np.ndarray
    frequency_y: np.ndarray
    frequency_x: np.ndarray
    multiplicity: np.ndarray

    @classmethod
    def for_box(cls, box: int) -> SliceSamples:
        grid_y, grid_x = (values.reshape(-1) for values in image_frequencies(box))
        keep = (grid_x * grid_x + grid_y * grid_y < (box / 2) ** 2) & ((grid_x > 0) | (grid_y >= 0))
        flat_index = np.flatnonzero(keep).astype(np.int64)
        multiplicity = np.ones(flat_index.size, dtype=np.float64)
        multiplicity[(grid_x[flat_index] == 0) & (grid_y[flat_index] == 0)] = 0.5
        width = box // 2 + 1
        return cls(box=box, flat_index=flat_index, row=flat_index // width, column=flat_index % width,
                   frequency_y=grid_y[flat_index].copy(), frequency_x=grid_x[flat_index].copy(),
                   multiplicity=multiplicity)

    @property
    def size(self) -> int:
        """The number of samples ``p``."""
        return int(self.flat_index.size)
