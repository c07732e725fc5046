"""What a scorer is, and the options of scoring.

A :class:`Scorer` computes the sieving score of particles against one reference (the masked,
optionally FSC-weighted half map of their half-set)::

    score = ||HP(CTF * P(V) - T(I))||^2 - ||HP(T(I))||^2

(real-space squared norms; ``P`` projects along the particle's pose, ``T`` shifts the image by its
origin, ``HP`` removes frequencies below the cut-off, :class:`cryosieve.band.HighPass`). It prepares
each reference once (:meth:`Scorer.prepare`) and then scores batches (:meth:`Scorer.score`). Two
implementations: :class:`~cryosieve.scoring.fourier.FourierScorer` (central slices in Fourier space,
the default) and :class:`~cryosieve.scoring.published.PublishedScorer` (the published CryoSieve 1.3.3
real-space projector, ``--projector realspace``); :func:`make_scorer` chooses from the sieve's
settings (:class:`cryosieve.settings.SieveSettings`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

from cryosieve._fastmath import AVAILABLE as NUMBA
from cryosieve.errors import CryoSieveInputError, setting
from cryosieve.precision import device_type
from cryosieve.settings import ENGINES

if TYPE_CHECKING:
    import torch

    from cryosieve.batch import ParticleBatch
    from cryosieve.io.stack import BatchImages
    from cryosieve.settings import SieveSettings

def uses_kernel(engine: str, device: torch.device | str) -> bool:
    """Whether the Fourier scorer runs the numba kernel for ``engine`` (one of
    :data:`~cryosieve.settings.ENGINES`) on ``device``; refuses (one line) an unknown engine, or
    numba off the CPU or without numba."""
    if engine not in ENGINES:
        raise CryoSieveInputError(f"{setting('engine')} {engine}: must be one of {', '.join(ENGINES)}")
    on_cpu = device_type(device) == "cpu"
    if engine == "numba" and (not on_cpu or not NUMBA):
        raise CryoSieveInputError(f"{setting('engine')} numba: runs on the CPU only, with numba installed")
    return engine == "numba" or (engine == "auto" and on_cpu and NUMBA)


class Scorer(Protocol):
    """Scores batches of particles against one reference at a time."""

    #: Whether :meth:`score` takes the images as :class:`~cryosieve.io.stack.BatchImages`, read slice
    #: by slice while it works (the CPU kernel), instead of whole batches already read.
    reads_on_demand: bool

    def prepare(self, reference: np.ndarray) -> None:
        """Score the next batches against ``reference``: a ``(n, n, n)`` masked half map ``[z, y, x]``, in
        place of the one prepared before (whose memory the scorer may reuse)."""

    def score(self, batch: ParticleBatch, images: torch.Tensor | BatchImages) -> torch.Tensor:
        """``(b,)`` scores of the batch (float64; float32 sums on a device without float64), on the
        scorer's device. ``images``: ``(b, n, n)`` float32 images ``[y, x]`` on that device."""

    def release(self) -> None:
        """Drop the prepared reference and the memory kept for the next."""


def make_scorer(options: SieveSettings, box: int, lowest_pixel_size: float, volume_pixel_size: float | None,
                reference_fsc: np.ndarray | None) -> Scorer:
    """The scorer of ``options`` (its cut-off, projector, device and engine) for ``box``-pixel images.

    ``lowest_pixel_size``: the particles' smallest pixel size (Å; sets the widest band of samples);
    ``volume_pixel_size``: the references' voxel size (Å; ``None``: the particles'); ``reference_fsc``:
    the per-shell FSC to weight the references by (``None``: no weighting).
    """
    import torch

    device = torch.device(options.device)
    if options.projector == "realspace":
        from cryosieve.scoring.published import PublishedScorer

        return PublishedScorer(options.highpass_angstrom, device, reference_fsc)
    from cryosieve.scoring.fourier import FourierScorer

    return FourierScorer(box, options.highpass_angstrom, lowest_pixel_size, device, options.engine,
                         volume_pixel_size, reference_fsc)
