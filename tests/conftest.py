"""Shared fixtures: known-truth particle data made with RELION's own programs.

``relion_project --ctf`` simulates the particles (with per-particle ``rlnCtfBfactor``
envelopes as the hidden quality truth), and ``relion_reconstruct --ctf true`` makes
noisy half maps from the particles themselves, so every convention in the data is
RELION's, independent of this package.
"""

from __future__ import annotations

import gzip
import inspect
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import gemmi
import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryosieve.particles import ParticleSet

DATA = Path(__file__).resolve().parents[1] / "src" / "cryosieve" / "data"

#: What a test or one of its fixtures calls when it uses RELION's programs as a reference.
RELION_USES = ("relion_project(", "relion_reconstruct(", "relion_postprocess", "relion_refine", "relion_image_handler",
               "require(", "known_truth")


def _uses_relion(function: object) -> bool:
    try:
        source = inspect.getsource(function)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return False
    return any(use in source for use in RELION_USES)


# The commands of this environment (its console scripts, beside its Python) come first on the PATH of every
# command the tests start, whether or not the environment is activated.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``relion`` every test that runs a RELION program, itself or through a fixture
    (``pytest -m "not relion"`` runs the others, without RELION installed)."""
    for item in items:
        functions = [getattr(item, "function", None)]
        info = getattr(item, "_fixtureinfo", None)
        if info is not None:
            functions += [definition.func for definitions in info.name2fixturedefs.values()
                          for definition in definitions]
        if any(_uses_relion(function) for function in functions if function is not None):
            item.add_marker(pytest.mark.relion)


def require(program: str) -> str:
    path = shutil.which(program)
    assert path, f"{program} not found: install RELION (apt-get install relion), as .ci/run does"
    return path


def model_map(model: str, box: int, voxel: float, chains: tuple[str, ...] | None = None) -> np.ndarray:
    """Electron-scattering map of an atomic model (optionally some chains) centred in the box, float32 [z, y, x].

    Sampled directly on the box grid (gemmi), independently of ``cryosieve.simulate``.
    """
    with gzip.open(DATA / model, "rt") as handle:
        structure = gemmi.read_pdb_string(handle.read())
    structure.setup_entities()
    structure.remove_ligands_and_waters()
    structure.remove_hydrogens()
    if chains is not None:
        for name in [chain.name for chain in structure[0] if chain.name not in chains]:
            structure[0].remove_chain(name)
    positions = np.array([atom.pos.tolist() for chain in structure[0] for residue in chain for atom in residue])
    centre = positions.mean(axis=0)
    shift = box * voxel / 2 - centre
    for chain in structure[0]:
        for residue in chain:
            for atom in residue:
                atom.pos = gemmi.Position(*(np.array(atom.pos.tolist()) + shift))
    structure.cell = gemmi.UnitCell(box * voxel, box * voxel, box * voxel, 90, 90, 90)
    structure.spacegroup_hm = "P 1"
    calculator = gemmi.DensityCalculatorE()
    calculator.d_min = 2 * voxel
    calculator.set_grid_cell_and_spacegroup(structure)
    calculator.grid.set_size(box, box, box)
    calculator.grid.fill(0.0)
    calculator.add_model_density_to_grid(structure[0])
    data = np.array(calculator.grid, copy=True).transpose(2, 1, 0)
    return np.ascontiguousarray(data, dtype=np.float32)


def write_map(path: Path, data: np.ndarray, voxel: float) -> None:
    with mrcfile.new(str(path), overwrite=True) as handle:
        handle.set_data(np.ascontiguousarray(data, dtype=np.float32))
        handle.voxel_size = voxel


def optics_table(box: int, voxel: float, group: int = 1, voltage: float = 300.0) -> pd.DataFrame:
    return pd.DataFrame({
        "rlnOpticsGroup": [group], "rlnOpticsGroupName": [f"opticsGroup{group}"],
        "rlnVoltage": [voltage], "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
        "rlnImagePixelSize": [voxel], "rlnImageSize": [box], "rlnImageDimensionality": [2],
    })


def random_particles(count: int, rng: np.random.Generator, voxel: float, stack: str,
                     max_origin_angstrom: float = 6.0) -> pd.DataFrame:
    rot = rng.uniform(-180, 180, count)
    tilt = np.degrees(np.arccos(rng.uniform(-1, 1, count)))
    psi = rng.uniform(-180, 180, count)
    defocus_u = rng.uniform(8000, 25000, count)
    return pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@{stack}" for i in range(count)],
        "rlnAngleRot": rot, "rlnAngleTilt": tilt, "rlnAnglePsi": psi,
        "rlnOriginXAngst": rng.uniform(-max_origin_angstrom, max_origin_angstrom, count),
        "rlnOriginYAngst": rng.uniform(-max_origin_angstrom, max_origin_angstrom, count),
        "rlnDefocusU": defocus_u, "rlnDefocusV": defocus_u - rng.uniform(0, 2000, count),
        "rlnDefocusAngle": rng.uniform(-180, 180, count), "rlnOpticsGroup": 1,
    })


def relion_project(volume: Path, star: Path, output_root: Path, voxel: float) -> Path:
    """Run ``relion_project --ctf``; returns the written stack."""
    subprocess.run([require("relion_project"), "--i", str(volume), "--o", str(output_root), "--ang", str(star),
                    "--ctf", "--angpix", str(voxel)], check=True, capture_output=True)
    return output_root.with_suffix(".mrcs")


def relion_reconstruct(star: Path, output: Path, voxel: float, subset: int | None = None,
                       cwd: Path | None = None, symmetry: str = "C1") -> Path:
    command = [require("relion_reconstruct"), "--i", str(star), "--o", str(output), "--angpix", str(voxel),
               "--ctf", "true", "--sym", symmetry]
    if subset is not None:
        command += ["--subset", str(subset)]
    subprocess.run(command, check=True, capture_output=True, cwd=cwd)
    return output


def soft_sphere_mask(box: int, radius: float, edge: float) -> np.ndarray:
    axis = np.arange(box) - box // 2
    r = np.sqrt(axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2)
    mask = np.clip((radius + edge - r) / edge, 0, 1)
    return (0.5 - 0.5 * np.cos(np.pi * mask)).astype(np.float32)


@dataclass
class KnownTruthData:
    """A simulated final stack: 10 % junk, per-particle B-factors, noisy half maps."""

    folder: Path
    star: Path  # RELION 3.1 STAR with random half-sets, no B-factors
    half1: Path
    half2: Path
    mask: Path
    truth: pd.DataFrame  # rlnImageName, is_junk, bfactor
    voxel: float
    box: int


def build_known_truth(folder: Path, count: int = 2000, box: int = 64, voxel: float = 2.0,
                      junk_fraction: float = 0.1, snr: float = 0.05, seed: int = 7) -> KnownTruthData:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    good_map, junk_map = model_map("1BD2.pdb.gz", box, voxel), model_map("4E43.pdb.gz", box, voxel)
    write_map(folder / "truth.mrc", good_map, voxel)
    write_map(folder / "junk.mrc", junk_map, voxel)
    junk_count = round(junk_fraction * count)
    is_junk = np.zeros(count, dtype=bool)
    is_junk[rng.choice(count, junk_count, replace=False)] = True
    particles = random_particles(count, rng, voxel, "particles.mrcs")
    bfactor = rng.uniform(0, 400, count)
    stacks = []
    for name, source, members in (("good", "truth.mrc", ~is_junk), ("junk", "junk.mrc", is_junk)):
        part = particles[members].reset_index(drop=True).assign(rlnCtfBfactor=bfactor[members])
        starfile.write({"optics": optics_table(box, voxel), "particles": part}, folder / f"{name}_in.star",
                       overwrite=True)
        stacks.append(mrcfile.read(relion_project(folder / source, folder / f"{name}_in.star",
                                                  folder / f"{name}_projected", voxel)))
    images = np.empty((count, box, box), dtype=np.float32)
    images[~is_junk], images[is_junk] = stacks
    signal_variance = images[~is_junk].var()
    images += rng.normal(0, np.sqrt(signal_variance / snr), images.shape).astype(np.float32)
    with mrcfile.new(str(folder / "particles.mrcs"), overwrite=True) as handle:
        handle.set_data(images)
        handle.voxel_size = voxel
    particles["rlnRandomSubset"] = rng.permutation(np.arange(count) % 2 + 1)
    starfile.write({"optics": optics_table(box, voxel), "particles": particles}, folder / "particles.star",
                   overwrite=True)
    for subset in (1, 2):
        relion_reconstruct(folder / "particles.star", folder / f"half{subset}.mrc", voxel, subset, cwd=folder)
    write_map(folder / "mask.mrc", soft_sphere_mask(box, box * 0.4, 4), voxel)
    truth = pd.DataFrame({"rlnImageName": particles["rlnImageName"], "is_junk": is_junk, "bfactor": bfactor})
    truth.to_csv(folder / "truth.csv", index=False)
    return KnownTruthData(folder, folder / "particles.star", folder / "half1.mrc", folder / "half2.mrc",
                          folder / "mask.mrc", truth, voxel, box)


@pytest.fixture(scope="session")
def known_truth(tmp_path_factory: pytest.TempPathFactory) -> KnownTruthData:
    return build_known_truth(tmp_path_factory.mktemp("known_truth"))


def particles_in_memory(count: int, **values: np.ndarray) -> ParticleSet:
    """``count`` particles held in memory only (no file behind them): poses, origins and CTFs from ``values``
    (``(count,)`` arrays by :class:`~cryosieve.particles.ParticleSet` field), zero or RELION's defaults for the
    rest (300 kV, Cs 2.7 mm, amplitude contrast 0.1, 1 Å pixels, no envelope, scale 1)."""
    defaults = {"rot": 0.0, "tilt": 0.0, "psi": 0.0, "origin_x": 0.0, "origin_y": 0.0, "defocus_u": 1e4,
                "defocus_v": 1e4, "defocus_angle": 0.0, "phase_shift": 0.0, "voltage": 300.0,
                "spherical_aberration": 2.7, "amplitude_contrast": 0.1, "pixel_size": 1.0, "ctf_bfactor": 0.0,
                "ctf_scalefactor": 1.0}
    arrays = {name: np.asarray(values.get(name, np.full(count, value)), dtype=np.float64)
              for name, value in defaults.items()}
    return ParticleSet(path="in memory", source=None,  # type: ignore[arg-type]  # nothing to write back
                       image_name=np.array([f"{i + 1}@none" for i in range(count)], dtype=object),
                       image_file=np.array(["none"] * count, dtype=object), image_index=np.arange(count),
                       optics_group=np.ones(count, dtype=np.int64), random_subset=values.get("random_subset"),
                       **arrays)
