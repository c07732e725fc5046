"""The settings of one run of the iterative pipeline (the command line of ``cryosieve``).

The sieve's own options are one :class:`~cryosieve.settings.SieveSettings`, held as they are and
given the round's cut-off (``dataclasses.replace``) in each round: a new sieve option needs no code
here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from cryosieve.align.settings import GoldStandardSettings, SearchSettings
from cryosieve.backends import PostProcessor, Reconstructor, Refiner
from cryosieve.schedule import CutoffSchedule
from cryosieve.settings import SieveSettings

if TYPE_CHECKING:
    from cryosieve.cryosparc.selection import ReturnTarget


@dataclass(frozen=True)
class PipelineSettings:
    """The settings of one run.

    Attributes
    ----------
    input_star:
        Particle file (STAR or ``.cs``) with poses, CTF and half-sets 1/2.
    output_prefix:
        Path prefix of every output (``output/`` gives ``output/_iter0.star`` ...).
    mask:
        Mask MRC (values in [0, 1]) for sieving and post-processing.
    sieve:
        The options of every sieve; its cut-off is replaced by the schedule's in each round.
    angpix:
        Pixel size in Å: needed for RELION 3.0 STAR files; for 3.1+ files (which carry
        it) ``None``, or a value that agrees with theirs.
    directory:
        Folder that ``rlnImageName`` paths are relative to (``None``: current folder).
    symmetry:
        Point group for reconstruction (RELION's names, any case).
    num_iters, frequency_start, frequency_end:
        As in the published CryoSieve (cut-offs in Å, :class:`~cryosieve.schedule.CutoffSchedule`).
    reconstructor, postprocessor:
        The back-ends (``None``: the built-in ones on the sieve's device).
    validator:
        Re-estimates the poses of every set (``--validate``): each round's set and the last kept
        set are also refined, and their resolution and B-factor reported beside the fixed-pose
        ones; ``None``: no validation.
    validate_rh:
        With a validator, also the Rosenthal-Henderson B-factor of every set (``rh_halves``
        nested halvings).
    reconstruct_batch_size:
        Images per batch of the built-in reconstruction.
    report:
        Write the plots and the HTML page (the summary CSV is always written).
    passthrough, return_to:
        Further ``.cs`` files of a ``.cs`` input; where the last selection goes back to CryoSPARC.
    patience:
        ``None``: every one of ``num_iters`` rounds (the published schedule); else stop once the
        resolution (with poses re-estimated when there is a validator, else with the given poses:
        optimistic) has not improved for ``patience`` rounds, ``num_iters`` being the most; the set of
        the round it stops at is measured, not sieved.
    resplit:
        Split the particles into two random half-sets (seeded) before the first round, written as
        ``rlnRandomSubset`` in ``PREFIX_iter0``: for particles without half-sets, or to start afresh.
    command_line:
        The command that started the run, for the report (not part of what decides the outputs).
    realign:
        Iterations of the built-in gold-standard local refinement (:mod:`cryosieve.align`) run on each round's
        set before its sieve (``--realign``): the sieve scores the particles against their re-estimated poses
        and the half maps of those poses, and the next set carries them; 0: none.
    search:
        The local searches of ``realign`` (:class:`~cryosieve.align.SearchSettings`: the largest turn, the finest
        step, the largest move of the origin), held as they are and run on the sieve's device.
    """

    input_star: str
    output_prefix: str
    mask: str
    sieve: SieveSettings
    angpix: float | None = None
    directory: str | None = None
    symmetry: str = "C1"
    num_iters: int = 10
    frequency_start: float = 50.0
    frequency_end: float = 3.0
    reconstructor: Reconstructor | None = None
    postprocessor: PostProcessor | None = None
    validator: Refiner | None = None
    validate_rh: bool = False
    rh_halves: int = 4
    reconstruct_batch_size: int = 128
    report: bool = True
    passthrough: tuple[str, ...] = ()
    return_to: ReturnTarget | None = None
    patience: int | None = None
    resplit: bool = False
    command_line: str = ""
    realign: int = 0
    search: SearchSettings = field(default_factory=SearchSettings)

    @property
    def schedule(self) -> CutoffSchedule:
        return CutoffSchedule(self.frequency_start, self.frequency_end, self.num_iters)

    def sieve_at(self, cutoff: float) -> SieveSettings:
        """The sieve's settings of a round at the cut-off ``cutoff`` (Å)."""
        return replace(self.sieve, highpass_angstrom=float(cutoff))

    def realign_settings(self, symmetry: str) -> GoldStandardSettings:
        """The settings of the local refinement of ``realign`` (on the sieve's device; ``symmetry``: of its
        reconstructions)."""
        return GoldStandardSettings(
            search=replace(self.search, device=self.sieve.device), iterations=max(self.realign, 1),
            symmetry=symmetry, reconstruct_batch_size=self.reconstruct_batch_size)

    def backends(self) -> tuple[Reconstructor, PostProcessor]:
        """The back-ends to use, the built-in ones where none is given."""
        from cryosieve.backends.builtin import BuiltinPostProcessor, BuiltinReconstructor

        return (self.reconstructor or BuiltinReconstructor(self.sieve.device, self.reconstruct_batch_size),
                self.postprocessor or BuiltinPostProcessor(self.sieve.device))
