"""The sieving score of each particle, behind one :class:`~cryosieve.scoring.base.Scorer` protocol.

* :mod:`.base`: the score, the :class:`~cryosieve.scoring.base.Scorer` protocol and
  :func:`~cryosieve.scoring.base.make_scorer`, which chooses the implementation once;
* :mod:`.fourier`: the Fourier scorer (central slices of the reference's transform; the numba kernel
  of :mod:`.kernels` on the CPU, batched tensors elsewhere);
* :mod:`.samples`: the band of Fourier samples it sums over;
* :mod:`.published`: the published CryoSieve 1.3.3 real-space scorer (``--projector realspace``);
* :mod:`.loop`: the loop over batches of a stack, one shard of a multi-process job
  (:class:`~cryosieve.scoring.loop.ScoreTask`).

The package face imports nothing, so that validating a sieve's inputs does not load torch.
"""
