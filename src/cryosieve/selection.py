"""The selection: which particles a sieve keeps, given their scores.

* :func:`select_lowest`: within each half-set the ``round(R n)`` lowest scores (:func:`retained_count`),
  optionally the same number in every half-set (``--balance``);
* viewing directions: equal-area bins on the sphere (:func:`view_bins`), how much a selection depletes
  them (:func:`depleted_fraction`), and a floor that keeps every well-populated view from being depleted
  (:func:`keep_views`, ``--keep_orientations``);
* :func:`select`: all of it, as a sieve applies it.

A particle's viewing direction is set by ``rot`` and ``tilt`` (degrees, RELION's ZYZ Euler angles;
``psi`` turns the image in its plane). The sphere is cut into ``rot_bins`` equal steps of ``rot`` and
``cos_bins`` equal steps of ``cos(tilt)``: every bin covers the same solid angle, so uniformly
distributed views fill them equally.
"""

from __future__ import annotations

import numpy as np

#: Bins in rot and in cos(tilt): 72 bins of 4 pi / 72 sr each (about 24 x 24 degrees).
ROT_BINS = 12
COS_BINS = 6
#: Fewest particles a bin needs to count as populated.
MIN_POPULATED = 5


def view_bins(rot: np.ndarray, tilt: np.ndarray, rot_bins: int = ROT_BINS, cos_bins: int = COS_BINS) -> np.ndarray:
    """The equal-area bin ``(n,)`` int64 in ``[0, rot_bins * cos_bins)`` of each viewing direction
    (``rot``, ``tilt``: ``(n,)`` degrees)."""
    wrapped = np.mod(np.asarray(rot, dtype=np.float64) + 180.0, 360.0)  # [0, 360)
    along = np.minimum((wrapped / 360.0 * rot_bins).astype(np.int64), rot_bins - 1)
    cosine = np.cos(np.radians(np.asarray(tilt, dtype=np.float64)))
    across = np.clip(((1.0 - cosine) / 2.0 * cos_bins).astype(np.int64), 0, cos_bins - 1)
    return across * rot_bins + along


def depleted_fraction(bins: np.ndarray, kept: np.ndarray, minimum: int = MIN_POPULATED) -> float:
    """Of the bins holding at least ``minimum`` particles, the fraction that lost more than twice the
    average share: a bin losing ``sieved_b / n_b > 2 * sieved / n``. 0: no view depleted; ``nan``
    when nothing was sieved or no bin is populated. ``bins``: ``(n,)`` from :func:`view_bins`;
    ``kept``: ``(n,)`` bool."""
    kept = np.asarray(kept, dtype=bool)
    lost = 1.0 - kept.mean() if len(kept) else 0.0
    counts = np.bincount(bins, minlength=int(bins.max(initial=0)) + 1)
    sieved = np.bincount(bins[~kept], minlength=len(counts))
    populated = counts >= minimum
    if lost == 0.0 or not populated.any():
        return float("nan")
    share = sieved[populated] / counts[populated]
    return float(np.mean(share > 2.0 * lost))


def keep_views(scores: np.ndarray, kept: np.ndarray, bins: np.ndarray, max_loss: float,
               minimum: int = MIN_POPULATED) -> np.ndarray:
    """``kept`` with no populated bin (at least ``minimum`` particles) losing more than ``max_loss`` times the
    average share: a bin whose sieved share exceeds ``max_loss * (1 - kept fraction)`` gets its best-scoring
    sieved particles back until it does not. With ``max_loss`` below 2 no view is left depleted in the sense
    of :func:`depleted_fraction`. ``scores``, ``kept``, ``bins``: ``(n,)`` (lower scores are better).
    Returns a new ``(n,)`` bool."""
    result = np.asarray(kept, dtype=bool).copy()
    if not len(result):
        return result
    allowed = max_loss * (1.0 - result.mean())
    for value in np.unique(bins):
        members = np.flatnonzero(bins == value)
        if len(members) < minimum:
            continue
        wanted = int(np.ceil((1.0 - allowed) * len(members) - 1e-9))
        have = int(result[members].sum())
        if have >= wanted:
            continue
        candidates = members[~result[members]]
        back = candidates[np.argsort(scores[candidates], kind="stable")[:wanted - have]]
        result[back] = True
    return result


def retained_count(count: int, retention_ratio: float) -> int:
    """How many of ``count`` particles to keep: ``round(retention_ratio * count)`` (Python's round, as published)."""
    return round(retention_ratio * count)


def select_lowest(scores: np.ndarray, groups: np.ndarray, retention_ratio: float, balance: bool = False
                  ) -> np.ndarray:
    """Keep, within each group, the ``round(R * n)`` lowest scores (ties: input order).

    With ``balance``, every group keeps the same number: the smallest ``round(R * n)``.
    ``scores``: ``(n,)``; ``groups``: ``(n,)`` half-set labels. Returns a ``(n,)`` bool mask.
    """
    kept = np.zeros(len(scores), dtype=bool)
    labels = np.unique(groups)
    counts = {group: retained_count(int(np.sum(groups == group)), retention_ratio) for group in labels}
    smallest = min(counts.values()) if counts else 0
    for group in labels:
        members = np.flatnonzero(groups == group)
        order = np.argsort(scores[members], kind="stable")
        kept[members[order[:smallest if balance else counts[group]]]] = True
    return kept


def select(scores: np.ndarray, half_set: np.ndarray, retention_ratio: float, *, balance: bool = False,
           keep_orientations: float | None = None, rot: np.ndarray | None = None, tilt: np.ndarray | None = None
           ) -> np.ndarray:
    """The kept particles ``(n,)`` bool of a sieve: :func:`select_lowest` of each half-set, then, with
    ``keep_orientations`` (a factor of at least 1), :func:`keep_views` within each half-set of the viewing
    directions ``rot``, ``tilt`` (``(n,)`` degrees)."""
    kept = select_lowest(scores, half_set, retention_ratio, balance=balance)
    if keep_orientations is not None:
        assert rot is not None and tilt is not None, "keep_orientations needs the viewing directions"
        bins = view_bins(rot, tilt)
        for subset in np.unique(half_set):
            members = half_set == subset
            kept[members] = keep_views(scores[members], kept[members], bins[members], keep_orientations)
    return kept
