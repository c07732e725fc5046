"""Number formats per device (:mod:`cryosieve.precision`), and the path of devices without float64.

Apple's GPUs (``--device mps``) have no float64. There is no such GPU here, so these tests
declare the CPU float32-only (``float32_only``) and run the tensor paths on it: the
per-particle loop must then touch no float64 tensor at all (checked op by op with a
dispatch mode), and its scores, kept sets and maps must agree with the float64 path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import particles_in_memory
from cryosieve import precision
from cryosieve.batch import ParticleBatch
from cryosieve.cli._common import _in_job, choose_device_name
from cryosieve.ctf import CtfParameters
from cryosieve.errors import CryoSieveInputError
from cryosieve.io.mrc import read_volume
from cryosieve.io.stack import StackReader
from cryosieve.io.star import read_particles
from cryosieve.reconstruct.api import reconstruct, reconstruct_subsets
from cryosieve.reconstruct.grid import grid_shape
from cryosieve.reconstruct.tensor_path import TensorInsertion
from cryosieve.scoring.fourier import FourierScorer
from cryosieve.settings import SieveSettings
from cryosieve.sieve import sieve_star_file
from safety_helpers import SmallData, make_small_data

WIDE = (torch.float64, torch.complex128)


@pytest.fixture
def float32_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU treated as a device without float64, as Apple's GPUs are."""
    monkeypatch.setattr(precision, "FLOAT32_ONLY", frozenset({"cpu", "mps"}))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> SmallData:
    return make_small_data(tmp_path_factory.mktemp("precision"), count=240, seed=11)


class WideOps(TorchDispatchMode):
    """Records every torch operation that takes or makes a float64 or complex128 tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        result = func(*args, **(kwargs or {}))
        for value in tree_leaves((args, kwargs, result)):
            if isinstance(value, torch.Tensor) and value.dtype in WIDE:
                self.seen.append(str(func))
                break
        return result


# ----------------------------------------------------------------------------- the rules


def test_device_rules() -> None:
    assert precision.has_float64("cpu") and precision.has_float64(torch.device("cuda", 1))
    assert not precision.has_float64("mps") and not precision.has_float64(torch.device("mps"))
    assert precision.real_dtype("mps") == torch.float32 and precision.complex_dtype("mps") == torch.complex64
    assert precision.real_dtype("cpu") == torch.float64 and precision.complex_dtype("cuda") == torch.complex128
    assert precision.map_device("mps") == torch.device("cpu")
    assert precision.map_device("cuda:1") == torch.device("cuda", 1)


def test_to_device_casts_on_the_host(float32_only: None) -> None:
    with WideOps() as wide:
        real = precision.to_device(np.linspace(0, 1, 5), "cpu")
        phase = precision.to_device(np.exp(1j * np.arange(4.0)), "cpu")
        rows = precision.to_device(np.arange(3), "cpu")
    assert wide.seen == []
    assert real.dtype == torch.float32 and phase.dtype == torch.complex64 and rows.dtype == torch.int64
    np.testing.assert_allclose(phase.numpy(), np.exp(1j * np.arange(4.0)), rtol=1e-6)


def test_grid_sum_float64_device_is_one_float64_grid() -> None:
    grids = precision.GridSum((2, 3), "cpu")
    assert not grids.compensated and grids.target.dtype == torch.float64
    grids.target += 1.5
    grids.added(10)
    assert grids.result() is grids.target
    copy = grids.result(copy=True)
    assert copy is not grids.target and torch.equal(copy, grids.target)


def test_grid_sum_compensation_keeps_the_float64_sum(float32_only: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """20,000 additions of float32 0.1 (flushed one by one): the compensated float32 total equals the float64
    sum of the same values to float32 rounding of the result, where a plain float32 total drifts 100x further."""
    monkeypatch.setattr(precision, "FLUSH_PARTICLES", 1)
    rng = np.random.default_rng(0)
    values = (0.1 + 1e-3 * rng.standard_normal((20000, 4))).astype(np.float32)
    grids = precision.GridSum((4,), "cpu")
    assert grids.compensated and grids.target.dtype == torch.float32
    plain = torch.zeros(4, dtype=torch.float32)
    for row in values:
        grids.target += torch.from_numpy(row)
        plain += torch.from_numpy(row)
        grids.added(1)
    exact = values.astype(np.float64).sum(axis=0)
    result = grids.result()
    assert result.dtype == torch.float64
    compensated_error = np.abs(result.numpy() - exact).max() / exact.max()
    plain_error = np.abs(plain.numpy() - exact).max() / exact.max()
    assert compensated_error < 1e-7
    assert plain_error > 100 * compensated_error
    snapshot = grids.result(copy=True)
    np.testing.assert_array_equal(snapshot.numpy(), result.numpy())


def test_grid_sum_flushes_only_after_enough_particles(float32_only: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "FLUSH_PARTICLES", 100)
    grids = precision.GridSum((3,), "cpu")
    grids.target += 2.0
    grids.added(60)
    assert float(grids.target[0]) == 2.0  # still gathering
    grids.added(40)
    assert float(grids.target[0]) == 0.0  # joined the total
    np.testing.assert_array_equal(grids.result().numpy(), [2.0, 2.0, 2.0])


# ----------------------------------------------------------------------------- the per-particle loop


def test_per_particle_loop_makes_no_float64_tensor(data: SmallData, float32_only: None) -> None:
    """Scoring and insertion of a batch, as they run on a device without float64: not one operation
    takes or makes a float64 or complex128 tensor (on Apple's GPUs any would fail)."""
    table = read_particles(str(data.star))
    rows = np.arange(64)
    with StackReader(table, str(data.folder)) as reader:
        box = reader.validate()
        images = torch.from_numpy(reader.read(rows))
    reference = read_volume(str(data.half1)).data.astype(np.float32)
    scorer = FourierScorer(box, 20.0, 2.5, torch.device("cpu"), "torch")
    scorer.prepare(reference)  # the projector is built on the map device (here the CPU), in float64
    insertion = TensorInsertion(box, 2, [1, 2], True, "cpu")
    assert table.random_subset is not None
    labels = table.random_subset[rows]
    with WideOps() as wide:
        batch = ParticleBatch.from_table(table, rows)
        scores = scorer.score(batch, images)
        insertion.insert(images.numpy(), batch, labels)
    assert wide.seen == []
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert insertion.grids[1].target.dtype == torch.float32


def test_batch_ctf_terms_come_from_the_table_in_float64(data: SmallData, float32_only: None) -> None:
    """On a float32-only device the batch's tensors are float32, but its CTF terms are the table's float64
    values worked out on the host (not read back from the device, which would also wait for it)."""
    table = read_particles(str(data.star))
    rows = np.arange(10, 70)
    batch = ParticleBatch.from_table(table, rows)
    assert batch.on("origin_x", "cpu").dtype == torch.float32 and batch.on("rotations", "cpu").dtype == torch.float32
    expected = CtfParameters.from_values(table.defocus_u[rows], table.defocus_v[rows], table.defocus_angle[rows],
                                         table.voltage[rows], table.spherical_aberration[rows],
                                         table.amplitude_contrast[rows], table.phase_shift[rows],
                                         table.ctf_bfactor[rows], table.ctf_scalefactor[rows])
    terms = batch.ctf
    for name in ("defocus_average", "defocus_deviation", "cos_angle2", "sin_angle2", "k1", "k2", "phase_constant",
                 "envelope", "scale"):
        np.testing.assert_array_equal(getattr(terms, name), getattr(expected, name), err_msg=name)
    assert not np.array_equal(batch.on("origin_x", "cpu").numpy().astype(np.float64), table.origin_x[rows])  # rounded


def test_scores_agree_with_the_float64_path(data: SmallData, monkeypatch: pytest.MonkeyPatch) -> None:
    table = read_particles(str(data.star))
    rows = np.arange(len(table))
    with StackReader(table, str(data.folder)) as reader:
        box = reader.validate()
        images = torch.from_numpy(reader.read(rows))
    reference = torch.from_numpy(read_volume(str(data.half1)).data.astype(np.float32))

    def scores() -> np.ndarray:
        scorer = FourierScorer(box, 20.0, 2.5, torch.device("cpu"), "torch")
        scorer.prepare(reference.numpy())
        return scorer.score(ParticleBatch.from_table(table, rows), images).double().numpy()

    wide = scores()
    monkeypatch.setattr(precision, "FLOAT32_ONLY", frozenset({"cpu", "mps"}))
    narrow = scores()
    spread = np.ptp(wide)
    assert np.abs(narrow - wide).max() < 1e-4 * spread
    lowest = {name: set(np.argsort(values, kind="stable")[:168].tolist()) for name, values in
              (("wide", wide), ("narrow", narrow))}
    assert len(lowest["wide"] ^ lowest["narrow"]) <= 2  # a near tie may swap at the cut


def test_maps_agree_with_the_float64_path(data: SmallData, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compensated float32 grids, finished on the CPU, against the float64 tensor path and the numba
    engine; flushing every 32 particles, so that the compensated total takes several flushes."""
    table = read_particles(str(data.star))
    with StackReader(table, str(data.folder)) as reader:
        numba = reconstruct_subsets(table, reader, batch_size=50)
        wide = reconstruct_subsets(table, reader, batch_size=50, engine="torch")
        monkeypatch.setattr(precision, "FLOAT32_ONLY", frozenset({"cpu", "mps"}))
        monkeypatch.setattr(precision, "FLUSH_PARTICLES", 32)
        narrow = reconstruct_subsets(table, reader, batch_size=50, engine="torch")
        single = reconstruct(table, reader, batch_size=50, engine="torch")
    for subset in (1, 2):
        scale = np.abs(wide[subset]).max()
        np.testing.assert_allclose(wide[subset], numba[subset], rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(narrow[subset], wide[subset], rtol=0, atol=2e-5 * scale)
        assert narrow[subset].dtype == np.float32
    assert single.shape == wide[1].shape and np.isfinite(single).all()


def test_insertion_of_one_image_lands_on_its_slice(float32_only: None) -> None:
    """One image of a single non-zero Fourier sample, inserted without CTF at an identity pose: the
    grid holds the sample (times the trilinear weight 1) at the matching voxel, in float64 from float32."""
    box, pad = 16, 2
    image = np.zeros((1, box, box), dtype=np.float32)
    image[0] = np.cos(2 * np.pi * 3 * (np.arange(box) - box // 2) / box)[None, :]
    batch = ParticleBatch.from_table(particles_in_memory(1, defocus_u=np.zeros(1), defocus_v=np.zeros(1)),
                                     np.arange(1))
    insertion = TensorInsertion(box, pad, [0], False, "cpu")
    insertion.insert(image, batch, np.zeros(1, dtype=np.int64))
    grid = insertion.pop(0)
    assert grid.dtype == torch.float64 and grid.shape == grid_shape(box, pad)
    half = (grid.shape[0] - 1) // 2
    # kx = 3 cycles per box -> 6 on the padded grid; ky = kz = 0; the image's DFT there is box^2 / 2
    np.testing.assert_allclose(float(grid[half, half, 6, 0]), box * box / 2, rtol=1e-6)
    np.testing.assert_allclose(float(grid[half, half, 6, 2]), 1.0, rtol=1e-6)
    assert abs(float(grid[half, half, 6, 1])) < 1e-3


# ----------------------------------------------------------------------------- the sieve end to end


@pytest.mark.parametrize("retention", [0.7, "auto"])
def test_sieve_on_a_float32_only_device_keeps_the_same_particles(data: SmallData, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                retention: float | str) -> None:
    def sieve(out: Path) -> tuple[np.ndarray, np.ndarray, float | None]:
        settings = SieveSettings(retention_ratio=retention, highpass_angstrom=20.0, device="cpu", engine="torch")
        result, _ = sieve_star_file(str(data.star), str(out), [str(data.half1), str(data.half2)], settings,
                                    directory=str(data.folder), mask_path=str(data.folder / "mask.mrc"))
        chosen = result.retention.chosen if result.retention is not None else None
        return result.scores, result.kept, chosen

    wide_scores, wide_kept, wide_ratio = sieve(tmp_path / "wide" / "out.star")
    monkeypatch.setattr(precision, "FLOAT32_ONLY", frozenset({"cpu", "mps"}))
    narrow_scores, narrow_kept, narrow_ratio = sieve(tmp_path / "narrow" / "out.star")
    assert np.abs(narrow_scores - wide_scores).max() < 1e-4 * np.ptp(wide_scores)
    assert narrow_ratio == wide_ratio
    assert np.sum(narrow_kept != wide_kept) <= 2


def test_realspace_scorer_is_refused_without_float64(data: SmallData, tmp_path: Path) -> None:
    settings = SieveSettings(retention_ratio=0.7, highpass_angstrom=20.0, device="mps", projector="realspace")
    with pytest.raises(CryoSieveInputError, match="float64"):
        sieve_star_file(str(data.star), str(tmp_path / "out.star"), [str(data.half1), str(data.half2)], settings)
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- the command line


def test_mps_without_an_apple_gpu_is_one_line_error(data: SmallData, tmp_path: Path) -> None:
    import subprocess

    result = subprocess.run(["cryosieve-core", "--i", str(data.star), "--o", str(tmp_path / "k.star"),
                             "--volume", str(data.half1), "--volume", str(data.half2), "--frequency", "20",
                             "--device", "mps"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "cryosieve-core: error: --device mps: no Apple GPU (Metal Performance Shaders) is available"]
    assert not list(tmp_path.iterdir())
    with pytest.raises(CryoSieveInputError, match="no Apple GPU"):
        choose_device_name("mps")


def test_mps_is_refused_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    from cryosieve import world
    from cryosieve.cli import _common

    monkeypatch.setattr(_common, "_mps_available", lambda: True)
    monkeypatch.setattr(world, "launched_by_torchrun", lambda: True)
    called: list[object] = []
    with pytest.raises(CryoSieveInputError, match="one process"):
        _in_job("cryosieve-core", called.append, ["--device", "mps"])
    assert called == []
