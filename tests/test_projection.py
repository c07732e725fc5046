"""Pose, origin and CTF conventions checked against RELION's own ``relion_project``."""

from __future__ import annotations

import math

import mrcfile
import numpy as np
import pandas as pd
import starfile
import torch

from conftest import model_map, optics_table, random_particles, relion_project, write_map
from cryosieve.ctf import ctf_2d
from cryosieve.fourier import image_frequencies
from cryosieve.geometry import euler_to_matrix, matrix_to_euler
from cryosieve.io.star import read_particles
from cryosieve.projection import FourierSliceProjector
from cryosieve.scoring.published import published_quaternions


def our_images(table, volume: np.ndarray) -> torch.Tensor:
    """CTF-modulated projections shifted by -origin, as RELION's particle images."""
    box = volume.shape[-1]
    ky, kx = image_frequencies(box, "cpu")
    inside = (kx**2 + ky**2) < (box / 2) ** 2
    fy, fx = ky[inside], kx[inside]

    def column(values: np.ndarray) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64)

    rotations = euler_to_matrix(column(table.rot), column(table.tilt), column(table.psi))
    slices = FourierSliceProjector(torch.from_numpy(volume), dtype=torch.complex128).sample(rotations, fy, fx)
    pixel = column(table.pixel_size)[:, None]
    ctf = ctf_2d(fx / (box * pixel), fy / (box * pixel), column(table.defocus_u), column(table.defocus_v),
                 column(table.defocus_angle), column(table.voltage), column(table.spherical_aberration),
                 column(table.amplitude_contrast), column(table.phase_shift), column(table.ctf_bfactor),
                 column(table.ctf_scalefactor))
    shift_x = column(table.origin_x)[:, None] + box // 2
    shift_y = column(table.origin_y)[:, None] + box // 2
    phase = torch.exp(2j * math.pi * (fx * shift_x + fy * shift_y) / box)
    full = torch.zeros((len(table), box, box // 2 + 1), dtype=torch.complex128)
    full[:, inside] = ctf * slices * phase
    return torch.fft.irfft2(full, s=(box, box))


def fourier_correlation(first: torch.Tensor, second: torch.Tensor, fraction_of_nyquist: float) -> np.ndarray:
    box = first.shape[-1]
    ky, kx = image_frequencies(box, "cpu")
    keep = (kx**2 + ky**2) <= (fraction_of_nyquist * box / 2) ** 2
    a, b = torch.fft.rfft2(first)[:, keep], torch.fft.rfft2(second)[:, keep]
    return ((a * b.conj()).real.sum(1) / torch.sqrt((a.abs() ** 2).sum(1) * (b.abs() ** 2).sum(1))).numpy()


def test_projection_matches_relion_project(tmp_path):
    box, voxel = 64, 1.5
    rng = np.random.default_rng(3)
    write_map(tmp_path / "map.mrc", model_map("1BD2.pdb.gz", box, voxel), voxel)
    particles = random_particles(24, rng, voxel, "unused.mrcs", max_origin_angstrom=9.0)
    particles["rlnPhaseShift"] = np.where(np.arange(24) % 3 == 0, rng.uniform(0, 120, 24), 0.0)
    particles["rlnOpticsGroup"] = np.arange(24) % 2 + 1
    particles["rlnCtfBfactor"] = np.where(np.arange(24) % 4 == 0, 0.0, rng.uniform(20, 200, 24))
    particles["rlnCtfScalefactor"] = rng.uniform(0.5, 1.5, 24)
    optics = pd.concat([optics_table(box, voxel, 1, 300.0), optics_table(box, voxel, 2, 200.0)],
                       ignore_index=True)
    optics.loc[1, "rlnAmplitudeContrast"] = 0.07
    optics.loc[1, "rlnSphericalAberration"] = 1.4
    starfile.write({"optics": optics, "particles": particles}, tmp_path / "in.star", overwrite=True)
    stack = relion_project(tmp_path / "map.mrc", tmp_path / "in.star", tmp_path / "projected", voxel)
    table = read_particles(tmp_path / "in.star")
    ours = our_images(table, mrcfile.read(tmp_path / "map.mrc"))
    relion = torch.tensor(mrcfile.read(stack), dtype=torch.float64)
    correlation = fourier_correlation(ours, relion, 0.8)
    assert correlation.min() >= 0.99, correlation
    # Same scale too, image by image (RELION and we both use the unnormalised DFT; the envelope and
    # the scale factor change each image's amplitude).
    ratios = (relion.std(dim=(1, 2)) / ours.std(dim=(1, 2))).numpy()
    assert np.all(np.abs(ratios - 1) < 0.02), ratios


def test_origin_sign_is_not_symmetric(tmp_path):
    """The check above must be able to fail: the wrong origin sign decorrelates."""
    box, voxel = 64, 1.5
    rng = np.random.default_rng(4)
    write_map(tmp_path / "map.mrc", model_map("4E43.pdb.gz", box, voxel), voxel)
    particles = random_particles(6, rng, voxel, "unused.mrcs", max_origin_angstrom=9.0)
    particles["rlnOriginXAngst"] = 6.0
    starfile.write({"optics": optics_table(box, voxel), "particles": particles}, tmp_path / "in.star",
                   overwrite=True)
    stack = relion_project(tmp_path / "map.mrc", tmp_path / "in.star", tmp_path / "projected", voxel)
    table = read_particles(tmp_path / "in.star")
    table.origin_x = -table.origin_x
    wrong = our_images(table, mrcfile.read(tmp_path / "map.mrc"))
    relion = torch.tensor(mrcfile.read(stack), dtype=torch.float64)
    assert fourier_correlation(wrong, relion, 0.8).max() < 0.9


def test_euler_matrix_round_trip_and_published_quaternions():
    rng = np.random.default_rng(0)
    rot, tilt, psi = rng.uniform(-180, 180, 50), rng.uniform(1, 179, 50), rng.uniform(-180, 180, 50)
    matrices = euler_to_matrix(*(torch.tensor(v) for v in (rot, tilt, psi))).numpy()
    assert np.allclose(matrices @ matrices.transpose(0, 2, 1), np.eye(3), atol=1e-12)
    back = matrix_to_euler(matrices)
    again = euler_to_matrix(*(torch.tensor(v) for v in back)).numpy()
    assert np.allclose(again, matrices, atol=1e-10)
    # The published quaternion rotation equals RELION's matrix.
    w, x, y, z = published_quaternions(rot, tilt, psi).T
    quaternion_matrix = np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)
    assert np.allclose(quaternion_matrix, matrices, atol=1e-12)
