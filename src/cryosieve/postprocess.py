"""Post-processing of two half maps: a stand-in for RELION 3.1's ``relion_postprocess``.

Follows RELION 3.1.3 (``src/postprocessing.cpp`` and ``src/fftw.cpp``) step by step:

1. FSC of the unmasked half maps, and of the half maps multiplied by the mask.
2. Phase randomisation (Chen et al. 2013): from the first shell ``s`` (> 0) where the
   unmasked FSC falls below ``randomize_threshold`` (0.8), every Fourier component of
   radius ``>= s`` of both half maps gets a random phase (amplitudes kept); the
   randomised maps are masked and give ``FSC_rand``.  The corrected FSC is the masked
   FSC for shells ``< s + 2`` and ``(FSC_masked - FSC_rand) / (1 - FSC_rand)`` beyond
   (RELION moves the switch two shells up to avoid artefacts next to ``s``).
3. Final resolution: the last shell before the corrected FSC first falls below 0.143
   (RELION reports that shell's resolution ``box * voxel / shell``).  When the unmasked
   FSC reaches a higher shell, RELION distrusts the mask and falls back to the unmasked
   FSC (unless ``force_mask``).
4. Sharpening of the *unmasked* average of the half maps: FSC weighting
   ``sqrt(2 FSC / (1 + FSC))`` per shell with the corrected FSC (zero from the first
   shell where it falls below 1e-4), then a B-factor ``exp(-B s^2 / 4)`` (``s`` in 1/Å,
   negative ``B`` sharpens).  The automatic B-factor is ``4 x`` the slope of a straight
   line fitted to ln(mean |F|) of the FSC-weighted map against ``s^2`` over the shells
   from ``autob_lowres`` to ``autob_highres`` (0: every shell up to Nyquist whose
   weighted amplitude is non-zero, i.e. up to where the corrected FSC ends).  RELION
   3.1 applies no low-pass filter by default (``--low_pass 0``); ``low_pass < 0``
   filters at the final resolution, ``> 0`` at that resolution in Å, with RELION's
   raised-cosine edge of ``filter_edge_width`` shells.

Shells are RELION's: a Fourier component of the ``(n, n, n // 2 + 1)`` half transform
belongs to shell ``round(|k|)`` (``k`` in cycles per box) and every component of the
half transform counts once.  Transforms are normalised like RELION's (forward divided by
``n^3``), so the Guinier intercepts match RELION's numbers.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryosieve.errors import CryoSieveInputError, setting
from cryosieve.fsc import (
    fourier_shell_correlation,
    fsc_weight,
    shell_count,
    shell_index,
    shell_resolutions,
    shell_sum,
)
from cryosieve.io.atomic import OutputGroup
from cryosieve.io.mrc import Volume, read_volume, write_volume_to
from cryosieve.precision import map_device
from cryosieve.tolerances import pixel_sizes_agree

log = logging.getLogger("cryosieve")

FSC_THRESHOLD = 0.143
FSC_WEIGHT_FLOOR = 1e-4  # RELION stops FSC weighting where the FSC first falls below this
PHASE_RANDOMISED_WARNING = 0.1  # RELION warns when FSC_rand exceeds this at the resolution


# --------------------------------------------------------------------------- data types


@dataclass
class SharpeningResult:
    """The sharpened average map and its Guinier plot.

    Attributes
    ----------
    sharpened:
        ``(n, n, n)`` float32 map: FSC-weighted, B-factor applied, optionally low-pass filtered.
    bfactor:
        B-factor applied, Å^2 (negative sharpens; 0: none).
    bfactor_source:
        ``"auto"`` (fitted), ``"adhoc"`` (given) or ``"none"``.
    guinier:
        One row per shell 0 .. n/2: ``shell``, ``resolution_angstrom``,
        ``inverse_resolution_squared`` (1/Å^2), ``log_amplitude_original`` (ln mean |F| of the
        average map), ``log_amplitude_weighted`` (after FSC weighting),
        ``log_amplitude_sharpened`` (after the B-factor) and ``in_fit`` (bool: used in the
        automatic fit).  Shells with no amplitude hold NaN (RELION writes -99).
    slope, intercept, correlation:
        The straight-line fit of ``log_amplitude_weighted`` against ``inverse_resolution_squared``
        (``correlation`` is RELION's ``ss_xy^2 / (ss_xx ss_yy)``); NaN without an automatic fit.
    fit_lowres, fit_highres:
        Lowest and highest resolution (Å) of the shells in the fit; NaN without one.
    low_pass_resolution:
        Resolution (Å) of the low-pass filter applied, or ``None``.
    """

    sharpened: np.ndarray
    bfactor: float
    bfactor_source: str
    guinier: pd.DataFrame
    slope: float = math.nan
    intercept: float = math.nan
    correlation: float = math.nan
    fit_lowres: float = math.nan
    fit_highres: float = math.nan
    low_pass_resolution: float | None = None


@dataclass
class PostprocessResult:
    """Everything ``relion_postprocess`` reports, for one pair of half maps.

    Attributes
    ----------
    fsc_table:
        One row per shell 0 .. n/2: ``shell``, ``resolution_angstrom`` (``n * voxel / shell``,
        infinite at shell 0), ``fsc_unmasked``, ``fsc_masked``, ``fsc_phase_randomised``
        and ``fsc_corrected`` (the curve the resolution is read from; it equals the unmasked
        FSC when RELION's fallback rejected the mask, see ``mask_used``).
    resolution:
        Final resolution in Å (RELION's per-shell convention).
    bfactor:
        B-factor used for sharpening, Å^2 (negative sharpens; 0: none).
    guinier:
        The Guinier plot, see :class:`SharpeningResult`.
    sharpened:
        ``(n, n, n)`` float32 sharpened average of the half maps (unmasked).
    sharpened_masked:
        ``sharpened`` multiplied by the mask.
    randomise_from_resolution:
        Resolution (Å) of the shell from which phases were randomised.
    """

    fsc_table: pd.DataFrame
    resolution: float
    bfactor: float
    guinier: pd.DataFrame
    sharpened: np.ndarray
    sharpened_masked: np.ndarray
    randomise_from_resolution: float
    resolution_shell: int = 0
    randomise_from_shell: int = 0
    voxel_size: float = 1.0
    box: int = 0
    bfactor_source: str = "none"
    guinier_slope: float = math.nan
    guinier_intercept: float = math.nan
    guinier_correlation: float = math.nan
    fit_lowres: float = math.nan
    fit_highres: float = math.nan
    low_pass_resolution: float | None = None
    mask_used: bool = True
    seed: int = 0
    warnings: list[str] = field(default_factory=list)

    def report(self, voxel_size: float | None = None) -> PostprocessReport:
        """What every post-processing back-end reports (:class:`PostprocessReport`); ``voxel_size``
        (Å) overrides the one recorded."""
        summary = self.summary()
        if voxel_size is not None:
            summary["voxel_size_angstrom"] = float(voxel_size)
        return PostprocessReport(fsc_table=self.fsc_table, guinier=self.guinier, summary=summary,
                                 box=self.box or int(self.sharpened.shape[0]))

    def summary(self) -> dict[str, object]:
        """JSON-ready numbers: resolution, B-factor, fit range, randomisation resolution."""

        def number(value: float | None) -> float | None:
            return None if value is None or not math.isfinite(value) else float(value)

        phase_randomised = self.fsc_table["fsc_phase_randomised"].to_numpy()
        return {
            "final_resolution_angstrom": number(self.resolution),
            "final_resolution_shell": int(self.resolution_shell),
            "bfactor": float(self.bfactor),
            "bfactor_source": self.bfactor_source,
            "bfactor_fit_lowres_angstrom": number(self.fit_lowres),
            "bfactor_fit_highres_angstrom": number(self.fit_highres),
            "guinier_fit_slope": number(self.guinier_slope),
            "guinier_fit_intercept": number(self.guinier_intercept),
            "guinier_fit_correlation": number(self.guinier_correlation),
            "randomise_from_angstrom": number(self.randomise_from_resolution),
            "randomise_from_shell": int(self.randomise_from_shell),
            "fsc_phase_randomised_at_resolution": number(float(phase_randomised[self.resolution_shell])),
            "low_pass_angstrom": number(self.low_pass_resolution),
            "mask_used": bool(self.mask_used),
            "voxel_size_angstrom": float(self.voxel_size),
            "box": int(self.box),
            "seed": int(self.seed),
            "warnings": list(self.warnings),
        }


# --------------------------------------------------------------------------- Fourier helpers


def fourier_transform(volume: torch.Tensor) -> torch.Tensor:
    """RELION-normalised half transform of a real ``(n, n, n)`` map.

    Returns ``(n, n, n // 2 + 1)`` complex128 (forward transform divided by ``n^3``).
    """
    return torch.fft.rfftn(volume.to(torch.float64), dim=(-3, -2, -1), norm="forward")


def inverse_fourier_transform(transform: torch.Tensor, size: int) -> torch.Tensor:
    """Inverse of :func:`fourier_transform`: ``(n, n, n)`` float64 map."""
    return torch.fft.irfftn(transform, s=(size, size, size), dim=(-3, -2, -1), norm="forward")


def squared_radius(size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``|k|^2`` (cycles per box, squared) of each ``(n, n, n // 2 + 1)`` half-transform voxel, float64."""
    k = torch.fft.fftfreq(size, d=1.0 / size, device=device, dtype=torch.float64)
    kx = torch.fft.rfftfreq(size, d=1.0 / size, device=device, dtype=torch.float64)
    return k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2


def relion_fourier_shell_correlation(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """FSC of two ``(n, n, n)`` real maps (:func:`cryosieve.fsc.fourier_shell_correlation`, RELION's
    ``getFSC``): ``(n // 2 + 1,)`` float64."""
    return fourier_shell_correlation(first, second)


def randomise_phases_beyond(volume: torch.Tensor, shell: int, generator: torch.Generator) -> torch.Tensor:
    """Give every Fourier component of radius ``>= shell`` (cycles per box) a random phase.

    Amplitudes are kept exactly; components inside the radius are untouched.  The random
    phases are those of the transform of white Gaussian noise drawn from ``generator``
    (a CPU generator, so results do not depend on the device): they are uniform and
    Hermitian-consistent, so the result is exactly real (RELION draws each stored
    component's phase independently).

    Parameters
    ----------
    volume:
        ``(n, n, n)`` real map.
    shell:
        First randomised radius, cycles per box (RELION's ``randomize_at``).
    generator:
        Seeded ``torch.Generator`` on the CPU; advanced by ``n^3`` normal draws.

    Returns
    -------
    ``(n, n, n)`` float64 map on ``volume``'s device.
    """
    size = volume.shape[-1]
    transform = fourier_transform(volume)
    noise = torch.randn((size, size, size), generator=generator, dtype=torch.float64)
    noise_transform = fourier_transform(noise.to(volume.device))
    noise_amplitude = noise_transform.abs()
    phase = torch.where(noise_amplitude > 0, noise_transform / noise_amplitude.clamp_min(1e-300),
                        torch.ones_like(noise_transform))
    outside = squared_radius(size, volume.device) >= float(shell) ** 2
    randomised = torch.where(outside, transform.abs() * phase, transform)
    return inverse_fourier_transform(randomised, size)


def first_shell_below(fsc: torch.Tensor | np.ndarray, threshold: float) -> int | None:
    """First shell > 0 where ``fsc`` falls below ``threshold`` (RELION's ``randomize_at``), or ``None``."""
    values = np.asarray(fsc.detach().cpu() if isinstance(fsc, torch.Tensor) else fsc, dtype=np.float64)
    below = np.flatnonzero(values[1:] < threshold)
    return int(below[0]) + 1 if below.size else None


def last_shell_above(fsc: torch.Tensor | np.ndarray, threshold: float = FSC_THRESHOLD) -> int:
    """Last shell before ``fsc`` first falls below ``threshold``, counting from shell 0.

    RELION's resolution convention: the reported resolution is ``n * voxel / shell``.
    Returns 0 when shell 0 is already below (no resolution).
    """
    values = np.asarray(fsc.detach().cpu() if isinstance(fsc, torch.Tensor) else fsc, dtype=np.float64)
    below = np.flatnonzero(values < threshold)
    return int(below[0]) - 1 if below.size else len(values) - 1


def corrected_fsc(fsc_masked: np.ndarray, fsc_phase_randomised: np.ndarray,
                  randomise_shell: int) -> np.ndarray:
    """RELION's ``calculateFSCtrue``: the phase-randomisation-corrected FSC.

    ``FSC_masked`` for shells ``< randomise_shell + 2``, else
    ``(FSC_masked - FSC_rand) / (1 - FSC_rand)``; a non-positive value at shell 0 becomes 1
    (in both inputs, as RELION does).  All arrays ``(n // 2 + 1,)`` float64.
    """
    masked = np.array(fsc_masked, dtype=np.float64)
    randomised = np.array(fsc_phase_randomised, dtype=np.float64)
    if masked[0] <= 0:
        masked[0] = 1.0
    if randomised[0] <= 0:
        randomised[0] = 1.0
    shells = np.arange(len(masked))
    with np.errstate(divide="ignore", invalid="ignore"):
        corrected = (masked - randomised) / (1.0 - randomised)
    return np.where(shells < randomise_shell + 2, masked, corrected)


def shell_means_of_amplitude(transform: torch.Tensor, size: int) -> torch.Tensor:
    """Mean ``|F|`` per shell 0 .. n // 2 over the half transform; ``(n // 2 + 1,)`` float64."""
    shells = shell_index(size, transform.device)
    count = shell_count(size)
    total = shell_sum(transform.abs(), shells, count)
    members = shell_sum(torch.ones_like(transform.real), shells, count)
    return total / members.clamp_min(1.0)


def fsc_weighting(transform: torch.Tensor, fsc: np.ndarray, size: int) -> torch.Tensor:
    """RELION's ``applyFscWeighting``: multiply shell ``i`` by :func:`cryosieve.fsc.fsc_weight`,
    and by zero from the first shell where the FSC falls below :data:`FSC_WEIGHT_FLOOR` on.

    ``transform`` is ``(n, n, n // 2 + 1)`` complex; returns a new tensor.
    """
    values = np.asarray(fsc, dtype=np.float64)
    weights = fsc_weight(values)
    below = np.flatnonzero(values < FSC_WEIGHT_FLOOR)
    if below.size:
        weights[int(below[0]):] = 0.0
    table = torch.zeros(size * 2 + 2, dtype=torch.float64, device=transform.device)
    table[: len(weights)] = torch.as_tensor(weights, device=transform.device)
    shells = shell_index(size, transform.device)
    return transform * table[shells.clamp_max(table.numel() - 1)]


def apply_bfactor(transform: torch.Tensor, bfactor: float, size: int, voxel_size: float) -> torch.Tensor:
    """RELION's ``applyBFactorToMap``: multiply by ``exp(-B s^2 / 4)`` up to Nyquist, zero beyond.

    ``s = |k| / (n * voxel)`` in 1/Å; ``bfactor`` in Å^2 (negative sharpens).
    """
    frequency_squared = squared_radius(size, transform.device) / (size * voxel_size) ** 2
    inside = frequency_squared <= (1.0 / (2.0 * voxel_size)) ** 2
    factor = torch.where(inside, torch.exp(-(bfactor / 4.0) * frequency_squared),
                         torch.zeros_like(frequency_squared))
    return transform * factor


def low_pass_filter(transform: torch.Tensor, resolution: float, size: int, voxel_size: float,
                    edge_width: int = 2) -> torch.Tensor:
    """RELION's ``lowPassFilterMap``: raised-cosine low-pass at ``resolution`` Å.

    The filter shell is ``round(n * voxel / resolution)``; the cosine edge runs from
    ``edge_width // 2`` shells below it to as many above (RELION's default width is 2).
    """
    filter_shell = math.floor(size * voxel_size / resolution + 0.5)
    half_width = edge_width // 2
    edge_low = max(0.0, (filter_shell - half_width) / size)
    edge_high = min(float(shell_count(size)), (filter_shell + half_width) / size)
    edge = edge_high - edge_low
    frequency = torch.sqrt(squared_radius(size, transform.device)) / size  # cycles per pixel
    ramp = 0.5 + 0.5 * torch.cos(math.pi * (frequency - edge_low) / edge) if edge > 0 else torch.zeros_like(frequency)
    factor = torch.where(frequency < edge_low, torch.ones_like(frequency),
                         torch.where(frequency > edge_high, torch.zeros_like(frequency), ramp))
    return transform * factor


def fit_straight_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares line ``y = slope x + intercept``; returns ``(slope, intercept, correlation)``.

    ``correlation`` is RELION's ``ss_xy^2 / (ss_xx ss_yy)``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    mean_x, mean_y = x.mean(), y.mean()
    ss_xx = np.sum((x - mean_x) ** 2)
    ss_yy = np.sum((y - mean_y) ** 2)
    ss_xy = np.sum((x - mean_x) * (y - mean_y))
    slope = ss_xy / ss_xx
    intercept = mean_y - slope * mean_x
    correlation = ss_xy ** 2 / (ss_xx * ss_yy) if ss_yy > 0 else 1.0
    return float(slope), float(intercept), float(correlation)


def _log_or_nan(values: torch.Tensor) -> np.ndarray:
    array = values.detach().cpu().numpy()
    with np.errstate(divide="ignore"):
        return np.where(array > 0, np.log(np.maximum(array, 1e-300)), np.nan)


# --------------------------------------------------------------------------- sharpening


def sharpen_map(average: np.ndarray | torch.Tensor, fsc: np.ndarray, voxel_size: float, *,
                resolution: float | None = None, auto_bfactor: bool = True, autob_lowres: float = 10.0,
                autob_highres: float = 0.0, adhoc_bfactor: float | None = None, low_pass: float = 0.0,
                filter_edge_width: int = 2, device: torch.device | str = "cpu") -> SharpeningResult:
    """RELION's ``sharpenMap`` on the average of two half maps.

    Parameters
    ----------
    average:
        ``(n, n, n)`` real map, the (unmasked) average of the half maps.
    fsc:
        ``(n // 2 + 1,)`` FSC used for weighting (the corrected FSC).
    voxel_size:
        Å per voxel.
    resolution:
        Final resolution (Å), used when ``low_pass < 0``.
    auto_bfactor:
        Fit the B-factor to the Guinier plot (ignored when ``adhoc_bfactor`` is given).
    autob_lowres, autob_highres:
        Fit range in Å (``autob_highres = 0``: up to Nyquist, RELION's default).
    adhoc_bfactor:
        Use this B-factor (Å^2, negative sharpens); 0 applies none.
    low_pass:
        0: no low-pass filter (RELION 3.1's default); < 0: at ``resolution``; > 0: at this
        resolution in Å.
    filter_edge_width:
        Width in shells of the raised-cosine edge of the low-pass filter.
    device:
        Where to compute (in float64: the CPU for a device without it, :func:`cryosieve.precision.map_device`).

    Raises
    ------
    CryoSieveInputError
        When the automatic fit has fewer than two shells (option ``--autob_lowres``).
    """
    device = map_device(device)
    volume = torch.as_tensor(average, device=device).to(torch.float64)
    size = volume.shape[-1]
    transform = fourier_transform(volume)
    shells = np.arange(shell_count(size), dtype=np.float64)
    resolutions = shell_resolutions(size, voxel_size)
    inverse_squared = (shells / (size * voxel_size)) ** 2
    original = _log_or_nan(shell_means_of_amplitude(transform, size))

    transform = fsc_weighting(transform, np.asarray(fsc, dtype=np.float64), size)
    weighted = _log_or_nan(shell_means_of_amplitude(transform, size))

    in_fit = np.isfinite(weighted) & (resolutions <= autob_lowres) & (resolutions >= autob_highres)
    slope = intercept = correlation = math.nan
    fit_lowres = fit_highres = math.nan
    if adhoc_bfactor is not None:
        bfactor = float(adhoc_bfactor)
        source = "adhoc" if bfactor != 0 else "none"
        in_fit[:] = False
    elif auto_bfactor:
        if np.count_nonzero(in_fit) < 2:
            raise CryoSieveInputError(
                f"{setting('autob_lowres')} {autob_lowres:g}: "
                f"fewer than two FSC-weighted shells between {autob_lowres:g} Å "
                f"and {'Nyquist' if autob_highres <= 0 else f'{autob_highres:g} Å'} to fit a B-factor to; "
                "lower the resolution limit or give an ad-hoc B-factor")
        slope, intercept, correlation = fit_straight_line(inverse_squared[in_fit], weighted[in_fit])
        bfactor = 4.0 * slope
        source = "auto"
        fit_lowres = float(resolutions[in_fit].max())
        fit_highres = float(resolutions[in_fit].min())
    else:
        bfactor = 0.0
        source = "none"
        in_fit[:] = False

    if bfactor != 0:
        transform = apply_bfactor(transform, bfactor, size, voxel_size)
    sharpened_log = _log_or_nan(shell_means_of_amplitude(transform, size))

    applied_low_pass: float | None = None
    if low_pass != 0:
        target = resolution if low_pass < 0 else low_pass
        if target is None or not math.isfinite(target) or target <= 0:
            raise CryoSieveInputError(f"{setting('low_pass')}: no final resolution to low-pass filter at")
        applied_low_pass = float(target)
        transform = low_pass_filter(transform, applied_low_pass, size, voxel_size, filter_edge_width)

    sharpened = inverse_fourier_transform(transform, size).to(torch.float32).cpu().numpy()
    guinier = pd.DataFrame({
        "shell": shells.astype(np.int64),
        "resolution_angstrom": resolutions,
        "inverse_resolution_squared": inverse_squared,
        "log_amplitude_original": original,
        "log_amplitude_weighted": weighted,
        "log_amplitude_sharpened": sharpened_log,
        "in_fit": in_fit,
    })
    return SharpeningResult(sharpened=sharpened, bfactor=bfactor, bfactor_source=source, guinier=guinier,
                            slope=slope, intercept=intercept, correlation=correlation,
                            fit_lowres=fit_lowres, fit_highres=fit_highres,
                            low_pass_resolution=applied_low_pass)


# --------------------------------------------------------------------------- validation


def check_inputs(half1: np.ndarray, half2: np.ndarray, mask: np.ndarray, voxel_size: float, *,
                 names: tuple[str, str, str] = ("half map 1", "half map 2", "mask"),
                 voxel_option: str = "voxel_size") -> None:
    """Raise :class:`CryoSieveInputError` (one line naming the file/option) for unusable input.

    Half maps must be cubic 3D maps of one shape, the mask of that shape with values in
    [0, 1] (:data:`cryosieve.tolerances.MASK_RANGE`), all finite, and the voxel size positive.
    """
    from cryosieve.mask import check_mask

    if not (isinstance(voxel_size, (int, float)) and math.isfinite(voxel_size) and voxel_size > 0):
        raise CryoSieveInputError(f"{voxel_option}: the voxel size must be a positive number of Å, got {voxel_size}")
    for array, name in zip((half1, half2, mask), names, strict=True):
        if array.ndim != 3 or len(set(array.shape)) != 1:
            raise CryoSieveInputError(f"{name}: expected a cubic 3D map, got shape {array.shape}")
        if array.shape[0] < 4:
            raise CryoSieveInputError(f"{name}: box of {array.shape[0]} voxels is too small")
        if not np.all(np.isfinite(array)):
            raise CryoSieveInputError(f"{name}: map contains NaN or infinite values")
    if half1.shape != half2.shape:
        raise CryoSieveInputError(f"{names[1]}: shape {half2.shape} differs from {names[0]} shape {half1.shape}")
    check_mask(Volume(mask, None, names[2]), half1.shape, against="the half maps")


def check_options(*, auto_bfactor: bool = True, adhoc_bfactor: float | None = None, autob_lowres: float = 10.0,
                  randomize_threshold: float = 0.8, angpix: float | None = None) -> None:
    """Refuse unusable options of :func:`postprocess` before any map is read: both an automatic and a
    given B-factor, a non-positive fit limit (Å) or pixel size (Å), a randomisation threshold outside (0, 1)."""
    if auto_bfactor and adhoc_bfactor is not None and adhoc_bfactor != 0:
        raise CryoSieveInputError(f"{setting('adhoc_bfactor')}: give either {setting('auto_bfactor')} or "
                                  f"{setting('adhoc_bfactor')}, not both")
    if angpix is not None and not (math.isfinite(angpix) and angpix > 0):
        raise CryoSieveInputError(f"{setting('angpix')}: must be a positive pixel size in Å, got {angpix:g}")
    if not autob_lowres > 0:
        raise CryoSieveInputError(
            f"{setting('autob_lowres')}: must be a positive resolution in Å, got {autob_lowres:g}")
    if not 0 < randomize_threshold < 1:
        raise CryoSieveInputError(
            f"{setting('randomize_threshold')}: must lie in (0, 1), got {randomize_threshold:g}")


def read_inputs(half1_path: str | os.PathLike[str], half2_path: str | os.PathLike[str],
                mask_path: str | os.PathLike[str], angpix: float | None = None,
                ) -> tuple[Volume, Volume, Volume, float]:
    """Read and check two half maps and a mask; returns them and the voxel size (Å).

    The voxel size is ``angpix`` when given, else the half maps' header.  Half maps whose
    headers give different voxel sizes, or a mask of another voxel size, are input errors.
    """
    half1, half2 = read_volume(half1_path, what="half map"), read_volume(half2_path, what="half map")
    mask = read_volume(mask_path, what="mask")
    if half1.voxel_size is not None and half2.voxel_size is not None and \
            not pixel_sizes_agree(half1.voxel_size, half2.voxel_size):
        raise CryoSieveInputError(f"{half2.path}: voxel size {half2.voxel_size:g} Å differs from "
                                  f"{half1.path} ({half1.voxel_size:g} Å)")
    if angpix is None:
        voxel = half1.voxel_size if half1.voxel_size is not None else half2.voxel_size
        if voxel is None:
            raise CryoSieveInputError(
                f"{setting('angpix')}: {half1.path} holds no voxel size; give {setting('angpix')}")
        option = f"{half1.path} voxel size"
    else:
        voxel = angpix
        option = setting("angpix")
    check_inputs(half1.data, half2.data, mask.data, voxel, names=(half1.path, half2.path, mask.path),
                 voxel_option=option)
    if mask.voxel_size is not None and math.isfinite(voxel) and voxel > 0 and \
            not pixel_sizes_agree(mask.voxel_size, voxel):
        raise CryoSieveInputError(f"{mask.path}: voxel size {mask.voxel_size:g} Å differs from the half maps' "
                                  f"{voxel:g} Å")
    return half1, half2, mask, float(voxel)


# --------------------------------------------------------------------------- the whole run


def postprocess(half1: np.ndarray, half2: np.ndarray, mask: np.ndarray, voxel_size: float, *,
                auto_bfactor: bool = True, autob_lowres: float = 10.0, adhoc_bfactor: float | None = None,
                randomize_threshold: float = 0.8, seed: int = 0, device: torch.device | str = "cpu",
                autob_highres: float = 0.0, low_pass: float = 0.0, force_mask: bool = False,
                filter_edge_width: int = 2) -> PostprocessResult:
    """Masked, phase-randomisation-corrected FSC, final resolution and sharpened map, as RELION 3.1.

    Parameters
    ----------
    half1, half2:
        ``(n, n, n)`` real half maps ``[z, y, x]`` (any float dtype; computed in float64).
    mask:
        ``(n, n, n)`` mask with values in [0, 1].
    voxel_size:
        Å per voxel.
    auto_bfactor:
        Fit the sharpening B-factor to the Guinier plot (RELION ``--auto_bfac``).
    autob_lowres:
        Lowest resolution (Å) in the fit (``--autob_lowres``, default 10).
    adhoc_bfactor:
        Use this B-factor instead (Å^2, negative sharpens, ``--adhoc_bfac``); takes precedence
        over ``auto_bfactor``.  0 (or ``auto_bfactor=False`` with ``None``) applies none.
    randomize_threshold:
        Randomise phases from the first shell where the unmasked FSC falls below this (0.8).
    seed:
        Seed of the phase-randomisation generator (same seed, same result on any device).
    device:
        Where to compute.
    autob_highres:
        Highest resolution (Å) in the fit; 0: up to Nyquist (RELION's default).
    low_pass:
        0: no low-pass filter (RELION 3.1's default); < 0: at the final resolution; > 0: in Å.
    force_mask:
        Keep the corrected FSC even when the unmasked FSC reaches a higher shell (RELION
        otherwise falls back to the unmasked FSC).
    filter_edge_width:
        Raised-cosine edge of the low-pass filter, in shells.

    Raises
    ------
    CryoSieveInputError
        Unusable input (shapes, mask range, NaN, voxel size) or half maps whose FSC never
        falls below ``randomize_threshold`` or never exceeds 0.143.
    """
    half1 = np.asarray(half1)
    half2 = np.asarray(half2)
    mask = np.asarray(mask)
    check_inputs(half1, half2, mask, voxel_size)
    check_options(auto_bfactor=False, autob_lowres=autob_lowres, randomize_threshold=randomize_threshold)
    size = half1.shape[0]
    device = map_device(device)  # float64 throughout: the CPU for a device without it
    first = torch.as_tensor(half1, device=device).to(torch.float64)
    second = torch.as_tensor(half2, device=device).to(torch.float64)
    weights = torch.as_tensor(mask, device=device).to(torch.float64)
    warnings: list[str] = []

    fsc_unmasked = relion_fourier_shell_correlation(first, second).cpu().numpy()
    fsc_masked = relion_fourier_shell_correlation(first * weights, second * weights).cpu().numpy()
    randomise_shell = first_shell_below(fsc_unmasked, randomize_threshold)
    if randomise_shell is None:
        raise CryoSieveInputError(
            f"half maps: the unmasked FSC never falls below {setting('randomize_threshold')} {randomize_threshold:g}, "
            "so no shell can be phase-randomised (are the two half maps identical?)")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    random_first = randomise_phases_beyond(first, randomise_shell, generator)
    random_second = randomise_phases_beyond(second, randomise_shell, generator)
    fsc_random = relion_fourier_shell_correlation(random_first * weights, random_second * weights).cpu().numpy()
    del random_first, random_second
    fsc_true = corrected_fsc(fsc_masked, fsc_random, randomise_shell)

    resolution_shell = last_shell_above(fsc_true)
    unmasked_shell = last_shell_above(fsc_unmasked)
    mask_used = True
    if unmasked_shell > resolution_shell:
        if force_mask:
            warnings.append("the unmasked FSC extends beyond the solvent-corrected FSC")
        else:
            warnings.append("the unmasked FSC extends beyond the solvent-corrected FSC: the mask is not used "
                            "for the resolution (adjust the mask, or force it)")
            fsc_true = fsc_unmasked.copy()
            resolution_shell = unmasked_shell
            mask_used = False
    elif fsc_random[resolution_shell] > PHASE_RANDOMISED_WARNING:
        warnings.append("the phase-randomised FSC is larger than 0.10 at the estimated resolution; "
                        "a softer mask would give a more reliable estimate")
    for message in warnings:
        log.warning("postprocess: %s", message)
    if resolution_shell <= 0:
        raise CryoSieveInputError("half maps: the FSC is below 0.143 at every shell; the half maps do not agree")
    resolution = size * voxel_size / resolution_shell

    sharpening = sharpen_map((first + second) * 0.5, fsc_true, voxel_size, resolution=resolution,
                             auto_bfactor=auto_bfactor, autob_lowres=autob_lowres, autob_highres=autob_highres,
                             adhoc_bfactor=adhoc_bfactor, low_pass=low_pass,
                             filter_edge_width=filter_edge_width, device=device)
    sharpened_masked = (sharpening.sharpened.astype(np.float64) * mask).astype(np.float32)

    fsc_table = pd.DataFrame({
        "shell": np.arange(shell_count(size), dtype=np.int64),
        "resolution_angstrom": shell_resolutions(size, voxel_size),
        "fsc_unmasked": fsc_unmasked,
        "fsc_masked": fsc_masked,
        "fsc_phase_randomised": fsc_random,
        "fsc_corrected": fsc_true,
    })
    return PostprocessResult(
        fsc_table=fsc_table, resolution=float(resolution), bfactor=float(sharpening.bfactor),
        guinier=sharpening.guinier, sharpened=sharpening.sharpened, sharpened_masked=sharpened_masked,
        randomise_from_resolution=float(size * voxel_size / randomise_shell),
        resolution_shell=int(resolution_shell), randomise_from_shell=int(randomise_shell),
        voxel_size=float(voxel_size), box=int(size), bfactor_source=sharpening.bfactor_source,
        guinier_slope=sharpening.slope, guinier_intercept=sharpening.intercept,
        guinier_correlation=sharpening.correlation, fit_lowres=sharpening.fit_lowres,
        fit_highres=sharpening.fit_highres, low_pass_resolution=sharpening.low_pass_resolution,
        mask_used=mask_used, seed=int(seed), warnings=warnings,
    )


# --------------------------------------------------------------------------- output


def output_paths(root: str | os.PathLike[str]) -> dict[str, str]:
    """The files :func:`write_postprocess` writes for ``root``."""
    root = str(root)
    return {
        "map": root + ".mrc",
        "masked_map": root + "_masked.mrc",
        "fsc_csv": root + "_fsc.csv",
        "summary": root + ".json",
        "fsc_plot": root + "_fsc.png",
        "guinier_plot": root + "_guinier.png",
    }


def write_postprocess(result: PostprocessResult, root: str, voxel_size: float) -> None:
    """Write ROOT.mrc, ROOT_masked.mrc, ROOT_fsc.csv, ROOT.json, ROOT_fsc.png, ROOT_guinier.png.

    All appear together or not at all.  The CSV holds the FSC table; the JSON the final
    resolution, B-factor, fit range and randomisation resolution (see
    :meth:`PostprocessResult.summary`).
    """
    paths = output_paths(root)
    report = result.report(voxel_size)
    with OutputGroup() as group:
        write_volume_to(group.path_for(paths["map"]), result.sharpened, voxel_size)
        write_volume_to(group.path_for(paths["masked_map"]), result.sharpened_masked, voxel_size)
        write_report_files(report, {key: group.path_for(paths[key]) for key in REPORT_FILES}, voxel_size)


#: The files every post-processing back-end leaves (keys of :func:`output_paths`).
REPORT_FILES = ("fsc_csv", "summary", "fsc_plot", "guinier_plot")


@dataclass
class PostprocessReport:
    """What every post-processing back-end reports, in one form.

    ``fsc_table`` and ``guinier`` as in :class:`PostprocessResult` (the Guinier table's
    ``in_fit`` marks the shells of the B-factor fit); ``summary`` as
    :meth:`PostprocessResult.summary` (``final_resolution_angstrom``, ``bfactor``,
    ``guinier_fit_slope``, ``guinier_fit_intercept``, ...); ``box`` in voxels.
    """

    fsc_table: pd.DataFrame
    guinier: pd.DataFrame
    summary: dict[str, object]
    box: int


def write_report_files(report: PostprocessReport, paths: dict[str, Path], voxel_size: float) -> None:
    """Write ``ROOT_fsc.csv``, ``ROOT.json``, ``ROOT_fsc.png`` and ``ROOT_guinier.png`` to ``paths``
    (keys :data:`REPORT_FILES`; the caller makes them appear atomically)."""
    from cryosieve.plots import plot_fsc_curves, plot_guinier

    table, guinier, summary = report.fsc_table, report.guinier, report.summary
    frequency = table["shell"].to_numpy(dtype=np.float64) / (report.box * voxel_size)
    table.to_csv(paths["fsc_csv"], index=False, float_format="%.8g")
    paths["summary"].write_text(json.dumps(summary, indent=2) + "\n")
    resolution = summary.get("final_resolution_angstrom")
    resolution = float(resolution) if isinstance(resolution, (int, float)) else math.nan
    bfactor = float(summary.get("bfactor") or 0.0)  # type: ignore[arg-type]
    curves = {
        "corrected": (frequency, table["fsc_corrected"].to_numpy()),
        "unmasked": (frequency, table["fsc_unmasked"].to_numpy()),
        "masked": (frequency, table["fsc_masked"].to_numpy()),
        "phase-randomised masked": (frequency, table["fsc_phase_randomised"].to_numpy()),
    }
    plot_fsc_curves(curves, paths["fsc_plot"], threshold=FSC_THRESHOLD, resolution=resolution,
                    title=f"Final resolution = {resolution:.2f} Å")
    fit = None
    slope, intercept = summary.get("guinier_fit_slope"), summary.get("guinier_fit_intercept")
    used = guinier["in_fit"].to_numpy(dtype=bool)
    if isinstance(slope, float) and isinstance(intercept, float) and used.any():
        x_used = guinier["inverse_resolution_squared"].to_numpy()[used]
        fit = (slope, intercept, float(x_used.min()), float(x_used.max()))
    plot_guinier(
        guinier["inverse_resolution_squared"].to_numpy(),
        {"original": guinier["log_amplitude_original"].to_numpy(),
         "FSC-weighted": guinier["log_amplitude_weighted"].to_numpy(),
         "sharpened": guinier["log_amplitude_sharpened"].to_numpy()},
        paths["guinier_plot"], fit=fit, title=f"Guinier plot, B-factor = {bfactor:.1f} Å²")


def postprocess_files(half1_path: str, half2_path: str, mask_path: str, root: str, *, angpix: float | None = None,
                      **options: object) -> PostprocessResult:
    """Post-process from files to files (``cryosieve-postprocess``): :func:`postprocess` of the
    maps read by :func:`read_inputs`, written by :func:`write_postprocess` to ``root.*``.

    Refuses outputs that would land on an input or in an unwritable place before reading
    the maps. ``options`` are :func:`postprocess`'s keywords.
    """
    from cryosieve.io.atomic import remove_stale_temporaries_of
    from cryosieve.io.paths import InputFile, check_distinct_inputs, check_outputs

    if not str(root).strip():
        raise CryoSieveInputError(f"{setting('root')}: empty output root")
    checked = ("auto_bfactor", "adhoc_bfactor", "autob_lowres", "randomize_threshold")
    check_options(angpix=angpix, **{name: value for name, value in options.items()  # type: ignore[arg-type]
                                    if name in checked})
    if options.get("auto_bfactor", True):
        options["adhoc_bfactor"] = None  # the fitted one (a given 0 means none given)
    outputs = list(output_paths(root).values())
    inputs = [InputFile(Path(half1_path), f"{setting('half_map_1')}, first half map"),
              InputFile(Path(half2_path), f"{setting('half_map_2')}, second half map"),
              InputFile(Path(mask_path), setting("mask"))]
    check_outputs(outputs, inputs)
    check_distinct_inputs(inputs)
    half1, half2, mask, voxel = read_inputs(half1_path, half2_path, mask_path, angpix)
    log.info("postprocess: %s and %s, mask %s, %g Å/px, box %d", half1.path, half2.path, mask.path, voxel,
             half1.data.shape[0])
    remove_stale_temporaries_of(outputs)
    result = postprocess(half1.data, half2.data, mask.data, voxel, **options)  # type: ignore[arg-type]
    write_postprocess(result, root, voxel)
    return result
