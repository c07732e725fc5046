"""Lazy stack reading: batches equal the images they name, whatever the files' layout."""

from __future__ import annotations

import os
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryosieve.errors import CryoSieveInputError
from cryosieve.io.stack import ADVICE_GAP, BatchImages, StackReader, _cached, prefetch_batches
from cryosieve.io.star import read_particles


def write_stack(path: Path, images: np.ndarray, dtype: str = "<f4") -> None:
    with mrcfile.new(str(path), overwrite=True) as handle:
        handle.set_data(images.astype(np.float32))
    if dtype != "<f4":  # rewrite the data block in another byte order / mode
        with mrcfile.open(str(path), mode="r+") as handle:
            handle.set_data(images.astype(dtype))


def write_star(path: Path, names: list[str], box: int = 8) -> None:
    count = len(names)
    particles = pd.DataFrame({"rlnImageName": names, "rlnAngleRot": np.zeros(count),
                              "rlnAngleTilt": np.zeros(count), "rlnAnglePsi": np.zeros(count),
                              "rlnOriginXAngst": np.zeros(count), "rlnOriginYAngst": np.zeros(count),
                              "rlnDefocusU": np.full(count, 10000.0), "rlnDefocusV": np.full(count, 10000.0),
                              "rlnDefocusAngle": np.zeros(count), "rlnOpticsGroup": np.ones(count, int)})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                           "rlnImagePixelSize": [1.0], "rlnImageSize": [box], "rlnImageDimensionality": [2]})
    starfile.write({"optics": optics, "particles": particles}, path, overwrite=True)


def one_stack_reader(tmp_path: Path, images: np.ndarray, dtype: str = "<f4") -> StackReader:
    """A validated reader of ``images`` written as a.mrcs, one STAR row per image in order."""
    write_stack(tmp_path / "a.mrcs", images, dtype)
    write_star(tmp_path / "particles.star", [f"{i:06d}@a.mrcs" for i in range(1, len(images) + 1)],
               box=images.shape[-1])
    reader = StackReader(read_particles(tmp_path / "particles.star"), tmp_path)
    reader.validate()
    return reader


@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<i2"])
def test_batches_equal_the_named_images(tmp_path: Path, dtype: str) -> None:
    rng = np.random.default_rng(0)
    first = np.round(rng.normal(size=(12, 8, 8)) * 100)
    second = np.round(rng.normal(size=(5, 8, 8)) * 100)
    write_stack(tmp_path / "a.mrcs", first, dtype)
    write_stack(tmp_path / "b.mrcs", second, dtype)
    order = [("a.mrcs", 7), ("a.mrcs", 0), ("a.mrcs", 11), ("a.mrcs", 3), ("b.mrcs", 4), ("a.mrcs", 5),
             ("b.mrcs", 0), ("a.mrcs", 7)]
    write_star(tmp_path / "particles.star", [f"{index + 1:06d}@{name}" for name, index in order])
    table = read_particles(tmp_path / "particles.star")
    reader = StackReader(table, tmp_path)
    assert reader.validate() == 8
    expected = np.stack([(first if name == "a.mrcs" else second)[index] for name, index in order])
    np.testing.assert_array_equal(reader.read(np.arange(len(order))), expected)  # two files
    np.testing.assert_array_equal(reader.read(np.array([0, 1, 2, 3])), expected[:4])  # one file
    batches = [np.array([3, 0]), np.array([5, 6, 7]), np.array([1])]
    for background in (True, False):
        seen = []
        for rows, images in prefetch_batches(reader, batches, background=background):
            assert images.dtype == np.float32
            np.testing.assert_array_equal(images, expected[rows])
            seen.append(rows)
        assert [list(rows) for rows in seen] == [list(rows) for rows in batches]
    reader.close()


def test_advice_names_the_runs_of_images_of_a_batch(tmp_path: Path, monkeypatch) -> None:
    # a batch's images, as byte ranges of their files: one posix_fadvise per run of consecutive images
    images = np.arange(10 * 8 * 8, dtype=np.float32).reshape(10, 8, 8)
    write_stack(tmp_path / "a.mrcs", images)
    write_stack(tmp_path / "b.mrcs", images[:3])
    # images 1, 3-5 and 9 of a (numbered from 1): gaps of 1 and 3 unwanted images
    names = [f"{i:06d}@a.mrcs" for i in (3, 4, 5, 9, 1)] + ["000002@b.mrcs"]
    write_star(tmp_path / "particles.star", names)
    reader = StackReader(read_particles(tmp_path / "particles.star"), tmp_path)
    reader.validate()
    calls = []
    monkeypatch.setattr("cryosieve.io.stack._cached", lambda view, sample: False)  # as if on disk only
    monkeypatch.setattr("os.posix_fadvise", lambda descriptor, offset, length, advice: calls.append(
        (os.readlink(f"/proc/self/fd/{descriptor}").rsplit("/", 1)[-1], offset, length, advice)))
    reader.advise(np.arange(6))
    image = 8 * 8 * 4
    header = 1024
    assert ADVICE_GAP == 2
    assert sorted(calls) == sorted([
        ("a.mrcs", header + 0 * image, 5 * image, os.POSIX_FADV_WILLNEED),  # images 1 to 5 (gap of 1)
        ("a.mrcs", header + 8 * image, 1 * image, os.POSIX_FADV_WILLNEED),  # image 9 (gap of 3)
        ("b.mrcs", header + 1 * image, 1 * image, os.POSIX_FADV_WILLNEED),
    ])
    reader.close()


@pytest.mark.filterwarnings("ignore:Data array contains")  # mrcfile, while writing the bad stack
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, "both"])
def test_non_finite_pixels_are_an_input_error(tmp_path: Path, bad: float | str) -> None:
    images = np.random.default_rng(1).normal(size=(4, 8, 8)).astype(np.float32)
    if bad == "both":  # +inf and -inf in one image: a plain sum would hide neither
        images[2, 1, 1], images[2, 5, 5] = np.inf, -np.inf
    else:
        images[2, 3, 4] = bad
    reader = one_stack_reader(tmp_path, images)
    np.testing.assert_array_equal(reader.read(np.array([0, 1, 3])), images[[0, 1, 3]])
    with pytest.raises(CryoSieveInputError, match=r"000003@a\.mrcs"):
        reader.read(np.array([1, 2]))
    reader.close()



@pytest.mark.filterwarnings("ignore:Data array contains")
@pytest.mark.parametrize("dtype", ["<f4", ">f4"])  # the one-pass copy, and numpy's path
def test_huge_finite_pixels_are_read_and_non_finite_ones_found(tmp_path: Path, dtype: str) -> None:
    # a float32 sum of image 1 overflows to infinity, yet every pixel is finite
    images = np.random.default_rng(2).normal(size=(4, 8, 8)).astype(np.float32)
    images[1, :2] = np.float32(3e38)
    assert not np.isfinite(np.einsum("ijk->i", images)[1])
    images[3, 7, 7] = np.nan
    reader = one_stack_reader(tmp_path, images, dtype)
    np.testing.assert_array_equal(reader.read(np.array([2, 1, 0])), images[[2, 1, 0]])
    with pytest.raises(CryoSieveInputError, match=r"000004@a\.mrcs"):
        reader.read(np.array([1, 3]))
    reader.close()


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise")
def test_advice_skips_a_stack_in_the_page_cache(tmp_path: Path, monkeypatch) -> None:
    images = np.random.default_rng(3).normal(size=(6, 64, 64)).astype(np.float32)  # 4 pages each
    write_stack(tmp_path / "a.mrcs", images)
    write_star(tmp_path / "particles.star", [f"{i:06d}@a.mrcs" for i in range(1, 7)], box=64)
    descriptor = os.open(tmp_path / "a.mrcs", os.O_RDONLY)  # drop the clean pages from the cache
    os.fsync(descriptor)
    os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(descriptor)
    reader = StackReader(read_particles(tmp_path / "particles.star"), tmp_path)
    reader.validate()
    view = reader._view("a.mrcs")
    if _cached(view, np.arange(1, 6)):
        pytest.skip("this file system kept the pages")
    calls = []
    real_fadvise = os.posix_fadvise
    monkeypatch.setattr("os.posix_fadvise", lambda *arguments: (calls.append(arguments), real_fadvise(*arguments)))
    reader.advise(np.arange(1, 6))
    assert len(calls) == 1  # images 2 to 6, one run
    reader.read(np.arange(6))  # every page read: cached
    assert _cached(view, np.arange(6))
    reader.advise(np.arange(6))
    assert len(calls) == 1  # nothing more asked
    reader.close()


@pytest.mark.filterwarnings("ignore:Data array contains")
@pytest.mark.parametrize("layout", ["one stack", "two stacks", "big-endian"])
def test_batch_images_read_slice_by_slice(tmp_path: Path, layout: str) -> None:
    rng = np.random.default_rng(4)
    first = rng.normal(size=(9, 8, 8)).astype(np.float32)
    second = rng.normal(size=(4, 8, 8)).astype(np.float32)
    dtype = ">f4" if layout == "big-endian" else "<f4"
    write_stack(tmp_path / "a.mrcs", first, dtype)
    write_stack(tmp_path / "b.mrcs", second, dtype)
    order = [("a.mrcs", 4), ("a.mrcs", 0), ("a.mrcs", 8), ("a.mrcs", 2), ("a.mrcs", 6)]
    if layout == "two stacks":
        order[1:3] = [("b.mrcs", 3), ("b.mrcs", 0)]
    write_star(tmp_path / "particles.star", [f"{index + 1:06d}@{name}" for name, index in order])
    reader = StackReader(read_particles(tmp_path / "particles.star"), tmp_path)
    reader.validate()
    expected = np.stack([(first if name == "a.mrcs" else second)[index] for name, index in order])
    batches = [np.array([4, 2, 0, 1]), np.array([3])]
    seen = 0
    for rows, images in prefetch_batches(reader, batches, background=False, on_demand=True):
        assert isinstance(images, BatchImages) and len(images) == len(rows) and images.box == 8
        for start in range(0, len(rows), 3):  # slices of 3, the last one shorter
            stop = min(start + 3, len(rows))
            np.testing.assert_array_equal(images.slice(start, stop), expected[rows[start:stop]])
        seen += 1
    assert seen == 2
    reader.close()


def test_batch_images_name_a_non_finite_image(tmp_path: Path) -> None:
    images = np.random.default_rng(5).normal(size=(5, 8, 8)).astype(np.float32)
    images[3, 2, 2] = np.inf
    reader = one_stack_reader(tmp_path, images)
    batch = BatchImages(reader, np.array([0, 1, 2, 3, 4]))
    np.testing.assert_array_equal(batch.slice(0, 3), images[:3])
    with pytest.raises(CryoSieveInputError, match=r"000004@a\.mrcs"):
        batch.slice(2, 5)
    reader.close()


# ----------------------------------------------------------------------------- writing


def test_stack_writer_reads_back_and_gives_the_same_bytes_for_any_batching(tmp_path: Path) -> None:
    from cryosieve.io.stack import StackWriter

    rng = np.random.default_rng(4)
    images = rng.normal(0.3, 2.0, (23, 8, 8)).astype(np.float32)
    for name, batch in (("one.mrcs", 23), ("many.mrcs", 5)):
        with StackWriter(tmp_path / name, len(images), 8, 1.7, label="a label") as writer:
            for start in range(0, len(images), batch):
                writer.write(start, np.zeros_like(images[start: start + batch]))  # replaced below
            for start in range(0, len(images), batch):
                writer.write(start, images[start: start + batch])
            assert np.array_equal(writer.read(3, 9), images[3:9])
    assert (tmp_path / "one.mrcs").read_bytes() == (tmp_path / "many.mrcs").read_bytes()
    with mrcfile.open(str(tmp_path / "one.mrcs"), permissive=True) as handle:
        assert handle.is_image_stack() and np.array_equal(handle.data, images)
        assert handle.voxel_size.x == pytest.approx(1.7)
        header = handle.header
        assert int(header.nlabl) == 1 and header.label[0] == b"a label" and header.label[1] == b""
        data = images.astype(np.float64)
        assert header.dmin == images.min() and header.dmax == images.max()
        assert header.dmean == pytest.approx(data.mean(), rel=1e-6)
        assert header.rms == pytest.approx(data.std(), rel=1e-6)


def test_stack_writer_refuses_bad_shapes_and_ranges(tmp_path: Path) -> None:
    from cryosieve.io.stack import StackWriter

    with pytest.raises(CryoSieveInputError, match="at least one image"):
        StackWriter(tmp_path / "empty.mrcs", 0, 8, 1.0)
    with pytest.raises(CryoSieveInputError, match="pixel size"):
        StackWriter(tmp_path / "bad.mrcs", 2, 8, float("nan"))
    with StackWriter(tmp_path / "s.mrcs", 4, 8, 1.0) as writer:
        with pytest.raises(CryoSieveInputError, match="shape"):
            writer.write(0, np.zeros((2, 8, 9), dtype=np.float32))
        with pytest.raises(CryoSieveInputError, match="outside"):
            writer.write(3, np.zeros((2, 8, 8), dtype=np.float32))
        with pytest.raises(CryoSieveInputError, match="outside"):
            writer.read(2, 5)
    with pytest.raises(CryoSieveInputError, match="label"):
        StackWriter(tmp_path / "label.mrcs", 2, 8, 1.0, label="x" * 81)


def test_slow_reading_hands_over_to_a_reading_thread_with_the_same_batches(tmp_path: Path, monkeypatch) -> None:
    import time

    import cryosieve.io.stack as stack

    images = np.random.default_rng(3).normal(size=(40, 8, 8)).astype(np.float32)
    reader = one_stack_reader(tmp_path, images)
    batches = [np.arange(start, start + 4) for start in range(0, 40, 4)]
    handed: list[int] = []
    original = stack._read_in_background

    def watched(reader_: StackReader, rest: list[np.ndarray], depth: int, pinned: bool = False):  # type: ignore[no-untyped-def]
        handed.append(len(rest))
        return original(reader_, rest, depth, pinned)

    monkeypatch.setattr(stack, "_read_in_background", watched)

    def consume() -> list[tuple[np.ndarray, np.ndarray]]:
        seen = []
        for rows, batch in prefetch_batches(reader, batches, background=False):
            seen.append((rows, np.array(batch)))
            time.sleep(0.05)  # the consumer's work on the batch
        return seen

    fast = consume()
    assert handed == []  # reading from the page cache is a small part of the time: it stays in turn
    read = reader._read

    def slow(*args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(0.1)  # a slow store: reading takes twice the consumer's time
        return read(*args, **kwargs)

    monkeypatch.setattr(reader, "_read", slow)
    slowly = consume()
    assert handed == [len(batches) - 1 - stack.PROBE_BATCHES]
    assert len(slowly) == len(fast) == len(batches)
    for (rows, got), (expected_rows, expected) in zip(slowly, fast, strict=True):
        np.testing.assert_array_equal(rows, expected_rows)
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(got, images[rows])
    reader.close()


def test_stack_writer_on_a_full_disk_raises_enospc_naming_the_stack(tmp_path: Path) -> None:
    """No memory map, so no SIGBUS: a disk too small for the stack is an OSError naming it, and a write that
    finds the disk full (space not reserved ahead) is one too."""
    import errno

    from cryosieve.io.stack import StackWriter
    from safety_helpers import small_filesystem

    folder = tmp_path / "small"
    with small_filesystem(folder, "64k"):
        with pytest.raises(OSError) as caught:
            StackWriter(folder / "big.mrcs", 100, 32, 1.0)
        assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(folder / "big.mrcs")
        (folder / "big.mrcs").unlink(missing_ok=True)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("cryosieve.io.stack._reserve", lambda descriptor, size: None)  # as where not supported
            with pytest.raises(OSError) as caught, StackWriter(folder / "sparse.mrcs", 100, 32, 1.0) as writer:
                for start in range(0, 100, 10):
                    writer.write(start, np.ones((10, 32, 32), dtype=np.float32))
        assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(folder / "sparse.mrcs")
