"""The sieving score of each particle, behind one :class:`~cryosieve.scoring.base.Scorer` protocol.

* :mod:`.base`: the score, the :class:`Scorer` protocol, :func:`make_scorer`;
* :mod:`.fourier`: the Fourier scorer (central slices of the reference's transform; the numba kernel
  of :mod:`.kernels` on the CPU, batched tensors elsewhere, chosen once);
* :mod:`.samples`: the band of Fourier samples it sums over;
* :mod:`.published`: the published CryoSieve 1.3.3 real-space scorer (``--projector realspace``);
* :mod:`.loop`: the loop over batches of a stack, one shard of a multi-process job (:class:`ScoreTask`).
"""

from cryosieve.scoring.base import Scorer, make_scorer
from cryosieve.scoring.loop import ScoreTask, score_rows, shard_batches, viewing_direction_order

__all__ = ["ScoreTask", "Scorer", "make_scorer", "score_rows", "shard_batches", "viewing_direction_order"]
