"""A catalogue of bad and unusual inputs against every command.

Each case asserts: the exit code, that the last line of standard error is the one-line
``COMMAND: error: ...`` message naming the culprit, that no traceback appears, that nothing
is left in the output location (no file of the case's folder appears, changes or
disappears: inputs keep their sha256, no temporary is left).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryosieve.cli import core, pipeline, postprocess, reconstruct, simulate
from safety_helpers import (
    PIXEL,
    SmallData,
    copy_data,
    make_small_data,
    patch_int32,
    read_only_folder,
    small_filesystem,
    tree,
    truncate,
)

PROGRAMS: dict[str, Callable[[list[str]], int]] = {
    "cryosieve-core": core.main, "cryosieve": pipeline.main, "cryosieve-reconstruct": reconstruct.main,
    "cryosieve-postprocess": postprocess.main, "cryosieve-simulate": simulate.main,
}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> SmallData:
    return make_small_data(tmp_path_factory.mktemp("small") / "data")


# --------------------------------------------------------------------------- argument lists


def arguments(options: dict[str, object], overrides: dict[str, object]) -> list[str]:
    merged = {**options, **overrides}
    words: list[str] = []
    for key, value in merged.items():
        if value is None:
            continue
        if value is True:
            words.append(key)
            continue
        for item in value if isinstance(value, list) else [value]:
            words += [key, str(item)]
    return [*words, "--quiet"]


def core_args(d: SmallData, w: Path, **overrides: object) -> list[str]:
    return arguments({"--i": d.star, "--o": w / "out" / "kept.star", "--directory": d.folder,
                      "--volume": [d.half1, d.half2], "--mask": d.mask, "--retention_ratio": 0.8,
                      "--frequency": 20, "--device": "cpu"}, overrides)


def reconstruct_args(d: SmallData, w: Path, **overrides: object) -> list[str]:
    return arguments({"--i": d.star, "--o": w / "out" / "map.mrc", "--directory": d.folder, "--ctf": "true",
                      "--device": "cpu"}, overrides)


def postprocess_args(d: SmallData, w: Path, **overrides: object) -> list[str]:
    return arguments({"--i": d.half1, "--i2": d.half2, "--mask": d.mask, "--o": w / "out" / "post",
                      "--auto_bfac": True, "--device": "cpu"}, overrides)


def pipeline_args(d: SmallData, w: Path, **overrides: object) -> list[str]:
    return arguments({"--i": d.star, "--o": str(w / "out") + "/", "--mask": d.mask, "--directory": d.folder,
                      "--num_iters": 2, "--frequency_start": 30, "--frequency_end": 12, "--device": "cpu"},
                     overrides)


def simulate_args(w: Path, **overrides: object) -> list[str]:
    return arguments({"--o": w / "out", "--num_particles": 20, "--box": 32, "--angpix": 3.0,
                      "--no_half_maps": True, "--device": "cpu"}, overrides)


def o(**kwargs: object) -> dict[str, object]:
    """Overrides spelled as options: ``o(**{"--o": x})``."""
    return kwargs


# --------------------------------------------------------------------------- damaging inputs


def star_blocks(d: SmallData) -> dict[str, pd.DataFrame]:
    return starfile.read(d.star, always_dict=True)


def write_star(path: Path, blocks: dict[str, pd.DataFrame]) -> Path:
    starfile.write(blocks, path, float_format="%.12g")
    return path


def with_pixel_origins(d: SmallData, disagree: bool) -> Path:
    blocks = star_blocks(d)
    particles = blocks["particles"]
    particles["rlnOriginX"] = particles["rlnOriginXAngst"] / PIXEL + (1.0 if disagree else 0.0)
    particles["rlnOriginY"] = particles["rlnOriginYAngst"] / PIXEL
    return write_star(d.folder / "both_origins.star", blocks)


def duplicate_column(d: SmallData) -> Path:
    text = d.star.read_text().replace("_rlnAngleTilt #", "_rlnAnglePsi #", 1)
    path = d.folder / "duplicated.star"
    path.write_text(text)
    return path


def set_voxel(path: Path, voxel: float) -> Path:
    with mrcfile.open(str(path), mode="r+") as handle:
        handle.voxel_size = voxel
    return path


def fill_map(path: Path, value: float) -> Path:
    with mrcfile.open(str(path), mode="r+") as handle:
        handle.data[...] = value
    return path


def new_map(path: Path, data: np.ndarray, voxel: float = PIXEL) -> Path:
    with mrcfile.new(str(path), overwrite=True) as handle:
        handle.set_data(data.astype(np.float32))
        handle.voxel_size = voxel
    return path


def relion30(d: SmallData) -> Path:
    blocks = star_blocks(d)
    particles = blocks["particles"].drop(columns=["rlnOpticsGroup"])
    particles["rlnOriginX"] = particles.pop("rlnOriginXAngst") / PIXEL
    particles["rlnOriginY"] = particles.pop("rlnOriginYAngst") / PIXEL
    for name in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"):
        particles[name] = blocks["optics"][name].iloc[0]
    return write_star(d.folder / "relion30.star", {"particles": particles})


def stack_named(d: SmallData, name: str) -> Path:
    """A STAR file whose images are in a copy of the stack called ``name``."""
    shutil.copy(d.stack, d.folder / name)
    blocks = star_blocks(d)
    blocks["particles"]["rlnImageName"] = blocks["particles"]["rlnImageName"].str.replace("particles.mrcs", name)
    return write_star(d.folder / "renamed.star", blocks)


def link(target: Path, name: Path, hard: bool = False) -> Path:
    name.parent.mkdir(parents=True, exist_ok=True)
    if hard:
        os.link(target, name)
    else:
        name.symlink_to(target)
    return name


# --------------------------------------------------------------------------- the catalogue


@dataclass(frozen=True)
class Case:
    program: str
    build: Callable[[SmallData, Path], list[str]]
    code: int
    fragment: str


NYQUIST = 2 * PIXEL
EMPTY_BAND = 2 * PIXEL * 1.0005  # coarser than Nyquist, yet no sample of a 64-pixel image lies in the band

CASES: dict[str, Case] = {
    # ---- cryosieve-core: outputs landing on inputs
    "core_o_is_stack": Case("cryosieve-core", lambda d, w: core_args(d, w, **o(**{"--o": d.stack})), 2,
                            "would overwrite the input"),
    "core_o_is_half_map": Case("cryosieve-core", lambda d, w: core_args(d, w, **o(**{"--o": d.half1})), 2,
                               "would overwrite the input"),
    "core_o_is_input_star": Case("cryosieve-core", lambda d, w: core_args(d, w, **o(**{"--o": d.star})), 2,
                                 "particles.star"),
    "core_o_is_input_star_dot": Case("cryosieve-core",
                                     lambda d, w: core_args(d, w, **o(**{"--o": f"{d.folder}/./particles.star"})),
                                     2, "would overwrite the input"),
    "core_sieved_name_is_input": Case(
        "cryosieve-core",
        lambda d, w: core_args(d, w, **o(**{"--i": shutil.copy(d.star, d.folder / "k_sieved.star"),
                                            "--o": d.folder / "k.star"})), 2, "k_sieved.star"),
    "core_scores_name_is_mask": Case(
        "cryosieve-core",
        lambda d, w: core_args(d, w, **o(**{"--mask": shutil.copy(d.mask, d.folder / "k_scores.csv"),
                                            "--o": d.folder / "k.star"})), 2, "k_scores.csv"),
    "core_o_symlink_to_stack": Case(
        "cryosieve-core", lambda d, w: core_args(d, w, **o(**{"--o": link(d.stack, w / "out" / "kept.star")})), 2,
        "would overwrite the input"),
    "core_o_hard_link_to_mask": Case(
        "cryosieve-core",
        lambda d, w: core_args(d, w, **o(**{"--o": link(d.mask, d.folder / "kept.star", hard=True)})), 2,
        "would overwrite the input"),
    # ---- cryosieve-core: silently wrong results
    "core_origins_disagree": Case(
        "cryosieve-core", lambda d, w: core_args(d, w, **o(**{"--i": with_pixel_origins(d, True)})), 2,
        "rlnOriginX"),
    "core_angpix_conflict": Case("cryosieve-core", lambda d, w: core_args(d, w, **o(**{"--angpix": 1.32})), 2,
                                 "--angpix 1.32"),
    "core_stack_mode_mismatch": Case(
        "cryosieve-core", lambda d, w: (patch_int32(d.stack, 12, 1), core_args(d, w))[1], 2,
        "size does not match its header"),
    "core_stack_complex": Case("cryosieve-core", lambda d, w: (patch_int32(d.stack, 12, 4), core_args(d, w))[1], 2,
                               "complex-valued"),
    "core_stack_truncated": Case("cryosieve-core", lambda d, w: (truncate(d.stack), core_args(d, w))[1], 2,
                                 "truncated: expected"),
    "core_stack_header_too_many": Case(
        "cryosieve-core", lambda d, w: (patch_int32(d.stack, 8, 10_000), core_args(d, w))[1], 2,
        "truncated: expected"),
    "core_frequency_at_nyquist": Case("cryosieve-core", lambda d, w: core_args(d, w, **o(**{"--frequency": NYQUIST})),
                                      2, "Nyquist"),
    "core_frequency_empty_band": Case(
        "cryosieve-core", lambda d, w: core_args(d, w, **o(**{"--frequency": EMPTY_BAND})), 2, "nothing is left"),
    "core_mask_all_zero": Case("cryosieve-core", lambda d, w: (fill_map(d.mask, 0.0), core_args(d, w))[1], 2,
                               "mask is empty"),
    "core_mask_voxel_size": Case("cryosieve-core", lambda d, w: (set_voxel(d.mask, 3.1), core_args(d, w))[1], 2,
                                 "mask.mrc: voxel size"),
    "core_mask_out_of_range": Case("cryosieve-core", lambda d, w: (fill_map(d.mask, 1.5), core_args(d, w))[1], 2,
                                   "[0, 1]"),
    "core_duplicated_column": Case("cryosieve-core",
                                   lambda d, w: core_args(d, w, **o(**{"--i": duplicate_column(d)})), 2,
                                   "rlnAnglePsi appears twice"),
    "core_missing_column": Case(
        "cryosieve-core",
        lambda d, w: core_args(d, w, **o(**{"--i": write_star(d.folder / "x.star", {
            **star_blocks(d), "particles": star_blocks(d)["particles"].drop(columns=["rlnDefocusU"])})})),
        2, "rlnDefocusU"),
    "core_empty_star": Case(
        "cryosieve-core",
        lambda d, w: core_args(d, w, **o(**{"--i": write_star(d.folder / "x.star", {
            **star_blocks(d), "particles": star_blocks(d)["particles"].iloc[:0]})})), 2, "x.star"),
    "core_not_a_star_file": Case(
        "cryosieve-core",
        lambda d, w: core_args(d, w, **o(**{"--i": shutil.copy(d.half1, d.folder / "x.star")})), 2, "x.star"),
    "core_stack_not_found": Case(
        "cryosieve-core", lambda d, w: core_args(d, w, **o(**{"--directory": w})), 2, "--directory"),
    "core_nan_map": Case("cryosieve-core", lambda d, w: (fill_map(d.half2, float("nan")), core_args(d, w))[1], 2,
                         "half2.mrc"),
    "core_map_box": Case(
        "cryosieve-core",
        lambda d, w: core_args(d, w, **o(**{"--volume": [new_map(d.folder / "s.mrc", np.zeros((32,) * 3)), d.half2]})),
        2, "s.mrc"),
    "core_ratio_zero": Case("cryosieve-core", lambda d, w: core_args(d, w, **o(**{"--retention_ratio": 0})), 2,
                            "--retention_ratio"),
    "core_ratio_above_one": Case("cryosieve-core", lambda d, w: core_args(d, w, **o(**{"--retention_ratio": 1.5})),
                                 2, "--retention_ratio"),
    "core_batch_zero": Case("cryosieve-core", lambda d, w: core_args(d, w, **o(**{"--batch_size": 0})), 2,
                            "--batch_size"),
    "core_processes_zero": Case("cryosieve-core", lambda d, w: core_args(d, w, **o(**{"--num_gpus": 0})), 2,
                                "--num_gpus"),
    "core_three_volumes": Case(
        "cryosieve-core", lambda d, w: core_args(d, w, **o(**{"--volume": [d.half1, d.half2, d.half2]})), 2,
        "half-sets"),
    "core_index_beyond_stack": Case(
        "cryosieve-core",
        lambda d, w: core_args(d, w, **o(**{"--i": write_star(d.folder / "x.star", {
            **star_blocks(d), "particles": star_blocks(d)["particles"].assign(
                rlnImageName=lambda frame: frame["rlnImageName"].where(frame.index != 5, "999@particles.mrcs"))})})),
        2, "999@particles.mrcs"),
    "core_index_too_large": Case(
        "cryosieve-core",
        lambda d, w: core_args(d, w, **o(**{"--i": write_star(d.folder / "x.star", {
            **star_blocks(d), "particles": star_blocks(d)["particles"].assign(
                rlnImageName=lambda frame: frame["rlnImageName"].where(
                    frame.index != 5, "99999999999999999999@particles.mrcs"))})})),
        2, "'99999999999999999999@particles.mrcs' at row 6 has an image number beyond any MRC stack"),
    "core_nan_image_found_while_scoring": Case(
        "cryosieve-core", lambda d, w: (fill_image(d.stack, 200, float("nan")), core_args(d, w))[1], 2,
        "000201@particles.mrcs"),
    "core_nan_image_two_processes": Case(
        "cryosieve-core",
        lambda d, w: (fill_image(d.stack, 200, float("nan")), core_args(d, w, **o(**{"--num_gpus": 2})))[1], 2,
        "000201@particles.mrcs"),
    # ---- cryosieve-core: one map given in two roles
    "core_same_half_map_twice": Case(
        "cryosieve-core", lambda d, w: core_args(d, w, **o(**{"--volume": [d.half1, d.half1]})), 2,
        "half1.mrc (--volume 2) is the same file as"),
    "core_half_map_copy": Case(
        "cryosieve-core",
        lambda d, w: core_args(d, w, **o(**{"--volume": [d.half2, shutil.copy(d.half2, d.folder / "c.mrc")]})), 2,
        "c.mrc (--volume 2) holds the same bytes as"),
    "core_mask_is_a_half_map": Case("cryosieve-core", lambda d, w: core_args(d, w, **o(**{"--mask": d.half2})), 2,
                                    "half2.mrc (--mask) is the same file as"),
    "core_mask_links_to_a_half_map": Case(
        "cryosieve-core", lambda d, w: core_args(d, w, **o(**{"--mask": link(d.half1, w / "m.mrc")})), 2,
        "m.mrc (--mask) is the same file as"),
    # ---- cryosieve-core: the environment
    "core_o_is_folder": Case("cryosieve-core",
                             lambda d, w: core_args(d, w, **o(**{"--o": mkdir(w / "out" / "kept.star")})), 2,
                             "taken by a folder"),
    "core_scores_name_is_folder": Case(
        "cryosieve-core", lambda d, w: (mkdir(w / "out" / "kept_scores.csv"), core_args(d, w))[1], 2,
        "taken by a folder"),
    "core_parent_is_file": Case(
        "cryosieve-core", lambda d, w: core_args(d, w, **o(**{"--o": touch(w / "file") / "kept.star"})), 2,
        "not a folder"),
    "core_o_in_proc": Case("cryosieve-core", lambda d, w: core_args(d, w, **o(**{"--o": "/proc/kept.star"})), 2,
                           "/proc"),
    # ---- cryosieve-reconstruct
    "reconstruct_o_is_stack": Case("cryosieve-reconstruct",
                                   lambda d, w: reconstruct_args(d, w, **o(**{"--o": d.stack})), 2,
                                   "would overwrite the input"),
    "reconstruct_o_is_star": Case("cryosieve-reconstruct", lambda d, w: reconstruct_args(d, w, **o(**{"--o": d.star})),
                                  2, "would overwrite the input"),
    "reconstruct_o_is_folder": Case("cryosieve-reconstruct",
                                    lambda d, w: reconstruct_args(d, w, **o(**{"--o": mkdir(w / "out")})), 2,
                                    "taken by a folder"),
    "reconstruct_parent_is_file": Case(
        "cryosieve-reconstruct", lambda d, w: reconstruct_args(d, w, **o(**{"--o": touch(w / "f") / "m.mrc"})), 2,
        "not a folder"),
    "reconstruct_o_in_proc": Case("cryosieve-reconstruct",
                                  lambda d, w: reconstruct_args(d, w, **o(**{"--o": "/proc/m.mrc"})), 2, "/proc"),
    "reconstruct_angpix_conflict": Case("cryosieve-reconstruct",
                                        lambda d, w: reconstruct_args(d, w, **o(**{"--angpix": 1.9})), 2, "--angpix"),
    "reconstruct_unknown_symmetry": Case("cryosieve-reconstruct",
                                         lambda d, w: reconstruct_args(d, w, **o(**{"--sym": "C4v"})), 2, "--sym"),
    "reconstruct_subset_without_half_sets": Case(
        "cryosieve-reconstruct",
        lambda d, w: reconstruct_args(d, w, **o(**{"--subset": 2, "--i": write_star(d.folder / "x.star", {
            **star_blocks(d), "particles": star_blocks(d)["particles"].drop(columns=["rlnRandomSubset"])})})),
        2, "rlnRandomSubset"),
    "reconstruct_truncated_stack": Case("cryosieve-reconstruct",
                                        lambda d, w: (truncate(d.stack, 0.9), reconstruct_args(d, w))[1], 2,
                                        "truncated"),
    "reconstruct_bad_ctf_flag": Case("cryosieve-reconstruct",
                                     lambda d, w: reconstruct_args(d, w, **o(**{"--ctf": "maybe"})), 2, "--ctf"),
    "reconstruct_duplicated_column": Case("cryosieve-reconstruct",
                                          lambda d, w: reconstruct_args(d, w, **o(**{"--i": duplicate_column(d)})), 2,
                                          "appears twice"),
    # ---- cryosieve-postprocess
    "postprocess_root_is_half_map": Case(
        "cryosieve-postprocess", lambda d, w: postprocess_args(d, w, **o(**{"--o": d.folder / "half1"})), 2,
        "would overwrite the input"),
    "postprocess_root_is_mask": Case(
        "cryosieve-postprocess", lambda d, w: postprocess_args(d, w, **o(**{"--o": d.folder / "mask"})), 2,
        "would overwrite the input"),
    "postprocess_masked_name_is_input": Case(
        "cryosieve-postprocess",
        lambda d, w: postprocess_args(d, w, **o(**{"--mask": shutil.copy(d.mask, d.folder / "p_masked.mrc"),
                                                   "--o": d.folder / "p"})), 2, "p_masked.mrc"),
    "postprocess_output_is_folder": Case(
        "cryosieve-postprocess", lambda d, w: (mkdir(w / "out" / "post_fsc.csv"), postprocess_args(d, w))[1], 2,
        "taken by a folder"),
    "postprocess_mask_all_zero": Case("cryosieve-postprocess",
                                      lambda d, w: (fill_map(d.mask, 0.0), postprocess_args(d, w))[1], 2, "empty"),
    "postprocess_mask_voxel_size": Case("cryosieve-postprocess",
                                        lambda d, w: (set_voxel(d.mask, 3.3), postprocess_args(d, w))[1], 2,
                                        "voxel size"),
    "postprocess_half_maps_differ": Case(
        "cryosieve-postprocess",
        lambda d, w: postprocess_args(d, w, **o(**{"--i2": new_map(d.folder / "s.mrc", np.zeros((32,) * 3))})), 2,
        "s.mrc"),
    "postprocess_same_half_maps": Case(
        "cryosieve-postprocess", lambda d, w: postprocess_args(d, w, **o(**{"--i2": d.half1})), 2,
        "(--i2, second half map) is the same file as"),
    "postprocess_half_map_copy": Case(
        "cryosieve-postprocess",
        lambda d, w: postprocess_args(d, w, **o(**{"--i2": shutil.copy(d.half1, d.folder / "c.mrc")})), 2,
        "c.mrc (--i2, second half map) holds the same bytes as"),
    "postprocess_mask_is_a_half_map": Case(
        "cryosieve-postprocess",
        lambda d, w: postprocess_args(d, w, **o(**{"--mask": shutil.copy(d.half2, d.folder / "m.mrc")})), 2,
        "m.mrc (--mask) holds the same bytes as"),
    "postprocess_complex_map": Case("cryosieve-postprocess",
                                    lambda d, w: (patch_int32(d.half1, 12, 4), postprocess_args(d, w))[1], 2,
                                    "complex-valued"),
    "postprocess_truncated_map": Case("cryosieve-postprocess",
                                      lambda d, w: (truncate(d.half2), postprocess_args(d, w))[1], 2, "truncated"),
    "postprocess_both_bfactors": Case(
        "cryosieve-postprocess", lambda d, w: postprocess_args(d, w, **o(**{"--adhoc_bfac": -100})), 2,
        "--adhoc_bfac: give either --auto_bfac or --adhoc_bfac, not both"),
    "postprocess_o_in_proc": Case("cryosieve-postprocess",
                                  lambda d, w: postprocess_args(d, w, **o(**{"--o": "/proc/post"})), 2, "/proc"),
    # ---- cryosieve (the pipeline)
    "pipeline_input_is_a_round": Case(
        "cryosieve",
        lambda d, w: pipeline_args(d, w, **o(**{"--i": shutil.copy(d.star, d.folder / "p_iter1.star"),
                                                "--o": d.folder / "p"})), 2, "p_iter1.star"),
    "pipeline_input_is_round_zero": Case(
        "cryosieve",
        lambda d, w: pipeline_args(d, w, **o(**{"--i": shutil.copy(d.star, mkdir(w / "out") / "_iter0.star")})), 2,
        "would overwrite the input"),
    "pipeline_mask_inside_postprocess_folder": Case(
        "cryosieve",
        lambda d, w: pipeline_args(d, w, **o(**{"--mask": shutil.copy(d.mask, mkdir(w / "out" / "_postprocess_iter1")
                                                                     / "m.mrc")})), 2, "_postprocess_iter1"),
    "pipeline_stack_is_an_output": Case(
        "cryosieve", lambda d, w: pipeline_args(d, w, **o(**{"--i": stack_named(d, "x_iter0_half1.mrc"),
                                                             "--o": d.folder / "x"})), 2, "x_iter0_half1.mrc"),
    "pipeline_relion30_without_angpix": Case(
        "cryosieve", lambda d, w: pipeline_args(d, w, **o(**{"--i": relion30(d)})), 2, "--angpix"),
    "pipeline_angpix_conflict": Case("cryosieve", lambda d, w: pipeline_args(d, w, **o(**{"--angpix": 1.32})), 2,
                                     "--angpix 1.32"),
    "pipeline_o_in_proc": Case("cryosieve", lambda d, w: pipeline_args(d, w, **o(**{"--o": "/proc/x/"})), 2,
                               "/proc"),
    "pipeline_parent_is_file": Case("cryosieve",
                                    lambda d, w: pipeline_args(d, w, **o(**{"--o": str(touch(w / "f")) + "/r"})), 2,
                                    "not a folder"),
    "pipeline_frequency_end_at_nyquist": Case(
        "cryosieve", lambda d, w: pipeline_args(d, w, **o(**{"--frequency_end": NYQUIST})), 2, "Nyquist"),
    "pipeline_mask_all_zero": Case("cryosieve", lambda d, w: (fill_map(d.mask, 0.0), pipeline_args(d, w))[1], 2,
                                   "mask is empty"),
    "pipeline_mask_voxel_size": Case("cryosieve", lambda d, w: (set_voxel(d.mask, 3.0), pipeline_args(d, w))[1], 2,
                                     "voxel size"),
    "pipeline_unknown_symmetry": Case("cryosieve", lambda d, w: pipeline_args(d, w, **o(**{"--sym": "Dnh"})), 2,
                                      "--sym"),
    "pipeline_origins_disagree": Case(
        "cryosieve", lambda d, w: pipeline_args(d, w, **o(**{"--i": with_pixel_origins(d, True)})), 2, "rlnOriginX"),
    "pipeline_truncated_stack": Case("cryosieve", lambda d, w: (truncate(d.stack), pipeline_args(d, w))[1], 2,
                                     "truncated"),
    "pipeline_duplicated_column": Case("cryosieve",
                                       lambda d, w: pipeline_args(d, w, **o(**{"--i": duplicate_column(d)})), 2,
                                       "appears twice"),
    # ---- cryosieve-simulate
    "simulate_o_is_file": Case("cryosieve-simulate", lambda d, w: simulate_args(w, **o(**{"--o": touch(w / "f")})), 2,
                               "not a folder"),
    "simulate_o_not_empty": Case("cryosieve-simulate",
                                 lambda d, w: (touch(mkdir(w / "out") / "x"), simulate_args(w))[1], 2, "--force"),
    "simulate_model_inside_output": Case(
        "cryosieve-simulate",
        lambda d, w: simulate_args(w, **o(**{"--force": True, "--model": bundled_copy(mkdir(w / "out"))})), 2,
        "--model"),
    "simulate_o_in_proc": Case("cryosieve-simulate", lambda d, w: simulate_args(w, **o(**{"--o": "/proc/sim"})), 2,
                               "/proc"),
    "simulate_odd_box": Case("cryosieve-simulate", lambda d, w: simulate_args(w, **o(**{"--box": 33})), 2, "--box"),
}


def fill_image(stack: Path, index: int, value: float) -> None:
    with mrcfile.open(str(stack), mode="r+") as handle:
        handle.data[index, 3, 3] = value


def mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")
    return path


def bundled_copy(folder: Path) -> Path:
    from cryosieve.simulate import DEFAULT_MODEL, bundled_model

    return Path(shutil.copy(bundled_model(DEFAULT_MODEL), folder / "model.pdb.gz"))


def test_catalogue_is_large_and_covers_every_command() -> None:
    assert len(CASES) >= 60
    assert {case.program for case in CASES.values()} == set(PROGRAMS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_catalogue(name: str, small: SmallData, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case = CASES[name]
    data = copy_data(small, tmp_path / "data")
    work = tmp_path / "work"
    work.mkdir()
    argv = case.build(data, work)
    before = tree(tmp_path)
    capsys.readouterr()
    code = PROGRAMS[case.program](argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == case.code, err
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith(f"{case.program}: error: "), err
    assert case.fragment in lines[-1], lines[-1]
    assert tree(tmp_path) == before, "the failed command changed, left or removed files"


# --------------------------------------------------------------------------- accepted unusual input


def test_pixel_origins_in_a_relion31_file_are_used(small: SmallData, tmp_path: Path) -> None:
    """rlnOriginX/Y (pixels) in a 3.1 file give the same scores as rlnOriginX/YAngst; dropping them changes them."""
    data = copy_data(small, tmp_path / "data")
    blocks = star_blocks(data)
    particles = blocks["particles"]
    pixels = particles.assign(rlnOriginX=particles["rlnOriginXAngst"] / PIXEL,
                              rlnOriginY=particles["rlnOriginYAngst"] / PIXEL).drop(
        columns=["rlnOriginXAngst", "rlnOriginYAngst"])
    zero = particles.drop(columns=["rlnOriginXAngst", "rlnOriginYAngst"])
    scores = {}
    for name, frame in (("angst", particles), ("pixels", pixels), ("both", None), ("zero", zero)):
        star = with_pixel_origins(data, False) if frame is None else write_star(data.folder / f"{name}.star",
                                                                                 {**blocks, "particles": frame})
        out = tmp_path / name / "kept.star"
        assert core.main(core_args(data, tmp_path, **o(**{"--i": star, "--o": out}))) == 0
        scores[name] = pd.read_csv(tmp_path / name / "kept_scores.csv")["score"].to_numpy()
    np.testing.assert_allclose(scores["pixels"], scores["angst"], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(scores["both"], scores["angst"], rtol=1e-9, atol=1e-9)
    assert np.max(np.abs(scores["zero"] - scores["angst"])) > 1e-3 * np.max(np.abs(scores["angst"]))


def test_matching_angpix_is_accepted_and_not_required(small: SmallData, tmp_path: Path) -> None:
    data = copy_data(small, tmp_path / "data")
    assert core.main(core_args(data, tmp_path, **o(**{"--angpix": PIXEL, "--o": tmp_path / "a" / "k.star"}))) == 0
    assert core.main(core_args(data, tmp_path, **o(**{"--o": tmp_path / "b" / "k.star"}))) == 0
    assert (tmp_path / "a" / "k_scores.csv").read_bytes() == (tmp_path / "b" / "k_scores.csv").read_bytes()


# --------------------------------------------------------------------------- failures of the machine


def test_read_only_output_folder(small: SmallData, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = copy_data(small, tmp_path / "data")
    folder = tmp_path / "readonly"
    with read_only_folder(folder):
        for program, argv in (
                ("cryosieve-core", core_args(data, tmp_path, **o(**{"--o": folder / "k.star"}))),
                ("cryosieve-reconstruct", reconstruct_args(data, tmp_path, **o(**{"--o": folder / "m.mrc"}))),
                ("cryosieve-postprocess", postprocess_args(data, tmp_path, **o(**{"--o": folder / "p"}))),
                ("cryosieve", pipeline_args(data, tmp_path, **o(**{"--o": str(folder) + "/"}))),
                ("cryosieve-simulate", simulate_args(tmp_path, **o(**{"--o": folder / "sim"})))):
            capsys.readouterr()
            assert PROGRAMS[program](argv) == 2, program
            err = capsys.readouterr().err
            assert "Traceback" not in err
            last = err.strip().splitlines()[-1]
            assert last.startswith(f"{program}: error: ") and str(folder) in last, last
            assert not list(folder.iterdir())


def test_full_disk_while_writing(small: SmallData, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The disk fills while the outputs are written: exit 1, one line naming the output, nothing left."""
    data = copy_data(small, tmp_path / "data")
    folder = tmp_path / "full"
    with small_filesystem(folder, "16k"):
        cases = (("cryosieve-core", core_args(data, tmp_path, **o(**{"--o": folder / "kept.star"})), "kept"),
                 ("cryosieve-reconstruct", reconstruct_args(data, tmp_path, **o(**{"--o": folder / "m.mrc"})),
                  "m.mrc"),
                 ("cryosieve-postprocess", postprocess_args(data, tmp_path, **o(**{"--o": folder / "p"})), "p"))
        for program, argv, name in cases:
            capsys.readouterr()
            assert PROGRAMS[program](argv) == 1, program
            err = capsys.readouterr().err
            assert "Traceback" not in err
            last = err.strip().splitlines()[-1]
            assert last.startswith(f"{program}: error: "), last
            assert "No space left on device" in last and str(folder / name) in last, last
            assert not list(folder.iterdir()), list(folder.iterdir())


@pytest.mark.parametrize("size", ["200k", "400k"])
def test_simulate_on_a_full_disk(tmp_path: Path, size: str) -> None:
    """The stack (20 images of 64 x 64, 321 KiB) does not fit (200k), or it does and the maps do not (400k):
    one line saying so and naming the output, exit 1, nothing left. The stack was written through a memory map,
    and a full disk killed the command with SIGBUS, its partial folder left behind (a subprocess here, so that it
    cannot kill the tests)."""
    import subprocess
    import sys

    folder = tmp_path / "full"
    with small_filesystem(folder, size):
        result = subprocess.run([sys.executable, "-m", "cryosieve.cli.simulate",
                                 *simulate_args(tmp_path, **o(**{"--o": folder / "sim", "--box": 64,
                                                                 "--angpix": PIXEL}))],
                                capture_output=True, text=True)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
        assert lines[0].startswith("cryosieve-simulate: error: "), lines
        assert f"{folder / 'sim'}: No space left on device" in lines[0], lines
        assert not list(folder.iterdir()), list(folder.iterdir())


def test_pipeline_records_the_canonical_symmetry_name_and_the_file_pixel_size(small: SmallData,
                                                                               tmp_path: Path) -> None:
    from cryosieve.pipeline import PipelineSettings, prepare
    from cryosieve.settings import SieveSettings

    settings = PipelineSettings(input_star=str(small.star), output_prefix=f"{tmp_path}/run/", mask=str(small.mask),
                                sieve=SieveSettings(retention_ratio=0.8, highpass_angstrom=30.0),
                                directory=str(small.folder), symmetry="c1", num_iters=2, frequency_start=30,
                                frequency_end=12)
    prepared = prepare(settings)
    assert prepared.record["symmetry"] == "C1"
    assert prepared.record["angpix"] == PIXEL  # from the file: --angpix is not needed for RELION 3.1+
    assert not (tmp_path / "run").exists()


def test_continue_refuses_a_changed_particle_stack(small: SmallData, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A stack changed after a run (its last image, its modification time) is named and the resume refused; the
    same stack resumes; a state without the record is refused. A changed stack was not noticed (a changed STAR
    file was)."""
    import json

    data = copy_data(small, tmp_path / "data")
    argv = pipeline_args(data, tmp_path, **o(**{"--num_iters": 1, "--frequency_start": 20, "--frequency_end": 20,
                                                "--no-report": True}))
    assert pipeline.main(argv) == 0
    assert pipeline.main([*argv, "--continue"]) == 0  # the same stack: nothing to refuse
    capsys.readouterr()
    original, status = data.stack.read_bytes(), data.stack.stat()
    before = tree(tmp_path / "out")
    for change in ("image", "time"):
        if change == "image":  # the last image, at the same size and time
            with mrcfile.open(str(data.stack), mode="r+") as handle:
                handle.data[-1, 5, 5] += 1.0
            os.utime(data.stack, ns=(status.st_atime_ns, status.st_mtime_ns))
        else:  # the same bytes, a new time
            data.stack.write_bytes(original)
        assert pipeline.main([*argv, "--continue"]) == 2, change
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and f"--continue: the particle stack {data.stack} changed" in lines[0], lines
        assert tree(tmp_path / "out") == before
    # a state without the record (edited by hand: every state of this format has it) is refused, naming it
    os.utime(data.stack, ns=(status.st_atime_ns, status.st_mtime_ns))
    state_path = tmp_path / "out" / "_state.json"
    state = json.loads(state_path.read_text())
    del state["arguments"]["particle_stacks"]
    state_path.write_text(json.dumps(state))
    assert pipeline.main([*argv, "--continue"]) == 2
    assert "does not record particle_stacks" in capsys.readouterr().err
