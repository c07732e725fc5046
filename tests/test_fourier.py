"""The Fourier helpers: the padded, centred half transform of the projector, against numpy's FFT."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch

from conftest import particles_in_memory
from cryosieve.batch import ParticleBatch
from cryosieve.fourier import _centred_padded_rfftn_torch, centred_padded_rfftn
from cryosieve.geometry import uniform_random_euler
from cryosieve.scoring.fourier import FourierScorer


def numpy_reference(volume: np.ndarray, padded: int) -> np.ndarray:
    """``fftshift`` along z and y of numpy's ``rfftn`` of the map zero-padded with its centre voxel at the
    origin, built the plain way (pad, roll, transform the whole grid)."""
    size = volume.shape[0]
    grid = np.zeros((padded,) * 3, dtype=np.float64)
    grid[:size, :size, :size] = volume
    grid = np.roll(grid, (-(size // 2),) * 3, axis=(0, 1, 2))
    return np.fft.fftshift(np.fft.rfftn(grid), axes=(0, 1))


@pytest.mark.parametrize(("size", "padded", "dtype"), [(8, 16, np.float32), (9, 18, np.float64), (7, 16, np.float32),
                                                       (6, 6, np.float64), (32, 64, np.float32)])
def test_centred_padded_transform_matches_numpy(size, padded, dtype):
    volume = np.random.default_rng(size).normal(size=(size,) * 3).astype(dtype)
    result = centred_padded_rfftn(torch.from_numpy(volume), padded).numpy()
    expected = numpy_reference(volume, padded)
    assert result.shape == expected.shape
    assert result.dtype == (np.complex64 if dtype == np.float32 else np.complex128)
    tolerance = 2e-6 if dtype == np.float32 else 1e-13
    assert np.abs(result - expected).max() <= tolerance * np.abs(expected).max()


def test_the_device_path_matches_numpy():
    """The path of GPUs (torch.fft on the tensor's device), run here on the CPU."""
    volume = np.random.default_rng(2).normal(size=(9,) * 3)
    pieces = ((slice(4, 9), slice(0, 5)), (slice(0, 4), slice(14, 18)))
    result = _centred_padded_rfftn_torch(torch.from_numpy(volume), 18, pieces, None).numpy()
    expected = numpy_reference(volume, 18)
    assert np.abs(result - expected).max() <= 1e-13 * np.abs(expected).max()


def test_centred_padded_transform_writes_into_a_view_and_ignores_the_thread_count():
    volume = torch.from_numpy(np.random.default_rng(1).normal(size=(20,) * 3).astype(np.float32))
    larger = torch.full((41, 41, 22), 7.0 + 7.0j, dtype=torch.complex64)
    threads = numba.get_num_threads()
    try:
        returned = centred_padded_rfftn(volume, 40, out=larger[:40, :40, :21])
        numba.set_num_threads(1)
        one_thread = centred_padded_rfftn(volume, 40)
    finally:
        numba.set_num_threads(threads)
    assert returned.data_ptr() == larger.data_ptr()
    assert torch.equal(larger[:40, :40, :21], one_thread)  # the same bits with 1 and 2 threads
    assert torch.all(larger[40] == 7.0 + 7.0j) and torch.all(larger[:, :, 21] == 7.0 + 7.0j)  # nothing else written


def test_centred_padded_transform_refuses_an_odd_padded_size():
    with pytest.raises(ValueError, match="even padded size"):
        centred_padded_rfftn(torch.zeros((5, 5, 5)), 11)


def test_a_scorer_prepared_again_scores_as_a_new_one():
    """The second reference of a sieve reuses the first one's memory: nothing of the first may remain."""
    rng = np.random.default_rng(3)
    box, count = 32, 24
    rot, tilt, psi = uniform_random_euler(count, rng)
    table = particles_in_memory(count, rot=rot, tilt=tilt, psi=psi, origin_x=rng.uniform(-2, 2, count),
                                origin_y=rng.uniform(-2, 2, count), defocus_u=np.full(count, 1.5e4),
                                defocus_v=np.full(count, 1.4e4), defocus_angle=np.zeros(count),
                                pixel_size=np.full(count, 1.5))
    batch = ParticleBatch.from_table(table, np.arange(count))
    images = torch.from_numpy(rng.normal(size=(count, box, box)).astype(np.float32))
    first, second = (rng.normal(size=(box,) * 3).astype(np.float32) for _ in range(2))
    reused = FourierScorer(box, 10.0, 1.5, torch.device("cpu"))
    reused.prepare(first)
    reused.score(batch, images)
    corners = reused.corners
    reused.prepare(second)
    fresh = FourierScorer(box, 10.0, 1.5, torch.device("cpu"))
    fresh.prepare(second)
    if corners is not None:
        assert reused.corners is corners  # the layout was rebuilt in place
    assert torch.equal(reused.score(batch, images), fresh.score(batch, images))
