"""How much to keep (``--retention_ratio auto``): the fraction whose half maps hold the most information.

For each candidate fraction ``q`` (:data:`CANDIDATES`: 0.10, 0.15, ..., 1.00) every half-set keeps
its ``round(q n)`` best-scoring particles, exactly as a fixed ``--retention_ratio q`` would
(:func:`cryosieve.selection.select_lowest`). The two half maps of those particles are reconstructed
with their given poses, as ``relion_reconstruct`` would (:func:`cryosieve.reconstruct.api.nested_subset_maps`:
the selections are nested, so the stack is read once and each particle inserted once), masked,
and compared by their FSC. The information of the map at ``q`` is::

    I(q) = sum_s N_s ln(1 + SSNR_s),    SSNR_s = 2 FSC_s / (1 - FSC_s)

over the shells ``s`` = 1 .. n/2 (``N_s`` Fourier components in shell ``s``; the FSC clipped to
``[0, 0.999]``). A good particle adds signal in every shell it is aligned to; an empty image or
junk adds only noise, and a misaligned particle adds noise where its error blurs it, so ``I``
rises while the kept particles are good and falls once they are not. The chosen fraction is
the candidate of largest ``I``, the same for both half-sets (each keeps ``round(q n)`` of its own).

Each half-set is ranked against its own half map, so the selection of one half-set does not
depend on the other's noise and the FSC between them is not inflated by the choice: on
realistic simulations with no bad particles the choice is 0.95 or 1.00, and with 10 % to 40 %
bad ones of 3,000 it is within 0.07 of the true good fraction (``tests/test_retention.py``);
it equals the fixed ratio whose map is closest to the truth or is one candidate from it
(``benchmarks/bench_retention.py``, ``docs/benchmarks.md``). The cost is one more pass of
insertion over the particles and two maps per candidate.

Whether any candidate holds information at all is tested too, for otherwise the largest ``I`` is
an accident of noise (particles without signal, or wrong poses): the fraction kept is then
arbitrary, which the caller says (:attr:`RetentionChoice.above_noise`, the columns ``z`` and
``above_noise`` of ``_retention.csv``). Two half maps that share no signal have, in shell ``s``,
an FSC of mean 0 whose Fisher transform ``artanh(FSC_s)`` has variance ``1 / (f N_s)``; ``f`` is
the fraction of the box's components the mask leaves independent, ``(sum m^2)^2 / (n^3 sum m^4)``
(1 without a mask; the volume fraction of a sharp one). So the information without clipping,
``2 sum_s N_s artanh(FSC_s)``, has mean 0 and standard deviation ``2 sqrt(sum_s N_s / f)``, and::

    z(q) = sum_s N_s artanh(FSC_s) / sqrt(sum_s N_s / f)

is a standard normal when the half maps at ``q`` share nothing (checked on pairs of masked noise
maps and on the maps of pure-noise particles by ``tests/test_retention.py``). A candidate is above
noise when ``z(q) >= SIGNAL_Z`` (5: noise alone reaches it with probability 3e-7 per candidate);
when none is, no candidate's information stands above what noise gives, and the choice among
them means nothing. All of 400 realistic particles at box 32 reach z of about 17, all of 1,000 at box 64
about 30.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cryosieve.errors import CryoSieveInputError
from cryosieve.fsc import fourier_shell_correlation, friedel_weights, shell_count, shell_index, shell_sum
from cryosieve.io.stack import StackReader
from cryosieve.particles import ParticleSet
from cryosieve.reconstruct.api import nested_subset_maps
from cryosieve.selection import retained_count

#: The fractions tried, ascending.
CANDIDATES: tuple[float, ...] = tuple(round(0.10 + 0.05 * step, 2) for step in range(19))

#: FSC values are clipped to this before ``2 FSC / (1 - FSC)``.
FSC_CEILING = 0.999

#: A candidate's half maps share information beyond noise when its :func:`information_z` reaches this.
SIGNAL_Z = 5.0


@dataclass(frozen=True)
class RetentionChoice:
    """The fraction chosen and what it was chosen from.

    ``fractions``: ``(k,)`` the candidates; ``information``: ``(k,)`` ``I(q)`` in nats;
    ``fsc``: ``(k, n // 2 + 1)`` the masked half-map FSC at each candidate; ``chosen``: the
    fraction kept; ``z``: ``(k,)`` :func:`information_z` of each candidate.
    """

    fractions: np.ndarray
    information: np.ndarray
    fsc: np.ndarray
    chosen: float
    z: np.ndarray

    @property
    def above_noise(self) -> bool:
        """Whether any candidate's half maps share information beyond noise (``z >= SIGNAL_Z``); if none
        does, the fraction chosen is arbitrary."""
        return bool(np.any(self.z >= SIGNAL_Z))

    def table_rows(self) -> list[dict[str, float | int]]:
        """One row per candidate: ``fraction``, ``information``, ``chosen`` (0/1), ``z`` and
        ``above_noise`` (0/1: ``z >= SIGNAL_Z``; none at 1 means the choice is arbitrary)."""
        return [{"fraction": float(q), "information": float(value), "chosen": int(q == self.chosen),
                 "z": float(z), "above_noise": int(z >= SIGNAL_Z)}
                for q, value, z in zip(self.fractions, self.information, self.z, strict=True)]


@functools.lru_cache(maxsize=8)
def _shell_counts(box: int) -> np.ndarray:
    """``(n // 2 + 1,)`` components of the full transform of an ``n`` box per shell (read-only)."""
    counts = shell_sum(friedel_weights(box), shell_index(box), shell_count(box)).numpy().astype(np.float64)
    counts.setflags(write=False)
    return counts


def map_information(fsc: np.ndarray, box: int) -> float:
    """``sum_s N_s ln(1 + 2 FSC_s / (1 - FSC_s))`` over shells 1 .. n/2 of an ``n`` box (nats).

    ``fsc``: ``(n // 2 + 1,)`` half-map FSC per shell (:mod:`cryosieve.fsc`'s shells); ``N_s``
    counts the components of the full transform in shell ``s``.
    """
    counts = _shell_counts(box)
    clipped = np.clip(np.asarray(fsc, dtype=np.float64), 0.0, FSC_CEILING)
    ssnr = 2.0 * clipped / (1.0 - clipped)
    return float(np.sum(counts[1:] * np.log1p(ssnr[1:])))


def mask_fraction(mask: np.ndarray | None) -> float:
    """``(sum m^2)^2 / (n^3 sum m^4)``: the fraction of a box's Fourier components that stay independent under the
    mask ``m`` ``(n, n, n)`` (1 for ``None``; the volume fraction of a sharp mask)."""
    if mask is None:
        return 1.0
    weights = np.asarray(mask, dtype=np.float64)
    squares = float(np.sum(weights**2))
    fourth = float(np.sum(weights**4))
    return squares * squares / (weights.size * fourth) if fourth > 0 else 1.0


def information_z(fsc: np.ndarray, box: int, fraction: float = 1.0) -> float:
    """``sum_s N_s artanh(FSC_s) / sqrt(sum_s N_s / f)`` over shells 1 .. n/2: the half maps' information
    without clipping in units of its spread when they share no signal, a standard normal then (the module's
    text). ``fsc``: ``(n // 2 + 1,)``; ``fraction``: ``f`` of the mask (:func:`mask_fraction`)."""
    counts = _shell_counts(box)[1:]
    transformed = np.arctanh(np.clip(np.asarray(fsc, dtype=np.float64)[1:], -FSC_CEILING, FSC_CEILING))
    return float(np.sum(counts * transformed) / np.sqrt(np.sum(counts) / fraction))


def candidate_steps(scores: np.ndarray, half_set: np.ndarray, fractions: Sequence[float]) -> list[np.ndarray]:
    """Rows added at each candidate fraction: within each half-set the particles ranked from
    ``round(q_(j-1) n)`` to ``round(q_j n)`` (lowest score first, ties in input order, as
    :func:`cryosieve.selection.select_lowest`), sorted by row. ``scores``, ``half_set``: ``(n,)``."""
    steps: list[list[np.ndarray]] = [[] for _ in fractions]
    for subset in np.unique(half_set):
        members = np.flatnonzero(half_set == subset)
        order = members[np.argsort(scores[members], kind="stable")]
        start = 0
        for index, fraction in enumerate(fractions):
            end = retained_count(members.size, float(fraction))
            steps[index].append(order[start:end])
            start = end
    return [np.sort(np.concatenate(parts)) for parts in steps]


def choose_retention(table: ParticleSet, reader: StackReader, scores: np.ndarray, half_set: np.ndarray,
                     mask: np.ndarray | None, *, fractions: Sequence[float] = CANDIDATES, batch_size: int = 128,
                     device: torch.device | str = "cpu", engine: str = "auto",
                     progress: Callable[[int], None] | None = None) -> RetentionChoice:
    """Choose the fraction of each half-set to keep (see the module's text).

    ``scores``, ``half_set``: ``(n,)`` (lower scores are better; half-sets 1 and 2 both present);
    ``mask``: ``(n, n, n)`` float32 applied to both half maps before the FSC, or ``None``;
    ``fractions``: ascending candidates in (0, 1]. ``progress`` is called with the number of
    particles inserted after each batch (every particle once).
    """
    subsets = sorted(int(value) for value in np.unique(half_set))
    if subsets != [1, 2]:
        raise CryoSieveInputError(f"{table.path}: an automatic retention ratio needs the two half-sets "
                                  "of rlnRandomSubset (1 and 2)")
    tried = np.asarray(fractions, dtype=np.float64)
    if tried.size == 0 or np.any(np.diff(tried) <= 0) or tried[0] <= 0 or tried[-1] > 1:
        raise ValueError("candidate fractions must be ascending in (0, 1]")
    smallest = min(int(np.sum(half_set == subset)) for subset in subsets)
    tried = tried[[retained_count(smallest, float(q)) > 0 for q in tried]]
    if tried.size == 0:
        raise CryoSieveInputError(f"{table.path}: too few particles in a half-set to choose a retention ratio")
    steps = candidate_steps(scores, half_set, tried.tolist())
    mask_tensor = torch.from_numpy(np.asarray(mask, dtype=np.float32)) if mask is not None else None
    curves: list[np.ndarray] = []
    information: list[float] = []
    z: list[float] = []
    fraction = mask_fraction(mask)
    box = 0
    for maps in nested_subset_maps(table, reader, steps, subsets=(1, 2), batch_size=batch_size, device=device,
                                   engine=engine, progress=progress):
        first, second = (torch.from_numpy(maps[subset]) for subset in (1, 2))
        if mask_tensor is not None:
            first, second = first * mask_tensor, second * mask_tensor
        box = first.shape[-1]
        fsc = fourier_shell_correlation(first, second).numpy()
        curves.append(fsc)
        information.append(map_information(fsc, box))
        z.append(information_z(fsc, box, fraction))
    values = np.asarray(information)
    chosen = float(tried[int(np.argmax(values))])
    return RetentionChoice(fractions=tried, information=values, fsc=np.stack(curves), chosen=chosen,
                           z=np.asarray(z))
