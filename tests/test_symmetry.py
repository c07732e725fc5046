"""Point groups against RELION's own programs.

* The matrices are compared with ``relion_refine --print_symmetry_ops`` (RELION's
  ``SymList``), group by group: a wrong axis, order or orientation fails.
* Maps symmetrised with them are compared with ``relion_image_handler --sym``, which
  checks how the (x, y, z) matrices act on our [z, y, x] arrays; a control shows that a
  slightly mis-oriented group would fail the same comparison.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from conftest import model_map, require, write_map
from cryosieve.errors import CryoSieveInputError
from cryosieve.symmetry import axis_rotation, group_order, symmetrise_volume, symmetry_matrices

GROUPS = ["C1", "C2", "C4", "C7", "C12", "D1", "D2", "D3", "D7", "T", "O", "I", "I1", "I2", "I3", "I4"]
ORDERS = {"C1": 1, "C2": 2, "C4": 4, "C7": 7, "C12": 12, "D1": 2, "D2": 4, "D3": 6, "D7": 14, "T": 12, "O": 24,
          "I": 60, "I1": 60, "I2": 60, "I3": 60, "I4": 60}


def relion_symmetry_operators(name: str) -> np.ndarray:
    """The rotation matrices RELION prints for ``--sym name``, ``(m, 3, 3)``."""
    result = subprocess.run([require("relion_refine"), "--print_symmetry_ops", "--sym", name],
                            capture_output=True, text=True, check=False)
    lines = result.stdout.splitlines()
    matrices = []
    for index, line in enumerate(lines):
        if re.match(r"\s*R\(\d+\)=", line):
            matrices.append([[float(value) for value in lines[index + row].split()] for row in (1, 2, 3)])
    assert matrices, f"relion_refine printed no symmetry operators for {name}: {result.stdout}{result.stderr}"
    return np.array(matrices)


def same_set(ours: np.ndarray, theirs: np.ndarray, tolerance: float) -> bool:
    """Every matrix of each set appears in the other (within ``tolerance``, max abs)."""
    distance = np.abs(ours[:, None] - theirs[None, :]).max(axis=(2, 3))
    return bool((distance.min(axis=1) < tolerance).all() and (distance.min(axis=0) < tolerance).all())


@pytest.mark.parametrize("name", GROUPS)
def test_matrices_match_relion(name: str) -> None:
    ours = symmetry_matrices(name)
    theirs = relion_symmetry_operators(name)
    assert ours.shape == (ORDERS[name], 3, 3) == theirs.shape
    # RELION prints 5-8 significant digits.
    assert same_set(ours, theirs, 1e-4)


def test_a_misoriented_group_does_not_match_relion() -> None:
    """Control: the comparison above detects an orientation error of a few degrees."""
    tilt = axis_rotation(120, (1.0, 2.0, 3.0))  # 3 degrees
    for name in ("D2", "I", "T"):
        ours = symmetry_matrices(name)
        rotated = np.einsum("ij,mjk,lk->mil", tilt, ours, tilt)
        assert not same_set(rotated, relion_symmetry_operators(name), 1e-4)
    # I1 and I3 are other orientations of the same group as I (= I2)
    assert not same_set(symmetry_matrices("I1"), relion_symmetry_operators("I2"), 1e-4)
    assert not same_set(symmetry_matrices("I3"), relion_symmetry_operators("I4"), 1e-4)


@pytest.mark.parametrize("name", GROUPS)
def test_group_properties(name: str) -> None:
    matrices = torch.from_numpy(symmetry_matrices(name))
    assert matrices.dtype == torch.float64
    assert torch.equal(matrices[0], torch.eye(3, dtype=torch.float64))
    assert group_order(name) == ORDERS[name]
    eye = torch.eye(3, dtype=torch.float64).expand_as(matrices)
    assert torch.allclose(matrices @ matrices.transpose(1, 2), eye, atol=1e-12)
    assert torch.allclose(torch.linalg.det(matrices), torch.ones(len(matrices), dtype=torch.float64), atol=1e-12)
    products = (matrices[:, None] @ matrices[None, :]).reshape(-1, 3, 3)
    distance = (products[:, None] - matrices[None, :]).abs().amax(dim=(2, 3))
    assert float(distance.min(dim=1).values.max()) < 1e-12  # closed under multiplication


def test_names_are_case_insensitive() -> None:
    assert np.array_equal(symmetry_matrices("d2"), symmetry_matrices("D2"))
    assert np.array_equal(symmetry_matrices(" c4 "), symmetry_matrices("C4"))
    assert np.array_equal(symmetry_matrices("i"), symmetry_matrices("I2"))


@pytest.mark.parametrize("name", ["XYZ", "C0", "D0", "Cs", "Ci", "C2v", "D2h", "Oh", "I5", "Ih", "C100", ""])
def test_unknown_symmetry_is_an_input_error(name: str) -> None:
    with pytest.raises(CryoSieveInputError, match=rf"^symmetry {re.escape(name)}: unknown symmetry"):
        symmetry_matrices(name)


@pytest.fixture(scope="module")
def asymmetric_map(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("symmetry")
    path = folder / "asymmetric.mrc"
    write_map(path, model_map("1BD2.pdb.gz", 40, 2.5), 2.5)
    return path


def relion_symmetrised(path: Path, name: str) -> np.ndarray:
    output = path.with_name(f"{path.stem}_{name}.mrc")
    subprocess.run([require("relion_image_handler"), "--i", str(path), "--o", str(output), "--sym", name],
                   check=True, capture_output=True)
    return mrcfile.read(output).astype(np.float64)


def correlation(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.corrcoef(first.ravel(), second.ravel())[0, 1])


@pytest.mark.parametrize("name", ["C4", "D2", "D3", "T", "O", "I", "I1", "I3", "I4"])
def test_symmetrised_map_matches_relion_image_handler(asymmetric_map: Path, name: str) -> None:
    theirs = relion_symmetrised(asymmetric_map, name)
    volume = torch.from_numpy(mrcfile.read(asymmetric_map).copy())
    ours = symmetrise_volume(volume, name).numpy()
    # Inside the sphere that every rotated copy samples within the box (RELION and
    # torch's grid_sample treat samples beyond the edge voxels differently).
    size = volume.shape[0]
    axis = np.arange(size) - size // 2
    radius = np.sqrt(axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2)
    inside = radius < size // 2 - 2
    assert np.abs(ours - theirs)[inside].max() < 1e-5 * np.abs(theirs).max()
    # Control: the same group turned by 10 degrees about a generic axis is far off.
    turn = torch.from_numpy(axis_rotation(36, (1.0, 2.0, 3.0)))
    volume_turned_group = torch.zeros_like(volume, dtype=torch.float64)
    matrices = torch.from_numpy(symmetry_matrices(name))
    centre = volume.shape[0] // 2
    axis = torch.arange(volume.shape[0], dtype=torch.float64) - centre
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    points = torch.stack([x, y, z], dim=-1)
    for matrix in matrices:
        position = points @ (turn @ matrix @ turn.T).T + centre
        grid = 2 * position / (volume.shape[0] - 1) - 1
        volume_turned_group += torch.nn.functional.grid_sample(volume.double()[None, None], grid[None],
                                                               align_corners=True)[0, 0]
    volume_turned_group /= len(matrices)
    assert correlation(ours[inside], theirs[inside]) > 0.99999
    turned_error = np.abs(volume_turned_group.numpy() - theirs)[inside].max() / np.abs(theirs).max()
    assert turned_error > 1e-2


@pytest.mark.parametrize("given, canonical", [("c1", "C1"), (" C04 ", "C4"), ("d2", "D2"), ("i", "I"), ("i3", "I3"),
                                              ("o", "O")])
def test_names_are_case_insensitive_and_canonical(given: str, canonical: str) -> None:
    from cryosieve.symmetry import canonical_name

    assert canonical_name(given) == canonical
