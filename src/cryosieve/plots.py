"""Plots of FSC curves and Guinier plots (matplotlib, Agg canvas, no pyplot state).

The functions are general: ``plot_fsc_curves`` overlays any number of named curves (the
four curves of one post-processing, or the corrected FSC of every round of an iterative
run), ``plot_guinier`` any number of ln-amplitude curves with an optional fitted line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

ArrayLike = Sequence[float] | np.ndarray


def shell_frequencies(box: int, voxel_size: float) -> np.ndarray:
    """Spatial frequency (1/Å) of FSC shells 0 .. box // 2: ``shell / (box * voxel_size)``."""
    return np.arange(box // 2 + 1, dtype=np.float64) / (box * voxel_size)


def _resolution_label(frequency: float, _position: int | None = None) -> str:
    """Tick label in Å for a spatial frequency in 1/Å (the top axis of an FSC plot)."""
    return f"{1.0 / frequency:.3g}" if frequency > 0 else "∞"


def _new_figure(width: float = 7.0, height: float = 4.5) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | os.PathLike[str]) -> None:
    figure.tight_layout()
    figure.savefig(str(path), format="png")


def plot_fsc_curves(curves: Mapping[str, tuple[ArrayLike, ArrayLike]], path: str | os.PathLike[str], *,
                    threshold: float | None = 0.143, resolution: float | None = None,
                    title: str | None = None) -> None:
    """Overlay FSC curves against spatial frequency and write a PNG.

    Parameters
    ----------
    curves:
        Label -> ``(frequency, fsc)``: ``frequency`` in 1/Å per shell (see
        :func:`shell_frequencies`), ``fsc`` the values at those shells.  Curves may have
        different lengths (e.g. rounds with different boxes).  Drawn in order; the first
        is drawn thicker.
    path:
        Output PNG path.
    threshold:
        Draw a dashed horizontal line at this FSC (0.143), or ``None``.
    resolution:
        Mark this resolution (Å) with a dotted vertical line, or ``None``.
    title:
        Figure title.
    """
    figure = _new_figure()
    axes = figure.add_subplot(1, 1, 1)
    for index, (label, (frequency, fsc)) in enumerate(curves.items()):
        axes.plot(np.asarray(frequency, dtype=np.float64), np.asarray(fsc, dtype=np.float64),
                  label=label, linewidth=2.2 if index == 0 else 1.2)
    if threshold is not None:
        axes.axhline(threshold, color="grey", linestyle="--", linewidth=1.0, label=f"FSC = {threshold:g}")
    axes.axhline(0.0, color="black", linewidth=0.5)
    if resolution is not None and np.isfinite(resolution) and resolution > 0:
        axes.axvline(1.0 / resolution, color="grey", linestyle=":", linewidth=1.0,
                     label=f"{resolution:.2f} Å")
    axes.set_xlabel("spatial frequency (1/Å)")
    axes.set_ylabel("Fourier shell correlation")
    axes.set_ylim(-0.1, 1.05)
    axes.set_xlim(left=0.0)
    top = axes.secondary_xaxis("top")
    top.xaxis.set_major_formatter(FuncFormatter(_resolution_label))
    top.set_xlabel("resolution (Å)")
    axes.legend(loc="upper right", fontsize="small")
    if title:
        axes.set_title(title)
    _save(figure, path)


def plot_guinier(inverse_resolution_squared: ArrayLike, curves: Mapping[str, ArrayLike],
                 path: str | os.PathLike[str], *, fit: tuple[float, float, float, float] | None = None,
                 title: str | None = None) -> None:
    """Guinier plot: ln(amplitude) against 1/resolution^2 (1/Å^2), written as a PNG.

    Parameters
    ----------
    inverse_resolution_squared:
        ``(m,)`` x values, 1/Å^2.
    curves:
        Label -> ``(m,)`` ln-amplitude values (NaN where a shell has none; not drawn).
    path:
        Output PNG path.
    fit:
        ``(slope, intercept, x_min, x_max)`` of a fitted line to draw over ``[x_min, x_max]``.
    title:
        Figure title.
    """
    x = np.asarray(inverse_resolution_squared, dtype=np.float64)
    figure = _new_figure()
    axes = figure.add_subplot(1, 1, 1)
    for label, values in curves.items():
        y = np.asarray(values, dtype=np.float64)
        shown = np.isfinite(y)
        axes.plot(x[shown], y[shown], label=label, linewidth=1.2)
    if fit is not None:
        slope, intercept, x_min, x_max = fit
        line_x = np.array([x_min, x_max])
        axes.plot(line_x, slope * line_x + intercept, color="black", linestyle="--", linewidth=1.0,
                  label=f"fit: B = {4 * slope:.1f} Å²")
    axes.set_xlabel("1 / resolution² (1/Å²)")
    axes.set_ylabel("ln(amplitude)")
    axes.legend(loc="best", fontsize="small")
    if title:
        axes.set_title(title)
    _save(figure, path)
