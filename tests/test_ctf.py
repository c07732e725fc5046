"""The one CTF: every evaluator against RELION's formula typed independently, the fast sine and
exponential of the kernels against libm, and the scoring model against ``relion_project --ctf``
with per-particle ``rlnCtfBfactor`` and ``rlnCtfScalefactor``."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from conftest import model_map, optics_table, random_particles, relion_project, write_map
from cryosieve import _fastmath
from cryosieve.ctf import CtfParameters


def relion_get_ctf(fx: np.ndarray, fy: np.ndarray, values: dict[str, np.ndarray]) -> np.ndarray:
    """RELION's ``CTF::getCTF`` (``ctf.h``), typed here literally: ``(b, p)`` at ``(b, p)`` frequencies in 1/Å."""
    column = {name: np.asarray(value, dtype=np.float64)[:, None] for name, value in values.items()}
    volts = column["voltage"] * 1000
    wavelength = 12.2643247 / np.sqrt(volts * (1.0 + volts * 0.978466e-6))
    k1 = np.pi * wavelength
    k2 = np.pi / 2 * column["cs"] * 1e7 * wavelength**3
    k3 = np.arctan(column["q0"] / np.sqrt(1 - column["q0"] ** 2))
    k4 = -column["bfactor"] / 4
    k5 = np.deg2rad(column["phase_shift"])
    average = -(column["defocus_u"] + column["defocus_v"]) * 0.5
    deviation = -(column["defocus_u"] - column["defocus_v"]) * 0.5
    u2 = fx * fx + fy * fy
    deltaf = np.where(u2 > 0, average + deviation * np.cos(2 * (np.arctan2(fy, fx) - np.deg2rad(column["angle"]))),
                      0.0)
    return column["scale"] * -np.sin(k1 * deltaf * u2 + k2 * u2 * u2 - k5 - k3) * np.exp(k4 * u2)


def random_values(count: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"defocus_u": rng.uniform(5000, 30000, count), "defocus_v": rng.uniform(4000, 29000, count),
            "angle": rng.uniform(-180, 180, count), "voltage": rng.choice([200.0, 300.0], count),
            "cs": rng.uniform(0.01, 2.7, count), "q0": rng.uniform(0.05, 0.2, count),
            "phase_shift": rng.uniform(0, 90, count), "bfactor": np.where(rng.random(count) < 0.3, 0.0,
                                                                          rng.uniform(-50, 300, count)),
            "scale": rng.uniform(0.3, 2.0, count)}


def parameters(values: dict[str, np.ndarray]) -> CtfParameters:
    return CtfParameters.from_values(values["defocus_u"], values["defocus_v"], values["angle"], values["voltage"],
                                     values["cs"], values["q0"], values["phase_shift"], values["bfactor"],
                                     values["scale"])


def frequencies(count: int, points: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    fx, fy = rng.uniform(-0.5, 0.5, (2, count, points))  # up to Nyquist at 1 Å/px
    fx[:, 0] = fy[:, 0] = 0.0  # zero frequency included
    return fx, fy


def test_evaluate_is_relions_formula_for_arrays_and_tensors() -> None:
    rng = np.random.default_rng(1)
    values = random_values(40, rng)
    fx, fy = frequencies(40, 500, rng)
    expected = relion_get_ctf(fx, fy, values)
    np.testing.assert_allclose(parameters(values).evaluate(fx, fy), expected, rtol=1e-9, atol=1e-12)
    as_tensor = parameters(values).evaluate(torch.from_numpy(fx), torch.from_numpy(fy))
    assert as_tensor.dtype == torch.float64
    np.testing.assert_allclose(as_tensor.numpy(), expected, rtol=1e-9, atol=1e-12)
    single = parameters(values).evaluate(torch.from_numpy(fx).float(), torch.from_numpy(fy).float())
    assert single.dtype == torch.float32  # phases of up to ~1e3 rad: float32 keeps about 1e-4 of them
    np.testing.assert_allclose(single.numpy(), expected, atol=1e-3 * np.abs(expected).max())


@pytest.mark.skipif(not _fastmath.AVAILABLE, reason="numba not installed")
def test_kernel_ctf_value_is_relions_formula() -> None:
    """The per-sample CTF of the numba kernels (scoring and reconstruction) with their cycles-per-box terms."""
    import numba

    from cryosieve.ctf import ctf_value, particle_terms

    @numba.njit
    def evaluate(u2, cos2, sin2, terms, out):  # type: ignore[no-untyped-def]
        for i in range(out.shape[0]):
            particle = particle_terms(terms, i)
            for j in range(out.shape[1]):
                out[i, j] = ctf_value(u2[j], cos2[j], sin2[j], particle)

    rng = np.random.default_rng(2)
    box, count = 96, 30
    values = random_values(count, rng)
    pixel = rng.uniform(0.8, 3.0, count)
    kx = rng.uniform(0, box / 2, 400)
    ky = rng.uniform(-box / 2, box / 2, 400)
    kx[0] = ky[0] = 0.0
    u2 = kx * kx + ky * ky
    safe = np.where(u2 > 0, u2, 1.0)
    cos2 = np.where(u2 > 0, (kx * kx - ky * ky) / safe, 1.0)
    sin2 = np.where(u2 > 0, 2 * kx * ky / safe, 0.0)
    out = np.empty((count, kx.size))
    evaluate(u2, cos2, sin2, parameters(values).kernel_terms(box, pixel), out)
    expected = relion_get_ctf(kx[None] / (box * pixel[:, None]), ky[None] / (box * pixel[:, None]), values)
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-6 * np.abs(values["scale"]).max())


@pytest.mark.skipif(not _fastmath.AVAILABLE, reason="numba not installed")
def test_fast_sine_and_exponential_agree_with_libm() -> None:
    import numba

    @numba.njit
    def evaluate(values, out_sin, out_exp):  # type: ignore[no-untyped-def]
        for i in range(values.size):
            out_sin[i] = _fastmath.fast_sin(values[i])
            out_exp[i] = _fastmath.fast_exp_neg(abs(values[i]) * 0.02)

    values = np.concatenate([np.linspace(-3000.0, 3000.0, 2_000_001), np.arange(-50, 51) * math.pi,
                             np.arange(-50, 51) * math.pi + math.pi / 2])
    out_sin, out_exp = np.empty_like(values), np.empty_like(values)
    evaluate(values, out_sin, out_exp)
    assert np.abs(out_sin - np.sin(values)).max() < 5e-7
    exact = np.exp(-np.abs(values) * 0.02)  # arguments 0 .. 60
    assert np.abs(out_exp / exact - 1).max() < 1e-8
    large = np.empty(3)
    evaluate(np.array([5e3, 5e4, 5e6]), np.empty(3), large)  # exp(-100), exp(-1000), exp(-1e5)
    assert np.all(large >= 0) and large[0] < 1e-40 and np.all(large[1:] < 1e-300)


@pytest.mark.parametrize("engine", ["numba", "torch"])
def test_scores_model_relion_projections_with_envelope_and_scale(tmp_path: Path, engine: str) -> None:
    """Noise-free ``relion_project --ctf`` images with per-particle rlnCtfBfactor and rlnCtfScalefactor are
    the scoring model itself: ||HP(M - I)||^2 ~ 0, so each score is -||HP(I)||^2 (computed here with numpy).
    Ignoring the envelope or the scale would leave a residual of the order of the image."""
    from cryosieve.io.mrc import Volume
    from cryosieve.io.stack import StackReader
    from cryosieve.io.star import read_particles
    from cryosieve.scoring.loop import score_rows
    from cryosieve.settings import SieveSettings

    box, voxel, count, cutoff = 64, 2.0, 24, 12.0
    rng = np.random.default_rng(9)
    write_map(tmp_path / "map.mrc", model_map("1BD2.pdb.gz", box, voxel), voxel)
    particles = random_particles(count, rng, voxel, "projected.mrcs", max_origin_angstrom=5.0)
    particles["rlnCtfBfactor"] = np.where(np.arange(count) % 3 == 0, 0.0, rng.uniform(30, 250, count))
    particles["rlnCtfScalefactor"] = rng.uniform(0.4, 1.8, count)
    star = tmp_path / "in.star"
    starfile.write({"optics": optics_table(box, voxel), "particles": particles}, star, overwrite=True)
    relion_project(tmp_path / "map.mrc", star, tmp_path / "projected", voxel)
    images = mrcfile.read(tmp_path / "projected.mrcs").astype(np.float64)
    table = read_particles(star)
    reference = mrcfile.read(tmp_path / "map.mrc").astype(np.float32)
    settings = SieveSettings(retention_ratio=0.8, highpass_angstrom=cutoff, engine=engine)
    with StackReader(table, tmp_path) as reader:
        scores = score_rows(table, reader, [reference], np.ones(count, dtype=np.int64), settings,
                            volume_pixel_size=Volume(reference, voxel, "map").voxel_size)
    k = np.fft.fftfreq(box)
    radius = np.hypot(k[:, None], k[None, :])
    band = (radius >= voxel / cutoff) & (radius < 0.5)
    energy = (np.abs(np.fft.fft2(images))[:, band] ** 2).sum(axis=1) / box**2  # ||HP(I)||^2 by Parseval
    ratio = -scores / energy
    assert np.all(np.abs(ratio - 1) < 0.03), ratio
    # the same images scored without the envelope and scale leave a large residual
    table = dataclasses.replace(table, ctf_bfactor=np.zeros(count), ctf_scalefactor=np.ones(count))
    with StackReader(table, tmp_path) as reader:
        ignored = score_rows(table, reader, [reference], np.ones(count, dtype=np.int64), settings,
                             volume_pixel_size=voxel)
    changed = ((particles["rlnCtfBfactor"] > 0).to_numpy()
               | (np.abs(particles["rlnCtfScalefactor"] - 1) > 0.2).to_numpy())
    assert np.all(np.abs(-ignored[changed] / energy[changed] - 1) > 0.1)
