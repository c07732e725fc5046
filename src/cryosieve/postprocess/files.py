"""Post-processing from files to files (``cryosieve-postprocess``): the half maps and mask read and
checked (:func:`read_inputs`, :func:`check_inputs`, :func:`check_options`), the outputs a run leaves
(:func:`output_paths`, :func:`write_postprocess`: ``ROOT.mrc``, ``ROOT_masked.mrc``, ``ROOT_fsc.csv``,
``ROOT.json`` and the two plots, all together or none), and the report files every post-processing
back-end leaves (:data:`~cryosieve.postprocess.report.REPORT_FILES`, :func:`write_report_files`). Light: the
computation (:mod:`cryosieve.postprocess.compute`, torch) is loaded once the inputs are checked.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cryosieve.errors import CryoSieveInputError, setting
from cryosieve.io.atomic import OutputGroup
from cryosieve.io.mrc import Volume, read_volume, write_volume_to
from cryosieve.postprocess.report import FSC_THRESHOLD, REPORT_FILES, PostprocessReport
from cryosieve.tolerances import pixel_sizes_agree

if TYPE_CHECKING:
    from cryosieve.postprocess.compute import PostprocessResult

log = logging.getLogger("cryosieve")



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
    from cryosieve.postprocess.compute import postprocess  # torch, once the inputs are checked

    result = postprocess(half1.data, half2.data, mask.data, voxel, **options)  # type: ignore[arg-type]
    write_postprocess(result, root, voxel)
    return result
