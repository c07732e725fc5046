"""Electron-scattering maps of atomic models, and the atomic models bundled with the package.

Grid and units as stated in :mod:`cryosieve.simulate`.
"""

from __future__ import annotations

import math
import os

import gemmi
import numpy as np
import torch

from cryosieve.errors import CryoSieveInputError
from cryosieve.fourier import irfftn, raised_cosine, rfftn, squared_radius
from cryosieve.simulate.inputs import DEFAULT_MODEL, bundled_model

# Grid spacing (Å) at or below which the model density is first sampled, before it is
# Fourier-cropped to the requested voxel size (so the map is band-limited, not aliased).
_FINE_SPACING = 1.0


#: Bundled atomic model of the particle (PDB 1BD2) and of the junk (PDB 4E43, HIV protease).
def _read_model(model_path: str) -> gemmi.Structure:
    """The first model of a PDB or mmCIF file (gzip allowed) without waters, ligands and hydrogens.

    Raises :class:`CryoSieveInputError` for a missing or unreadable file, or one with no
    polymer atoms left.
    """
    if not os.path.isfile(model_path):
        raise CryoSieveInputError(f"{model_path}: atomic model file not found")
    try:
        structure = gemmi.read_structure(model_path)
    except Exception as error:  # gemmi raises RuntimeError/ValueError for bad files
        raise CryoSieveInputError(f"{model_path}: not a readable PDB or mmCIF model ({error})") from None
    if len(structure) == 0:
        raise CryoSieveInputError(f"{model_path}: the file holds no model")
    for index in range(len(structure) - 1, 0, -1):  # keep the first model only
        del structure[index]
    structure.setup_entities()
    structure.remove_ligands_and_waters()
    structure.remove_hydrogens()
    structure.remove_empty_chains()
    if structure[0].count_atom_sites() == 0:
        raise CryoSieveInputError(f"{model_path}: no polymer atoms left after removing waters, "
                                  "ligands and hydrogens")
    return structure


def _atom_arrays(model: gemmi.Model) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions ``(a, 3)`` Å, masses ``(a,)`` Dalton (times occupancy), B-factors ``(a,)`` Å^2."""
    positions, masses, bfactors = [], [], []
    for chain in model:
        for residue in chain:
            for atom in residue:
                positions.append(atom.pos.tolist())
                masses.append(atom.element.weight * atom.occ)
                bfactors.append(atom.b_iso)
    return np.asarray(positions), np.asarray(masses), np.asarray(bfactors)


def atomic_model_map(model_path: str | None, box: int, voxel_size: float, *,
                     resolution: float | None = None) -> np.ndarray:
    """Electron-scattering density of an atomic model, centred in a cubic box.

    Waters, ligands and hydrogens are removed (first model only); the model's centre of
    mass is moved to voxel ``box // 2`` along each axis. The density (gemmi's
    ``DensityCalculatorE``: electron scattering factors and the atoms' B-factors) is
    first sampled on a grid of spacing <= 1 Å with a blur that makes that sampling
    alias-free, then Fourier-cropped to ``box`` voxels and un-blurred, so the result is
    the model's density band-limited to the box's Nyquist frequency (no aliasing).

    Parameters
    ----------
    model_path:
        PDB or mmCIF file (gzip allowed); ``None``: the bundled ``1BD2.pdb.gz``.
    box:
        Box size in voxels.
    voxel_size:
        Å per voxel.
    resolution:
        Optional low-pass (Å): Fourier components beyond ``1/resolution`` are removed
        with a raised-cosine edge one Fourier shell wide. ``None``: Nyquist only.

    Returns
    -------
    ``(box, box, box)`` float32 map indexed ``[z, y, x]``.

    Raises
    ------
    CryoSieveInputError
        Unreadable or empty model, bad size, or a model that does not fit in the box
        (an atom within one voxel of a face when centred).
    """
    if box < 2:
        raise CryoSieveInputError(f"box {box}: must be at least 2 voxels")
    if not voxel_size > 0:
        raise CryoSieveInputError(f"voxel size {voxel_size}: must be positive")
    if resolution is not None and not resolution >= 2 * voxel_size:
        raise CryoSieveInputError(
            f"resolution {resolution}: must be at least Nyquist, 2 x voxel size = {2 * voxel_size} Å")
    model_path = bundled_model(DEFAULT_MODEL) if model_path is None else str(model_path)
    structure = _read_model(model_path)
    positions, masses, bfactors = _atom_arrays(structure[0])
    centre_of_mass = (positions * masses[:, None]).sum(axis=0) / masses.sum()
    centre = (box // 2) * voxel_size
    relative = positions - centre_of_mass
    limit = (box / 2 - 1) * voxel_size  # one voxel inside the periodic boundary
    if np.abs(relative).max() > limit:
        extent = np.abs(relative).max()
        raise CryoSieveInputError(
            f"{model_path}: the model reaches {extent:.1f} Å from its centre of mass and does not fit "
            f"in a box of {box} x {voxel_size} Å = {box * voxel_size:.1f} Å")
    shift = gemmi.Position(*(centre - centre_of_mass))
    for chain in structure[0]:
        for residue in chain:
            for atom in residue:
                atom.pos = atom.pos + shift

    factor = max(2, math.ceil(voxel_size / _FINE_SPACING - 1e-9))
    fine_size = box * factor
    fine_spacing = voxel_size / factor
    length = box * voxel_size
    structure.cell = gemmi.UnitCell(length, length, length, 90, 90, 90)
    structure.spacegroup_hm = "P 1"
    calculator = gemmi.DensityCalculatorE()
    calculator.d_min = 2 * fine_spacing
    # gemmi's "refmac-compatible" blur: total B >= 8 pi^2 / 1.1 * spacing^2 samples the
    # Gaussians accurately; it is undone in Fourier space below.
    calculator.blur = max(8 * math.pi**2 / 1.1 * fine_spacing**2 - float(bfactors.min()), 0.0)
    calculator.set_grid_cell_and_spacegroup(structure)
    calculator.grid.set_size(fine_size, fine_size, fine_size)
    calculator.grid.fill(0.0)
    calculator.add_model_density_to_grid(structure[0])
    fine = torch.from_numpy(np.array(calculator.grid, copy=True, dtype=np.float32))  # [x, y, z]
    spectrum = rfftn(fine)
    del fine
    half = box // 2
    rows = torch.cat([torch.arange(0, box - half), torch.arange(fine_size - half, fine_size)])
    cropped = spectrum[rows][:, rows][:, :, : half + 1]
    del spectrum
    radius = torch.sqrt(squared_radius(box, "cpu"))  # cycles per box
    s2 = (radius / length) ** 2  # (1/Å)^2
    weight = torch.exp(calculator.blur * s2 / 4) / factor**3
    if box % 2 == 0:  # drop the unpaired Nyquist planes so the map is exactly band-limited
        weight[half] = 0.0
        weight[:, half] = 0.0
        weight[:, :, half] = 0.0
    if resolution is not None:
        cutoff = length / resolution  # cycles per box
        edge = torch.clamp(radius - (cutoff - 1.0), 0.0, 1.0)
        weight = weight * raised_cosine(edge)
    volume = irfftn(cropped * weight.to(torch.complex64), box)
    return np.ascontiguousarray(volume.numpy().transpose(2, 1, 0), dtype=np.float32)
