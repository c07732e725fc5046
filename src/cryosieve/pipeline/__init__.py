"""The iterative CryoSieve pipeline: reconstruct, post-process, sieve, repeat.

Round ``i`` (0 .. ``num_iters - 1``), as the published CryoSieve runs it:

1. reconstruct the two half maps of ``PREFIX_iter{i}.star`` ->
   ``PREFIX_iter{i}_half1.mrc`` and ``PREFIX_iter{i}_half2.mrc`` (a
   :class:`~cryosieve.backends.Reconstructor`);
2. post-process them -> ``PREFIX_postprocess_iter{i}/iter{i}.*`` (a
   :class:`~cryosieve.backends.PostProcessor`);
3. sieve ``PREFIX_iter{i}.star`` with those half maps and the mask at the round's cut-off
   (:class:`~cryosieve.schedule.CutoffSchedule`) -> ``PREFIX_iter{i+1}.star`` (kept),
   ``PREFIX_iter{i+1}_sieved.star`` (removed) and ``PREFIX_iter{i+1}_scores.csv``.

``PREFIX_iter0.star`` is the input (a byte copy, or with ``balance`` the subset that makes
both half-sets equally large). As in the published program, the last kept set
``PREFIX_iter{num_iters}.star`` is not reconstructed.

Every step goes through one step runner. ``PREFIX_state.json`` (written atomically) holds the
settings that determine the outputs (by field name), the completed steps, and what each
round measured (resolution, B-factor, corrected FSC, the back-ends), recorded by the
pipeline itself whatever back-end measured it; each step writes its outputs atomically
before it is recorded. A run started again with ``resume=True`` skips every recorded step,
so an interrupted run ends with the same files as an uninterrupted one. Every random
choice is seeded.

The library never prints: it logs to the ``cryosieve`` logger (and, while running, to
``PREFIX_pipeline.log``) and reports progress through a caller-given factory.

Modules, one concept each: :mod:`.settings` (:class:`PipelineSettings`), :mod:`.names` (every output
path), :mod:`.prepare` (reading and checking before anything is written), :mod:`.state` (the state
file and resuming), :mod:`.rounds` (the steps of a round and what a round shows), :mod:`.validation`
(``--validate``), :mod:`.run` (the step runner, :func:`run_pipeline`).
"""

from cryosieve.pipeline.names import OutputNames
from cryosieve.pipeline.prepare import balanced_rows, prepare
from cryosieve.pipeline.run import PipelineResult, run_pipeline
from cryosieve.pipeline.settings import PipelineSettings
from cryosieve.pipeline.state import GIVE_BACK, STATE_FORMAT, step_names

__all__ = ["GIVE_BACK", "STATE_FORMAT", "OutputNames", "PipelineResult", "PipelineSettings", "balanced_rows",
           "prepare", "run_pipeline", "step_names"]
