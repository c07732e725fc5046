"""Report of an iterative run: summary table, plots and one self-contained HTML page.

Files, for output prefix ``PREFIX`` (each written atomically, rewritten after every round):

* ``PREFIX_summary.csv``: one row per particle set ``_iter{i}.star``: ``iteration``,
  ``cutoff_angstrom`` (high-pass cut-off of the sieve applied to that set, Å; empty for
  the last set), ``particles_half1``, ``particles_half2``, ``resolution_angstrom`` and
  ``bfactor`` (Å^2; empty for a set that was not reconstructed);
* ``PREFIX_resolution.png``: resolution and B-factor against iteration and against the
  number of particles;
* ``PREFIX_fsc.png``: the corrected FSC curve of every round, overlaid;
* ``PREFIX_scores.png``: score histograms of every sieve, half-sets apart, the cut marked;
* ``PREFIX_retention.png`` (``--retention_ratio auto`` only): the map information of each
  candidate fraction of every sieve, the chosen one marked (:mod:`cryosieve.retention`);
* ``PREFIX_report.html``: the table and the plots (PNG embedded as base64 data URIs),
  naming the round with the best resolution.
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cryosieve.io.atomic import atomic_path, write_text_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SUMMARY_COLUMNS = ("iteration", "cutoff_angstrom", "particles_half1", "particles_half2", "resolution_angstrom",
                   "resolution_interpolated_angstrom", "information", "shells_from_best", "bfactor",
                   "validated_resolution_angstrom", "validated_bfactor", "rh_bfactor", "rh_bfactor_classical",
                   "realigned_moved", "realigned_median_turn_degrees", "realigned_median_origin_move_pixels",
                   "realigned_resolution_angstrom", "depleted_views", "retention_ratio", "best")

#: The FSC threshold of the resolution.
FSC_THRESHOLD = 0.143
#: Two resolutions closer than this many Fourier shells are one shell of the FSC: a tie.
SHELL_TOLERANCE = 1e-6


@dataclass
class RoundSummary:
    """One particle set ``PREFIX_iter{i}.star`` and what was measured on it.

    Attributes
    ----------
    iteration:
        ``i``.
    cutoff_angstrom:
        High-pass cut-off (Å) of the sieve applied to this set, or ``None`` (last set).
    particles_half1, particles_half2:
        Particles in half-sets 1 and 2.
    resolution_angstrom, bfactor:
        Post-processed resolution (Å) and sharpening B-factor (Å^2) of its half maps, or ``None``.
    fsc_frequency, fsc_corrected:
        ``(m,)`` spatial frequency (1/Å) and corrected FSC per shell, or ``None``.
    scores, half_set, kept:
        ``(n,)`` float64 sieve scores, int64 half-sets and bool selection, or ``None``.
    validated_resolution_angstrom, validated_bfactor:
        Resolution (Å) and B-factor (Å^2) of the set with its poses re-estimated (``--validate``), or ``None``.
    rh_bfactor, rh_bfactor_classical:
        Its Rosenthal-Henderson B-factor (Å^2; ``--validate_rh``), or ``None``: the original's fit
        (``B = -a``, negative for real data; closer to 0 is better) and the straight line
        (``2 x`` slope; lower is better); see :mod:`cryosieve.refine.rh`.
    realigned_moved, realigned_median_turn, realigned_median_shift, realigned_resolution_angstrom:
        With ``--realign``: how many of its particles the local refinement before its sieve moved (by more than
        its finest step or half a pixel), their median turn (degrees) and origin move (pixels), and the
        resolution (Å) of its half maps with those poses; ``None`` otherwise.
    """

    iteration: int
    cutoff_angstrom: float | None
    particles_half1: int
    particles_half2: int
    resolution_angstrom: float | None = None
    bfactor: float | None = None
    fsc_frequency: np.ndarray | None = None
    fsc_corrected: np.ndarray | None = None
    scores: np.ndarray | None = None
    half_set: np.ndarray | None = None
    kept: np.ndarray | None = None
    validated_resolution_angstrom: float | None = None
    validated_bfactor: float | None = None
    rh_bfactor: float | None = None
    rh_bfactor_classical: float | None = None
    realigned_moved: int | None = None
    realigned_median_turn: float | None = None
    realigned_median_shift: float | None = None
    realigned_resolution_angstrom: float | None = None
    view_bins: np.ndarray | None = None  # (n,) int64 viewing-direction bins of the set (cryosieve.selection)
    depleted_views: float | None = None  # cryosieve.selection.depleted_fraction of its sieve
    retention_ratio: float | None = None  # the fraction of each half-set its sieve kept (given, or chosen)
    # retention_ratio auto: (candidate fractions (k,), map information (k,) in nats) of its sieve
    retention_curve: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def particles(self) -> int:
        return self.particles_half1 + self.particles_half2


@dataclass(frozen=True)
class ReportPaths:
    """Where the report files are."""

    summary_csv: Path
    resolution_plot: Path
    fsc_plot: Path
    scores_plot: Path
    html: Path
    angles_plot: Path
    retention_plot: Path


def report_paths(prefix: str) -> ReportPaths:
    return ReportPaths(summary_csv=Path(prefix + "_summary.csv"), resolution_plot=Path(prefix + "_resolution.png"),
                       fsc_plot=Path(prefix + "_fsc.png"), scores_plot=Path(prefix + "_scores.png"),
                       html=Path(prefix + "_report.html"), angles_plot=Path(prefix + "_angles.png"),
                       retention_plot=Path(prefix + "_retention.png"))


def interpolated_resolution(summary: RoundSummary) -> float | None:
    """Where the round's corrected FSC first falls below 0.143, linearly interpolated between shells (Å), or
    ``None`` when it has no FSC; Nyquist when it never falls below. Unlike the reported resolution (RELION's:
    the last shell above 0.143), it tells apart rounds whose FSC crosses within the same shell."""
    if summary.fsc_frequency is None or summary.fsc_corrected is None or len(summary.fsc_corrected) < 2:
        return None
    frequency, fsc = np.asarray(summary.fsc_frequency), np.asarray(summary.fsc_corrected)
    for shell in range(1, len(fsc)):
        if fsc[shell] < FSC_THRESHOLD:
            before, after = fsc[shell - 1], fsc[shell]
            fraction = (before - FSC_THRESHOLD) / (before - after) if before != after else 0.0
            crossing = frequency[shell - 1] + fraction * (frequency[shell] - frequency[shell - 1])
            return float(1.0 / crossing) if crossing > 0 else None
    return float(1.0 / frequency[-1])


def information(summary: RoundSummary) -> float | None:
    """The information of the round's half maps, ``sum_s N_s ln(1 + 2 FSC_s / (1 - FSC_s))`` over its shells
    (nats; :func:`cryosieve.retention.map_information`, with the corrected FSC), or ``None``."""
    if summary.fsc_corrected is None or len(summary.fsc_corrected) < 2:
        return None
    from cryosieve.retention import map_information

    return map_information(np.asarray(summary.fsc_corrected), 2 * (len(summary.fsc_corrected) - 1))


def shells_between(summary: RoundSummary, best: RoundSummary) -> float | None:
    """How many Fourier shells ``summary``'s reported resolution is coarser than ``best``'s (0: the same shell,
    a tie), or ``None`` when either was not measured."""
    if summary.fsc_frequency is None or len(summary.fsc_frequency) < 2:
        return None
    step = float(summary.fsc_frequency[1] - summary.fsc_frequency[0])  # 1 / (box * pixel size)
    values = (summary.resolution_angstrom, best.resolution_angstrom)
    if step <= 0 or any(value is None or not math.isfinite(value) or value <= 0 for value in values):
        return None
    assert summary.resolution_angstrom is not None and best.resolution_angstrom is not None
    shells = (1.0 / best.resolution_angstrom - 1.0 / summary.resolution_angstrom) / step
    return 0.0 if abs(shells) < SHELL_TOLERANCE else float(round(shells, 6))


def summary_table(rounds: Sequence[RoundSummary]) -> pd.DataFrame:
    """One row per set, columns :data:`SUMMARY_COLUMNS` (NaN where not measured)."""
    def value(number: float | None) -> float:
        return math.nan if number is None else float(number)

    chosen = chosen_round(rounds)
    best = best_round(rounds)
    return pd.DataFrame({
        "iteration": [summary.iteration for summary in rounds],
        "cutoff_angstrom": [value(summary.cutoff_angstrom) for summary in rounds],
        "particles_half1": [summary.particles_half1 for summary in rounds],
        "particles_half2": [summary.particles_half2 for summary in rounds],
        "resolution_angstrom": [value(summary.resolution_angstrom) for summary in rounds],
        "resolution_interpolated_angstrom": [value(interpolated_resolution(summary)) for summary in rounds],
        "information": [value(information(summary)) for summary in rounds],
        "shells_from_best": [value(shells_between(summary, best) if best is not None else None)
                             for summary in rounds],
        "bfactor": [value(summary.bfactor) for summary in rounds],
        "validated_resolution_angstrom": [value(summary.validated_resolution_angstrom) for summary in rounds],
        "validated_bfactor": [value(summary.validated_bfactor) for summary in rounds],
        "rh_bfactor": [value(summary.rh_bfactor) for summary in rounds],
        "rh_bfactor_classical": [value(summary.rh_bfactor_classical) for summary in rounds],
        "realigned_moved": [value(summary.realigned_moved) for summary in rounds],
        "realigned_median_turn_degrees": [value(summary.realigned_median_turn) for summary in rounds],
        "realigned_median_origin_move_pixels": [value(summary.realigned_median_shift) for summary in rounds],
        "realigned_resolution_angstrom": [value(summary.realigned_resolution_angstrom) for summary in rounds],
        "depleted_views": [value(summary.depleted_views) for summary in rounds],
        "retention_ratio": [value(summary.retention_ratio) for summary in rounds],
        "best": [chosen is not None and summary.iteration == chosen.iteration for summary in rounds],
    }, columns=list(SUMMARY_COLUMNS))


def best_round(rounds: Sequence[RoundSummary], validated: bool = False) -> RoundSummary | None:
    """The measured round with the finest resolution, or ``None``; ``validated``: by the resolution with poses
    re-estimated (the earliest on a tie). With the given poses, rounds of the same reported resolution (one
    Fourier shell) are told apart by the interpolated FSC crossing (:func:`interpolated_resolution`), then by
    their maps' information (:func:`information`), then the earliest."""
    def resolution(summary: RoundSummary) -> float | None:
        return summary.validated_resolution_angstrom if validated else summary.resolution_angstrom

    measured = [summary for summary in rounds if (value := resolution(summary)) is not None and math.isfinite(value)]
    if not measured:
        return None
    if validated:
        return min(measured, key=lambda summary: (resolution(summary) or math.inf, summary.iteration))

    def rank(summary: RoundSummary) -> tuple[float, float, float, int]:
        crossing = interpolated_resolution(summary)
        content = information(summary)
        return (resolution(summary) or math.inf, crossing if crossing is not None else math.inf,
                -(content if content is not None else 0.0), summary.iteration)

    return min(measured, key=rank)


def chosen_round(rounds: Sequence[RoundSummary]) -> RoundSummary | None:
    """The run's best round: by the resolution with poses re-estimated where any was measured, else by the
    resolution with the given poses (optimistic)."""
    return best_round(rounds, validated=True) or best_round(rounds)


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save_png(figure: Figure, path: Path) -> None:
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(str(temporary), format="png")


def _made_best(summary: RoundSummary, chosen: RoundSummary | None) -> str:
    """`` (made the best set)`` for the sieve of set ``i`` when set ``i + 1`` is the best set."""
    return " (made the best set)" if chosen is not None and chosen.iteration == summary.iteration + 1 else ""


def plot_resolution(rounds: Sequence[RoundSummary], path: Path) -> None:
    """Resolution (Å) and B-factor (Å^2) against iteration and against the number of particles."""
    measured = [summary for summary in rounds
                if summary.resolution_angstrom is not None or summary.validated_resolution_angstrom is not None]

    def column(name: str) -> np.ndarray:
        return np.array([math.nan if getattr(summary, name) is None else getattr(summary, name)
                         for summary in measured], dtype=np.float64)

    iterations = column("iteration")
    particles = column("particles")
    validated = bool(np.isfinite(column("validated_resolution_angstrom")).any())
    chosen = chosen_round(rounds)
    figure = _new_figure(10.0, 7.0)
    panels = ((iterations, "resolution", "iteration", "resolution (Å)"),
              (particles, "resolution", "particles", "resolution (Å)"),
              (iterations, "bfactor", "iteration", "B-factor (Å²)"),
              (particles, "bfactor", "particles", "B-factor (Å²)"))
    for index, (x, quantity, x_label, y_label) in enumerate(panels):
        axes = figure.add_subplot(2, 2, index + 1)
        given = column("resolution_angstrom" if quantity == "resolution" else "bfactor")
        axes.plot(x, given, marker="o", label="given poses")
        if validated:
            again = column("validated_resolution_angstrom" if quantity == "resolution" else "validated_bfactor")
            axes.plot(x, again, marker="s", label="poses re-estimated")
            axes.legend(fontsize="small")
        for label, x_value, y_value in zip(iterations.astype(int), x, given, strict=True):
            if x_label == "particles" and math.isfinite(y_value):
                axes.annotate(str(label), (x_value, y_value), textcoords="offset points", xytext=(4, 4),
                              fontsize="small")
        if chosen is not None:  # the best round, in every panel
            at = chosen.iteration if x_label == "iteration" else chosen.particles
            axes.axvline(at, color="tab:green", linestyle=":", linewidth=1.2, label=f"best: iter {chosen.iteration}")
            axes.legend(fontsize="small")
        axes.set_xlabel(x_label)
        axes.set_ylabel(y_label)
        from matplotlib.ticker import MaxNLocator

        # few, whole ticks: particle counts of five digits and more would otherwise run into each other
        axes.xaxis.set_major_locator(MaxNLocator(nbins=5 if x_label == "particles" else "auto", integer=True))
        if x_label == "particles" and len(x) > 1:
            axes.invert_xaxis()  # rounds go from many to few particles
        axes.grid(True, alpha=0.3)
    _save_png(figure, path)


def plot_scores(rounds: Sequence[RoundSummary], path: Path) -> None:
    """Histogram of the scores of each sieve per half-set, the cut (largest kept score) marked."""
    sieved = [summary for summary in rounds if summary.scores is not None]
    chosen = chosen_round(rounds)
    count = max(len(sieved), 1)
    columns = min(count, 3)
    rows = math.ceil(count / columns)
    figure = _new_figure(4.0 * columns, 3.2 * rows)
    colours = {1: "tab:blue", 2: "tab:orange"}
    for index, summary in enumerate(sieved):
        axes = figure.add_subplot(rows, columns, index + 1)
        assert summary.scores is not None and summary.half_set is not None and summary.kept is not None
        finite = np.isfinite(summary.scores)
        edges: list[float] | int = (np.histogram_bin_edges(summary.scores[finite], bins=50).tolist()
                                    if finite.any() else 10)
        for subset in sorted(set(summary.half_set.tolist())):
            members = (summary.half_set == subset) & finite
            colour = colours.get(subset)
            axes.hist(summary.scores[members], bins=edges, histtype="step", color=colour, label=f"half {subset}")
            kept = members & summary.kept
            if kept.any() and not kept[members].all():
                axes.axvline(float(summary.scores[kept].max()), color=colour, linestyle="--", linewidth=1.0)
        made = _made_best(summary, chosen)
        auto = f" (auto {summary.retention_ratio:.2f})" if summary.retention_curve is not None \
            and summary.retention_ratio is not None else ""
        axes.set_title(f"sieve of set {summary.iteration}{made}: cut-off {summary.cutoff_angstrom:.2f} Å,\n"
                       f"kept {int(summary.kept.sum())}/{len(summary.kept)}{auto}", fontsize="small")
        axes.set_xlabel("score (lower is kept)")
        axes.set_ylabel("particles")
        axes.legend(fontsize="x-small")
    if not sieved:
        axes = figure.add_subplot(1, 1, 1)
        axes.text(0.5, 0.5, "no sieve yet", ha="center", va="center")
        axes.set_axis_off()
    _save_png(figure, path)


def plot_retention(rounds: Sequence[RoundSummary], path: Path) -> None:
    """For every sieve with an automatic retention ratio, the map information of each candidate fraction relative
    to its largest (:mod:`cryosieve.retention`), the chosen fraction marked."""
    chosen_set = chosen_round(rounds)
    figure = _new_figure(7.0, 4.5)
    axes = figure.add_subplot(1, 1, 1)
    for summary in rounds:
        if summary.retention_curve is None:
            continue
        fractions, information = summary.retention_curve
        relative = information / np.max(information)
        made = _made_best(summary, chosen_set)
        line = axes.plot(fractions, relative, marker=".", label=f"sieve of set {summary.iteration}{made}: "
                         f"{summary.retention_ratio:.2f} kept")[0]
        pick = int(np.argmax(information))
        axes.plot([fractions[pick]], [relative[pick]], marker="o", markersize=9, markerfacecolor="none",
                  color=line.get_color())
    axes.set_xlabel("fraction of each half-set kept (lowest scores first)")
    axes.set_ylabel("map information / largest")
    axes.set_title("Automatic retention ratio: information of the half maps", fontsize="small")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="x-small")
    _save_png(figure, path)


def plot_all_fsc(rounds: Sequence[RoundSummary], path: Path) -> None:
    """Corrected FSC of every round overlaid (:func:`cryosieve.plots.plot_fsc_curves`)."""
    curves = {}
    chosen = chosen_round(rounds)
    for summary in rounds:
        if summary.fsc_frequency is None or summary.fsc_corrected is None:
            continue
        mark = " (best)" if chosen is not None and chosen.iteration == summary.iteration else ""
        curves[f"iter {summary.iteration}{mark}: {summary.resolution_angstrom:.2f} Å, {summary.particles} "
               "particles"] = (summary.fsc_frequency, summary.fsc_corrected)
    best = best_round(rounds)
    with atomic_path(path) as temporary:
        from cryosieve.plots import plot_fsc_curves

        plot_fsc_curves(curves, temporary, threshold=0.143,
                        resolution=best.resolution_angstrom if best is not None else None,
                        title="Corrected FSC of every round")


def plot_angles(rounds: Sequence[RoundSummary], path: Path) -> None:
    """For every sieve, the viewing directions of the kept and of the sieved particles over the equal-area bins of
    :mod:`cryosieve.selection` (rows: cos(tilt), columns: rot), with the fraction of depleted views."""
    from cryosieve.selection import COS_BINS, ROT_BINS

    sieved = [summary for summary in rounds if summary.kept is not None and summary.view_bins is not None]
    chosen = chosen_round(rounds)
    rows = max(len(sieved), 1)
    figure = _new_figure(9.0, 2.4 * rows)
    for row, summary in enumerate(sieved):
        assert summary.kept is not None and summary.view_bins is not None
        made = _made_best(summary, chosen)
        for column, (label, members) in enumerate((("kept", summary.kept), ("sieved", ~summary.kept))):
            axes = figure.add_subplot(rows, 2, 2 * row + column + 1)
            counts = np.bincount(summary.view_bins[members], minlength=ROT_BINS * COS_BINS)
            image = axes.imshow(counts.reshape(COS_BINS, ROT_BINS), aspect="auto", cmap="viridis",
                                extent=(-180.0, 180.0, -1.0, 1.0))
            figure.colorbar(image, ax=axes, label="particles")
            depleted = "" if summary.depleted_views is None or not math.isfinite(summary.depleted_views) else \
                f"; depleted views {summary.depleted_views:.0%}"
            axes.set_title(f"sieve of set {summary.iteration}{made}: {label} {int(members.sum())}{depleted}",
                           fontsize="small")
            axes.set_xlabel("rot (°)")
            axes.set_ylabel("cos(tilt)")
    if not sieved:
        axes = figure.add_subplot(1, 1, 1)
        axes.text(0.5, 0.5, "no sieve yet", ha="center", va="center")
        axes.set_axis_off()
    _save_png(figure, path)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _cell(value: float | int | None, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def render_html(rounds: Sequence[RoundSummary], paths: ReportPaths, title: str, validation: str = "none",
                notes: Sequence[str] = (), run: Mapping[str, str] | None = None) -> str:
    """The report page: the run (version, command, inputs), why it ended, the best round, the summary table (ties
    and one-shell differences marked) and the plots embedded. ``validation``: what re-estimated the poses of each
    set (``"none"``: nothing); ``notes``: further lines (text); ``run``: facts of the run, shown first."""
    best = best_round(rounds)
    best_validated = best_round(rounds, validated=True)
    lines = [
        "<!DOCTYPE html>", "<html lang=\"en\">", "<head>", "<meta charset=\"utf-8\">",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:4px 10px;text-align:right}"
        "table.run td,table.run th{text-align:left}code{word-break:break-all}"
        "tr.best{background:#e6f4e6;font-weight:bold}tr.tie{background:#f4f4dc}img{max-width:100%;margin:1em 0}"
        "</style>", "</head>", "<body>", f"<h1>{html.escape(title)}</h1>",
    ]
    if run:
        lines.append("<table class=\"run\">")
        lines += [f"<tr><th>{html.escape(key)}</th><td><code>{html.escape(value)}</code></td></tr>"
                  for key, value in run.items()]
        lines.append("</table>")
    lines += [f"<p>{html.escape(note)}</p>" for note in notes]
    if best is not None:
        lines.append(
            f"<p class=\"best\">Best resolution with the given poses: <b>{best.resolution_angstrom:.2f} Å</b> at "
            f"iteration <b>{best.iteration}</b> ({best.particles} particles: {best.particles_half1} + "
            f"{best.particles_half2}; B-factor {_cell(best.bfactor, 1)} Å²). It is optimistic: those poses were "
            "found with the particles sieved since.</p>")
        ties = [summary.iteration for summary in rounds if summary is not best
                and shells_between(summary, best) is not None and (shells_between(summary, best) or 0.0) <= 1.0]
        if ties:
            lines.append(
                f"<p>Within one Fourier shell of the best (iterations {', '.join(map(str, ties))}): the resolution "
                "cannot tell these rounds apart at this box and pixel size. They are ranked by where the corrected "
                "FSC crosses 0.143 between shells, then by the information of their half maps, "
                "sum over shells of N ln(1 + 2 FSC / (1 - FSC)).</p>")
    else:
        lines.append("<p>No round post-processed yet.</p>")
    lines.append(f"<p>Poses re-estimated (<code>--validate</code>): <b>{html.escape(validation)}</b>.</p>")
    if best_validated is not None:
        lines.append(
            f"<p class=\"best\">Best resolution with poses re-estimated: "
            f"<b>{best_validated.validated_resolution_angstrom:.2f} Å</b> at iteration "
            f"<b>{best_validated.iteration}</b> ({best_validated.particles} particles).</p>")
    validated = any(summary.validated_resolution_angstrom is not None for summary in rounds)
    rh = any(summary.rh_bfactor is not None for summary in rounds)
    realigned = any(summary.realigned_moved is not None for summary in rounds)
    if realigned:
        lines.append("<p>Poses re-estimated before each sieve (<code>--realign</code>): each set's particles were "
                     "refined locally, each half-set against its own half map, and sieved against the half maps of "
                     "their new poses; the next set carries those poses. A particle counts as moved when it turned "
                     "by more than the finest step of its half-set's search or its origin moved by more than half a "
                     "pixel.</p>")
    header = ("<tr><th>iteration</th><th>cut-off (Å)</th><th>half-set 1</th><th>half-set 2</th><th>particles</th>"
              "<th>resolution (Å)</th><th>FSC crossing, interpolated (Å)</th><th>against the best</th>"
              "<th>B-factor (Å²)</th><th>depleted views</th>")
    if validated:
        header += "<th>resolution, poses re-estimated (Å)</th><th>B-factor, poses re-estimated (Å²)</th>"
    if rh:
        header += ("<th>RH B-factor, fit of CryoSieve (Å², −a: closer to 0 is better)</th>"
                   "<th>RH B-factor, straight line (Å²: lower is better)</th>")
    if realigned:
        header += ("<th>moved by --realign</th><th>median turn (°)</th><th>median origin move (px)</th>"
                   "<th>resolution, realigned (Å)</th>")
    header += "<th>fraction kept by its sieve</th>"
    lines += ["<table>", header + "</tr>"]
    highlight = best_validated if best_validated is not None else best
    for summary in rounds:
        shells = shells_between(summary, best) if best is not None else None
        if highlight is not None and summary.iteration == highlight.iteration:
            row_class, against = " class=\"best\"", "best"
        elif shells is not None and shells <= 0.0:
            row_class, against = " class=\"tie\"", "same shell (tie)"
        elif shells is not None and shells <= 1.0:
            row_class, against = " class=\"tie\"", "one shell coarser"
        else:
            row_class, against = "", "" if shells is None else f"{shells:.0f} shells coarser"
        row = (f"<tr{row_class}><td>{summary.iteration}</td><td>{_cell(summary.cutoff_angstrom, 2)}</td>"
               f"<td>{summary.particles_half1}</td><td>{summary.particles_half2}</td><td>{summary.particles}</td>"
               f"<td>{_cell(summary.resolution_angstrom, 2)}</td><td>{_cell(interpolated_resolution(summary), 3)}"
               f"</td><td>{against}</td><td>{_cell(summary.bfactor, 1)}</td>"
               f"<td>{_cell(summary.depleted_views, 2)}</td>")
        if validated:
            row += (f"<td>{_cell(summary.validated_resolution_angstrom, 2)}</td>"
                    f"<td>{_cell(summary.validated_bfactor, 1)}</td>")
        if rh:
            row += f"<td>{_cell(summary.rh_bfactor, 1)}</td><td>{_cell(summary.rh_bfactor_classical, 1)}</td>"
        if realigned:
            row += (f"<td>{_cell(summary.realigned_moved, 0)}</td><td>{_cell(summary.realigned_median_turn, 2)}</td>"
                    f"<td>{_cell(summary.realigned_median_shift, 2)}</td>"
                    f"<td>{_cell(summary.realigned_resolution_angstrom, 2)}</td>")
        auto = " (auto)" if summary.retention_curve is not None else ""
        row += f"<td>{_cell(summary.retention_ratio, 2)}{auto}</td>"
        lines.append(row + "</tr>")
    lines.append("</table>")
    lines.append("<p>Set <i>i</i> is <code>_iter<i>i</i>.star</code>; its half maps were post-processed for the "
                 "resolution (RELION's: the last shell whose corrected FSC is above 0.143), then sieved at the "
                 "cut-off into set <i>i</i>+1.</p>")
    figures = [("Resolution and B-factor", paths.resolution_plot), ("FSC curves", paths.fsc_plot),
               ("Score distributions", paths.scores_plot)]
    if any(summary.retention_curve is not None for summary in rounds):
        lines.append("<p>Automatic retention ratio: each sieve kept, in each half-set, the fraction of best scores "
                     "whose two half maps (given poses) share the most information, sum over shells of "
                     "N ln(1 + 2 FSC / (1 - FSC)), among 0.10, 0.15, ..., 1.00.</p>")
        figures.append(("Retention ratio chosen", paths.retention_plot))
    figures.append(("Viewing directions of the kept and the sieved particles", paths.angles_plot))
    for heading, path in figures:
        lines += [f"<h2>{heading}</h2>", f"<img alt=\"{heading}\" src=\"{_data_uri(path)}\">"]
    lines += ["</body>", "</html>", ""]
    return "\n".join(lines)


def write_report(prefix: str, rounds: Sequence[RoundSummary], title: str | None = None, *,
                 plots: bool = True, validation: str = "none", notes: Sequence[str] = (),
                 run: Mapping[str, str] | None = None) -> ReportPaths:
    """Write the summary CSV and (``plots``) the plots and the HTML page for ``prefix``; returns their paths
    (``run``, ``notes``: see :func:`render_html`)."""
    paths = report_paths(prefix)
    paths.summary_csv.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(paths.summary_csv) as temporary:
        summary_table(rounds).to_csv(temporary, index=False, float_format="%.6g")
    if not plots:
        return paths
    plot_resolution(rounds, paths.resolution_plot)
    plot_all_fsc(rounds, paths.fsc_plot)
    plot_scores(rounds, paths.scores_plot)
    plot_angles(rounds, paths.angles_plot)
    if any(summary.retention_curve is not None for summary in rounds):
        plot_retention(rounds, paths.retention_plot)
    page = render_html(rounds, paths, title or f"CryoSieve report: {os.path.basename(os.path.normpath(prefix))}",
                       validation, notes, run)
    write_text_atomic(paths.html, page)
    return paths
