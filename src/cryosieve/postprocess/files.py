"""Post-processing from files to files (``cryosieve-postprocess``): the half maps and mask read and
checked (:func:`read_inputs`), the outputs a run leaves (:func:`output_paths`, :func:`write_postprocess`:
``ROOT.mrc``, ``ROOT_masked.mrc``, ``ROOT_fsc.csv``, ``ROOT.json`` and the two plots, all together or
none), and the report files every post-processing back-end leaves (:data:`REPORT_FILES`,
:func:`write_report_files`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np

from cryosieve.errors import CryoSieveInputError, setting
from cryosieve.io.atomic import OutputGroup
from cryosieve.io.mrc import Volume, read_volume, write_volume_to
from cryosieve.postprocess.compute import (
    FSC_THRESHOLD,
    PostprocessReport,
    PostprocessResult,
    check_inputs,
    check_options,
    postprocess,
)
from cryosieve.tolerances import pixel_sizes_agree

log = logging.getLogger("cryosieve")

#: The files every post-processing back-end leaves (keys of :func:`output_paths`).
REPORT_FILES = ("fsc_csv", "summary", "fsc_plot", "guinier_plot")



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
    from cryosieve.io.paths import InputFile, check_outputs

    if not str(root).strip():
        raise CryoSieveInputError(f"{setting('root')}: empty output root")
    checked = ("auto_bfactor", "adhoc_bfactor", "autob_lowres", "randomize_threshold")
    check_options(angpix=angpix, **{name: value for name, value in options.items()  # type: ignore[arg-type]
                                    if name in checked})
    if options.get("auto_bfactor", True):
        options["adhoc_bfactor"] = None  # the fitted one (a given 0 means none given)
    outputs = list(output_paths(root).values())
    check_outputs(outputs, [InputFile(Path(half1_path), f"{setting('half_map_1')}, first half map"),
                            InputFile(Path(half2_path), f"{setting('half_map_2')}, second half map"),
                            InputFile(Path(mask_path), setting("mask"))])
    half1, half2, mask, voxel = read_inputs(half1_path, half2_path, mask_path, angpix)
    log.info("postprocess: %s and %s, mask %s, %g Å/px, box %d", half1.path, half2.path, mask.path, voxel,
             half1.data.shape[0])
    remove_stale_temporaries_of(outputs)
    result = postprocess(half1.data, half2.data, mask.data, voxel, **options)  # type: ignore[arg-type]
    write_postprocess(result, root, voxel)
    return result
