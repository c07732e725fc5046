"""``cryosieve-refine --backend relion`` end to end with RELION 3.1's ``relion_refine_mpi``.

Known truth: 400 particles simulated from the bundled PDB 1BD2, box 40 at 4 Å/px, SNR 0.3.
Local searches from the reference made of the particles themselves keep the frame and find
the poses; global searches from a deliberately rotated reference find them in the rotated
frame (no reliance on the given poses); the summary's resolution is the one
``relion_postprocess`` gives for RELION's half maps.

The global refinement takes about a quarter of an hour on two cores, the local one minutes.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from scipy.ndimage import affine_transform
from scipy.spatial.transform import Rotation

from conftest import require
from cryosieve.cli.refine import main as refine_main
from cryosieve.simulate import SimulationSettings, simulate_particles

#: Two real relion_refine_mpi refinements: about 15 minutes on 2 cores.
pytestmark = pytest.mark.slow

BOX, PIXEL = 40, 4.0
#: RELION's MPI runs as root need these; three ranks on two cores need --oversubscribe.
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


@pytest.fixture(scope="module")
def particles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require("relion_refine_mpi")
    require("mpirun")
    folder = tmp_path_factory.mktemp("refine_relion")
    settings = SimulationSettings(num_particles=400, box=BOX, pixel_size=PIXEL, junk_fraction=0.0, snr=0.3,
                                  bfactor_min=0.0, bfactor_max=50.0, seed=3, half_maps=False)
    simulate_particles(folder / "data", settings)
    return folder / "data" / "particles.star"


def rotations(star: Path) -> Rotation:
    """Each particle's rotation (RELION's ZYZ Euler angles), in the order of the file."""
    table = starfile.read(star)["particles"]
    return Rotation.from_euler("ZYZ", table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(), degrees=True)


def pose_errors(truth: Path, refined: Path) -> tuple[np.ndarray, Rotation]:
    """Angle (degrees) between each refined and true pose after the best common rotation of the frame, and
    that rotation."""
    names = starfile.read(truth)["particles"]["rlnImageName"].tolist()
    refined_table = starfile.read(refined)["particles"].set_index("rlnImageName").loc[names]
    true_rotations = rotations(truth)
    found = Rotation.from_euler("ZYZ", refined_table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(),
                                degrees=True)
    # a map turned by Q is seen at poses Q R_i (scipy's active rotations of RELION's Euler angles)
    relative = found * true_rotations.inv()
    frame = relative.mean()
    return np.degrees((relative * frame.inv()).magnitude()), frame


def run_refine(star: Path, out: Path, *extra: str) -> pd.DataFrame:
    os.environ.update(MPI_ENV)
    code = refine_main(["--i", str(star), "--o", str(out), "--directory", str(star.parent), "--relion_refine",
                        "mpirun --oversubscribe -n 3 relion_refine_mpi", "--quiet", *extra])
    assert code == 0
    return pd.read_csv(out)


def relion_postprocess_resolution(half1: Path, half2: Path, mask: Path, folder: Path) -> float:
    relion = require("relion_postprocess")
    folder.mkdir()
    subprocess.run([relion, "--i", str(half1), "--i2", str(half2), "--mask", str(mask), "--angpix", str(PIXEL),
                    "--auto_bfac", "--autob_lowres", "10", "--o", str(folder / "post")], check=True,
                   capture_output=True)
    general = starfile.read(folder / "post.star", always_dict=True)["general"]
    return float(np.asarray(general["rlnFinalResolution"]).ravel()[0])


def test_local_refinement_from_the_particles_own_reference(particles: Path, tmp_path: Path) -> None:
    table = run_refine(particles, tmp_path / "out" / "summary.csv", "--local")
    row = table.iloc[0]
    assert not row["fixed pose"] and row["number of particles"] == 400
    refined = Path(row["alignment3D"])
    assert refined.name == "run_data.star" and refined.is_file()
    assert (refined.parent / "reference.mrc").is_file()  # made of the particles with their given poses
    errors, frame = pose_errors(particles, refined)
    assert np.degrees(frame.magnitude()) < 3  # same frame as the given poses
    assert np.median(errors) < 8 and np.mean(errors < 15) > 0.8, np.percentile(errors, [25, 50, 75])
    check_resolution(row, refined.parent, tmp_path)


def check_resolution(row: pd.Series, job: Path, tmp_path: Path) -> None:
    """The summary's resolution is relion_postprocess's of RELION's half maps with the job's mask, to a shell
    (each randomises phases with its own random numbers)."""
    expected = relion_postprocess_resolution(job / "run_half1_class001_unfil.mrc", job / "run_half2_class001_unfil.mrc",
                                             job / "mask.mrc", tmp_path / "relion_post")
    shell = 1 / (BOX * PIXEL)
    assert abs(1 / row["resolution (A)"] - 1 / expected) <= shell * 1.01, (row["resolution (A)"], expected)


def test_a_rotated_reference_still_converges(particles: Path, tmp_path: Path) -> None:
    """Global searches from a reference turned by 40° about an oblique axis: the poses are found in the turned
    frame, all with the same rotation from the truth."""
    volume = mrcfile.read(particles.parent / "truth.mrc").astype(np.float64)
    turn = Rotation.from_rotvec(np.radians(40) * np.array([1.0, 2.0, 2.0]) / 3.0)
    matrix = turn.as_matrix()
    centre = np.full(3, BOX // 2, dtype=np.float64)
    rotated = affine_transform(volume, matrix, offset=centre - matrix @ centre, order=3)
    reference = tmp_path / "rotated.mrc"
    with mrcfile.new(reference) as handle:
        handle.set_data(rotated.astype(np.float32))
        handle.voxel_size = PIXEL
    table = run_refine(particles, tmp_path / "out" / "summary.csv", "--ref", str(reference))
    row = table.iloc[0]
    refined = Path(row["alignment3D"])
    errors, frame = pose_errors(particles, refined)
    assert abs(np.degrees(frame.magnitude()) - 40) < 5
    assert np.median(errors) < 10 and np.mean(errors < 20) > 0.75, np.percentile(errors, [25, 50, 75])
    check_resolution(row, refined.parent, tmp_path)
