"""Particle images in MRC stacks: lazy, memory-mapped reading, and writing range by range.

Stacks are opened with ``mrcfile.mmap`` and only the requested images are copied,
so memory stays bounded by the batch size whatever the stack size. Little-endian float32
stacks (the usual case) are copied by a numba kernel that checks the pixels on the way
and runs on all cores without the GIL; other modes go through numpy.

:class:`StackWriter` writes a float32 stack a range of images at a time, with
deterministic bytes, by plain positioned writes: never through a memory map, where a full
disk kills the process with SIGBUS instead of raising an error.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import mrcfile
import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; numpy does the same, more slowly
    numba = None  # type: ignore[assignment]  # None marks numba as missing

from typing import TYPE_CHECKING, Any

from cryosieve.errors import CryoSieveInputError, setting
from cryosieve.io.mrc import HEADER_BYTES, MRC_LABEL, check_mrc_file, quiet_mrcfile, resolve_path, set_fixed_label
from cryosieve.particles import ParticleSet

if TYPE_CHECKING:
    import torch


def _open_stack(path: Path, name: str, directory: str | os.PathLike[str] | None,
                star: str) -> mrcfile.mrcfile.MrcFile:
    if not path.is_file():
        where = os.path.abspath(path)
        if Path(name).is_absolute():
            hint = f"it is named with an absolute path in {star}"
        else:
            base = os.path.abspath(directory) if directory else os.getcwd()
            hint = (f"names in {star} are read relative to {base}"
                    f"{'' if directory else ' (the current folder)'}; give {setting('directory')} for another folder")
        raise CryoSieveInputError(f"{name}: particle stack not found at {where} ({hint})")
    check_mrc_file(path, "particle stack")
    try:
        with quiet_mrcfile():
            return mrcfile.mmap(str(path), mode="r", permissive=True)
    except Exception as error:
        raise CryoSieveInputError(f"{path}: not a readable MRC stack ({error})") from None


def _images_view(handle: mrcfile.mrcfile.MrcFile, path: Path) -> np.ndarray:
    data = handle.data
    if data is None:
        raise CryoSieveInputError(f"{path}: not a readable MRC stack")
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3 or data.shape[1] != data.shape[2]:
        raise CryoSieveInputError(f"{path}: expected square images, got shape {data.shape}")
    result: np.ndarray = data
    return result


def _non_finite_images(images: np.ndarray) -> np.ndarray:
    """``(b,)`` bool: which of ``(b, n, n)`` float32 images hold a NaN or infinite pixel.

    A sum is finite when every pixel is (NaN and infinities propagate). The float32 sum can
    also overflow on huge finite pixels, so the images it flags are checked again with a
    float64 sum, which cannot.
    """
    bad = ~np.isfinite(np.einsum("ijk->i", images))
    if bad.any():
        bad[bad] = ~np.isfinite(images[bad].sum(axis=(1, 2), dtype=np.float64))
    result: np.ndarray = bad
    return result


# Compiled by numba below, which types the arguments itself: no annotations.
def _copy_image_bits(stack, indices, out, positions, bad):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled below
    # Copies the 32-bit pixels of stack[indices[k]] to out[positions[k]] and flags an
    # image whose exponent bits are all ones somewhere (NaN or infinity). Integer
    # operations only, so the loop vectorises and the check is exact.
    for k in numba.prange(indices.shape[0]):
        image = stack[indices[k]]
        target = out[positions[k]]
        flag = np.uint32(0)
        for y in range(image.shape[0]):
            for x in range(image.shape[1]):
                bits = image[y, x]
                target[y, x] = bits
                flag |= np.uint32((bits & np.uint32(0x7F800000)) == np.uint32(0x7F800000))
        bad[positions[k]] = flag != 0


if numba is not None:
    # On all cores, for the thread that computes; one core, for a reading thread beside a
    # computing one (two parallel launches at once abort numba's fallback thread pool).
    _copy_image_bits_parallel = numba.njit(nogil=True, cache=True, parallel=True)(_copy_image_bits)
    _copy_image_bits_serial = numba.njit(nogil=True, cache=True)(_copy_image_bits)


#: Unwanted images between two wanted ones that :meth:`StackReader.advise` reads along
#: rather than making another call (at most 3x the data for sparse rows; a half-set's
#: images, about every other one, then take a few calls instead of one per image).
ADVICE_GAP = 2


def _page_residency() -> Callable[..., int] | None:
    """``mincore`` from the C library, or ``None`` where there is none."""
    try:
        import ctypes

        library = ctypes.CDLL(None, use_errno=True)
        function = library.mincore
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    function.restype = ctypes.c_int
    return function


_MINCORE = _page_residency()


def _cached(view: np.ndarray, sample: np.ndarray) -> bool:
    """Whether the first and last pages of the images ``view[sample]`` of a memory-mapped stack
    are all in the page cache (``mincore``); ``False`` where that cannot be asked."""
    if _MINCORE is None or not len(sample):
        return False
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    image_bytes = view.shape[1] * view.shape[2] * view.itemsize
    flag = (ctypes.c_ubyte * 1)()
    for index in sample:
        for address in (view.ctypes.data + int(index) * image_bytes,
                        view.ctypes.data + (int(index) + 1) * image_bytes - 1):
            if _MINCORE(address - address % page, page, flag) != 0 or not flag[0] & 1:
                return False
    return True


def stack_paths(table: ParticleSet, directory: str | os.PathLike[str] | None = None) -> list[Path]:
    """The path of every stack the table's ``rlnImageName`` entries refer to, each once."""
    return [resolve_path(file, directory) for file in dict.fromkeys(table.image_file.tolist())]


def stack_record(path: str | os.PathLike[str]) -> dict[str, int | str]:
    """What tells a changed stack from the one a run read: ``size`` (bytes), ``mtime_ns`` (its
    modification time, ns) and ``first_last_sha256``, the SHA-256 of the bytes of its first and
    last image (a file that is not a readable MRC stack is an input error)."""
    import hashlib

    from cryosieve.io.mrc import REAL_MODES

    path = str(path)
    nx, ny, nz = check_mrc_file(path, "particle stack")
    with quiet_mrcfile(), mrcfile.open(path, mode="r", permissive=True, header_only=True) as handle:
        mode, extended = int(handle.header.mode), int(handle.header.nsymbt)
    image = nx * ny * np.dtype(REAL_MODES[mode]).itemsize
    status = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for index in (0, nz - 1):
            handle.seek(HEADER_BYTES + extended + index * image)
            digest.update(handle.read(image))
    return {"size": int(status.st_size), "mtime_ns": int(status.st_mtime_ns), "first_last_sha256": digest.hexdigest()}


class StackReader:
    """Read particle images by row of a :class:`ParticleSet`.

    Parameters
    ----------
    table:
        The particles.
    directory:
        Folder that ``rlnImageName`` paths are relative to (``None``: current folder).
    max_open:
        How many stacks to keep memory-mapped at once.
    """

    def __init__(self, table: ParticleSet, directory: str | os.PathLike[str] | None = None,
                 max_open: int = 64) -> None:
        self.table = table
        self.directory = directory
        self.max_open = max_open
        self._handles: OrderedDict[str, tuple[mrcfile.mrcfile.MrcFile, np.ndarray]] = OrderedDict()
        self._descriptors: dict[str, int] = {}
        self._lock = threading.Lock()
        #: Seconds spent in :meth:`read` so far (all threads), for choosing how to read ahead.
        self.read_seconds = 0.0

    def _view(self, file: str) -> np.ndarray:
        with self._lock:
            if file in self._handles:
                self._handles.move_to_end(file)
                return self._handles[file][1]
            path = resolve_path(file, self.directory)
            handle = _open_stack(path, file, self.directory, self.table.path)
            view = _images_view(handle, path)
            self._handles[file] = (handle, view)
            while len(self._handles) > self.max_open:
                old_file, (old, _) = self._handles.popitem(last=False)
                old.close()
                descriptor = self._descriptors.pop(old_file, None)
                if descriptor is not None:
                    os.close(descriptor)
            return view

    def validate(self) -> int:
        """Check every stack exists, every index is inside it and all boxes agree.

        Returns the box size in pixels. Reads headers only.
        """
        box: int | None = None
        files = self.table.image_file
        for file in dict.fromkeys(files.tolist()):
            view = self._view(file)
            rows = np.flatnonzero(files == file)
            largest = int(self.table.image_index[rows].max())
            path = resolve_path(file, self.directory)
            if largest >= view.shape[0]:
                row = rows[int(np.argmax(self.table.image_index[rows]))]
                raise CryoSieveInputError(
                    f"{self.table.path}: rlnImageName {self.table.image_name[row]} points "
                    f"beyond the {view.shape[0]} images of {path}"
                )
            if box is None:
                box = int(view.shape[-1])
            elif view.shape[-1] != box:
                raise CryoSieveInputError(
                    f"{path}: box size {view.shape[-1]} differs from {box} of the other stacks"
                )
        if self.table.image_size is not None and box is not None:
            bad = np.flatnonzero(self.table.image_size != box)
            if bad.size:
                raise CryoSieveInputError(
                    f"{self.table.path}: rlnImageSize {self.table.image_size[bad[0]]} in data_optics "
                    f"does not match the stacks' box size {box}"
                )
        assert box is not None
        return box

    def read(self, rows: Sequence[int] | np.ndarray, parallel: bool = False,
             out: np.ndarray | None = None) -> np.ndarray:
        """Images of the given table rows as a ``(b, n, n)`` float32 array (``out`` if given).

        A NaN or infinite pixel is an input error naming the image. ``parallel``: copy on
        all cores (only from a thread that runs no other numba work meanwhile).
        """
        started = time.perf_counter()
        try:
            return self._read(np.asarray(rows, dtype=np.int64), parallel, out)
        finally:
            self.read_seconds += time.perf_counter() - started

    def _read(self, rows: np.ndarray, parallel: bool, out: np.ndarray | None) -> np.ndarray:
        files = self.table.image_file[rows]
        indices = self.table.image_index[rows]
        first = self._view(files[0]) if len(rows) else None
        box = first.shape[-1] if first is not None else 0
        if out is None:
            out = np.empty((len(rows), box, box), dtype=np.float32)
        bad = np.zeros(len(rows), dtype=np.bool_)
        unique_files = dict.fromkeys(files.tolist())
        for file in unique_files:
            where = np.arange(len(rows)) if len(unique_files) == 1 else np.flatnonzero(files == file)
            view = self._view(file)
            if numba is not None and view.dtype == np.float32:  # native byte order
                # one pass straight from the mapped stack, on all cores, without the GIL
                copy = _copy_image_bits_parallel if parallel else _copy_image_bits_serial
                copy(np.asarray(view).view(np.uint32), indices[where], out.view(np.uint32), where, bad)
            else:
                out[where] = view[indices[where]]
                bad[where] = _non_finite_images(out[where])
        if bad.any():
            row = rows[int(np.flatnonzero(bad)[0])]
            raise CryoSieveInputError(
                f"{self.table.path}: image {self.table.image_name[row]} contains NaN or infinite values"
            )
        return out

    def box_size(self) -> int:
        """Image size in pixels of the first stack (after :meth:`validate`, that of every stack)."""
        return int(self._view(self.table.image_file[0]).shape[-1])

    def advise(self, rows: Sequence[int] | np.ndarray) -> None:
        """Ask the operating system to start reading these rows' images into the page cache,
        without waiting (``posix_fadvise`` ``WILLNEED``, one call per run of images with gaps
        of at most :data:`ADVICE_GAP` images, e.g. those of the other half-set). Skips a
        stack whose sampled images are already cached (asking costs about 2 us per image at
        box 128 even then). Does nothing where that call does not exist."""
        if not hasattr(os, "posix_fadvise"):
            return
        rows = np.asarray(rows, dtype=np.int64)
        files = self.table.image_file[rows]
        indices = self.table.image_index[rows]
        for file in dict.fromkeys(files.tolist()):
            view = self._view(file)
            offset, filename = getattr(view, "offset", None), getattr(view, "filename", None)
            if offset is None or not filename:
                continue
            with self._lock:
                descriptor = self._descriptors.get(file)
                if descriptor is None:
                    descriptor = self._descriptors[file] = os.open(filename, os.O_RDONLY)
            image_bytes = view.shape[1] * view.shape[2] * view.itemsize
            wanted = np.unique(indices[files == file])
            if _cached(view, wanted[np.linspace(0, len(wanted) - 1, min(len(wanted), 32)).astype(np.int64)]):
                continue  # a stack read before (the iterative pipeline's later rounds): nothing to ask for
            breaks = np.flatnonzero(np.diff(wanted) > 1 + ADVICE_GAP)
            firsts, lasts = np.r_[wanted[0], wanted[breaks + 1]], np.r_[wanted[breaks], wanted[-1]]
            for first, last in zip(firsts, lasts, strict=True):
                os.posix_fadvise(descriptor, offset + int(first) * image_bytes,
                                 (int(last) - int(first) + 1) * image_bytes, os.POSIX_FADV_WILLNEED)

    def __enter__(self) -> StackReader:
        return self

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        self.close()

    def close(self) -> None:
        """Unmap every stack and close every file (the reader can be used again afterwards)."""
        with self._lock:
            for handle, _ in self._handles.values():
                handle.close()
            self._handles.clear()
            for descriptor in self._descriptors.values():
                os.close(descriptor)
            self._descriptors.clear()


class StackWriter:
    """Write a float32 MRC image stack a range of images at a time.

    The file holds ``count`` images of ``box x box`` pixels, MRC mode 2 (float32), marked as
    an image stack, voxel size ``pixel_size`` Å and the one fixed header ``label``
    (:func:`cryosieve.io.mrc.set_fixed_label`). Its space is reserved at once where the file
    system can (``fallocate``), so a disk too small fails before any image is made.
    Images are written with :meth:`write` and can be read back with :meth:`read`, for a
    later pass that changes them (e.g. adds noise); memory holds what the caller passes
    and 32 bytes of statistics per image. Write every image before :meth:`close` (an
    unwritten one reads as zero and is counted as zero in the statistics). :meth:`close`
    writes the header, whose statistics (``dmin``, ``dmax``, ``dmean``, ``rms`` over every
    pixel of the stack) come from per-image sums kept as images are written, so the file
    depends only on the images, not on how they were batched: the same images give the same
    bytes. Writes to ``path`` directly (callers handle atomicity) with ``os.pwrite``, not
    through a memory map: a full disk is an :class:`OSError` (``ENOSPC``) naming ``path``.

    Use as a context manager; on an exception the file is closed as it is.

    Raises
    ------
    CryoSieveInputError
        A count or box below 1, a pixel size that is not a positive number, or images
        of the wrong shape or outside the stack.
    OSError
        The file cannot be made or written (a full disk included), naming ``path``.
    """

    def __init__(self, path: str | os.PathLike[str], count: int, box: int, pixel_size: float, *,
                 label: str = MRC_LABEL) -> None:
        if count < 1 or box < 1:
            raise CryoSieveInputError(f"{path}: a stack needs at least one image of at least one pixel "
                                      f"(got {count} images of {box} x {box})")
        if not (pixel_size > 0 and np.isfinite(pixel_size)):
            raise CryoSieveInputError(f"{path}: pixel size {pixel_size}: must be a positive number of Å")
        self.path, self.count, self.box = Path(path), int(count), int(box)
        self._header = _stack_header(self.count, self.box, float(pixel_size), label)
        self._image_bytes = self.box * self.box * 4
        # per image: minimum, maximum, sum and sum of squares of its pixels (float64)
        self._statistics = np.zeros((self.count, 4), dtype=np.float64)
        self._file: int | None = None
        with self._naming_path():
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                size = HEADER_BYTES + self.count * self._image_bytes
                _reserve(descriptor, size)
                os.ftruncate(descriptor, size)
            except BaseException:
                os.close(descriptor)
                raise
        self._file = descriptor

    @contextlib.contextmanager
    def _naming_path(self) -> Iterator[None]:
        """Give an OSError of a write (which names no file) this stack's path."""
        try:
            yield
        except OSError as error:
            if error.filename is None:
                error.filename = str(self.path)
            raise

    def _range(self, start: int, stop: int) -> int:
        """The open file, ``start:stop`` checked against the stack."""
        if self._file is None:
            raise ValueError(f"{self.path}: the stack writer is closed")
        if not 0 <= start <= stop <= self.count:
            raise CryoSieveInputError(f"{self.path}: images {start}:{stop} lie outside the stack of {self.count}")
        return self._file

    def _offset(self, image: int) -> int:
        return HEADER_BYTES + image * self._image_bytes

    def write(self, start: int, images: np.ndarray) -> None:
        """Write ``images``, ``(b, box, box)`` (converted to float32), as images ``start .. start + b - 1``
        (0-based), replacing what was there."""
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 3 or images.shape[1:] != (self.box, self.box):
            raise CryoSieveInputError(
                f"{self.path}: expected images of shape (b, {self.box}, {self.box}), got {images.shape}")
        descriptor = self._range(start, start + len(images))
        with self._naming_path():
            _write_all(descriptor, np.ascontiguousarray(images, dtype="<f4").tobytes(), self._offset(start))
        as_double = images.astype(np.float64)
        self._statistics[start: start + len(images)] = np.stack(
            [images.min(axis=(1, 2)), images.max(axis=(1, 2)), as_double.sum(axis=(1, 2)),
             (as_double**2).sum(axis=(1, 2))], axis=1)

    def read(self, start: int, stop: int) -> np.ndarray:
        """A copy of images ``start .. stop - 1`` (0-based) as written so far, ``(stop - start, box, box)``
        float32."""
        descriptor = self._range(start, stop)
        wanted = (stop - start) * self._image_bytes
        with self._naming_path():
            data = bytearray()
            while len(data) < wanted:
                chunk = os.pread(descriptor, wanted - len(data), self._offset(start) + len(data))
                if not chunk:
                    raise OSError(f"{self.path}: ends before image {stop}")
                data += chunk
        return np.frombuffer(bytes(data), dtype="<f4").astype(np.float32).reshape(stop - start, self.box, self.box)

    def close(self) -> None:
        """Write the header with the statistics of the whole stack and close the file (again: nothing)."""
        if self._file is None:
            return
        pixels = float(self.count) * self.box * self.box
        minimum, maximum, total, squares = self._statistics.T
        mean = float(total.sum()) / pixels
        header = self._header
        header.dmin, header.dmax, header.dmean = float(minimum.min()), float(maximum.max()), mean
        header.rms = math.sqrt(max(float(squares.sum()) / pixels - mean * mean, 0.0))
        descriptor, self._file = self._file, None
        try:
            with self._naming_path():
                _write_all(descriptor, header.tobytes(), 0)
        finally:
            os.close(descriptor)

    def __enter__(self) -> StackWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        if exc_type is None:
            self.close()
        elif self._file is not None:
            os.close(self._file)
            self._file = None


def _stack_header(count: int, box: int, pixel_size: float, label: str) -> np.recarray:
    """The 1024-byte MRC header of a float32 image stack, as ``mrcfile`` makes it (statistics unset)."""
    from mrcfile.mrcinterpreter import MrcInterpreter

    header_maker = MrcInterpreter()
    header_maker._create_default_attributes()
    header_maker._set_new_data(np.broadcast_to(np.float32(0), (count, box, box)))  # shape and mode only
    header_maker.update_header_from_data()
    header_maker.set_image_stack()
    set_fixed_label(header_maker.header, label)
    header_maker.voxel_size = pixel_size
    header: np.recarray = header_maker.header
    return header


def _file_allocation() -> Callable[..., int] | None:
    """Linux's ``fallocate`` from the C library, or ``None`` where there is none. Not
    ``posix_fallocate``, which on a file system without the call writes a byte per block instead
    (hours for a large stack on NFS)."""
    try:
        import ctypes

        library = ctypes.CDLL(None, use_errno=True)
        function = library.fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function


_FALLOCATE = _file_allocation()


def _reserve(descriptor: int, size: int) -> None:
    """Allocate ``size`` bytes of the file now where the file system can, so that a disk too small
    fails here (OSError ENOSPC); elsewhere the file is written as it is (a write to a full disk is
    an OSError too)."""
    import ctypes
    import errno

    if _FALLOCATE is None or _FALLOCATE(descriptor, 0, 0, size) == 0:
        return
    number = ctypes.get_errno()
    if number == errno.ENOSPC or number == errno.EDQUOT:
        raise OSError(number, os.strerror(number))


def _write_all(descriptor: int, data: bytes, offset: int) -> None:
    """``os.pwrite`` until every byte of ``data`` is at ``offset``."""
    view = memoryview(data)
    while view:
        written = os.pwrite(descriptor, view, offset)
        view, offset = view[written:], offset + written


class BatchImages:
    """The images of one batch of rows, read a slice at a time when the consumer asks.

    For the CPU scorer: each slice is copied into one buffer, reused from slice to slice,
    and transformed at once while it is still in the caches (read and FFT together took
    18 instead of 21 us per image at box 128 on 2 cores, against reading the whole batch
    first).
    """

    def __init__(self, reader: StackReader, rows: Sequence[int] | np.ndarray) -> None:
        self.reader = reader
        self.rows = np.asarray(rows, dtype=np.int64)
        self.box = reader.box_size()
        self._buffer: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Images ``start:stop`` of the batch, ``(stop - start, n, n)`` float32, in a buffer
        that the next call overwrites (:meth:`StackReader.read` on all cores: call it from
        one thread only)."""
        count = stop - start
        if self._buffer is None or len(self._buffer) < count:
            self._buffer = np.empty((count, self.box, self.box), dtype=np.float32)
        return self.reader.read(self.rows[start:stop], parallel=True, out=self._buffer[:count])


def prefetch_batches(reader: StackReader, batches: Sequence[np.ndarray], depth: int = 2,
                     background: bool = True, on_demand: bool = False, pinned: bool = False
                     ) -> Iterator[tuple[np.ndarray, np.ndarray | BatchImages | torch.Tensor]]:
    """Yield ``(rows, images)`` for each batch of rows, reading ahead.

    ``background=True``: a thread reads up to ``depth`` batches ahead, for a consumer that
    leaves the CPU free (a GPU). ``background=False``: each batch is read when it is
    needed, on all cores, after asking the operating system to fetch the next batch's
    pages meanwhile (:meth:`StackReader.advise`); for a consumer that keeps the cores busy
    itself, where a reading thread only competes with it (measured 15 % slower scoring on
    2 cores at box 128). With ``on_demand`` as well, ``images`` is a :class:`BatchImages`
    that the consumer reads slice by slice. With ``background`` and ``pinned``, when CUDA is
    present, each batch is read straight into page-locked host memory and yielded as a
    ``(b, n, n)`` float32 CPU tensor, for an asynchronous copy to the GPU
    (:func:`images_on`; PyTorch's caching host allocator reuses a buffer only once its copy
    is done). Errors raised while reading are re-raised in the consumer.
    """
    if background:
        return _read_in_background(reader, batches, depth, pinned and _cuda_available())
    return _read_in_turn(reader, batches, on_demand)


#: How far ahead (bytes of images) :func:`prefetch_batches` asks for pages when reading in turn.
ADVICE_BYTES = 256 << 20
#: Reading in turn hands over to a reading thread when, over :data:`PROBE_BATCHES` batches after the first,
#: reading took more than this fraction of the time: slow storage (NFS, Lustre, a throttled mount),
#: where overlapping reading and computing gains more than the thread costs.
SLOW_READING = 0.25
PROBE_BATCHES = 4


def _read_in_turn(reader: StackReader, batches: Sequence[np.ndarray], on_demand: bool = False
                  ) -> Iterator[tuple[np.ndarray, np.ndarray | BatchImages | torch.Tensor]]:
    # The advice covers the next batches up to ADVICE_BYTES at once, every so many batches,
    # so that rows close in the file merge into few calls. The calls cost about 2 us per
    # image at box 128 even when the stack is already cached (the kernel checks each page),
    # so a thread makes them while this one works; with the page cache dropped they saved
    # 5 % on this project's machine (local disk), far more on slower storage, where each
    # page fault would otherwise wait for the disk.
    batches = list(batches)
    requests: queue.Queue[np.ndarray | None] = queue.Queue()

    def advise() -> None:
        while (rows := requests.get()) is not None:
            with contextlib.suppress(Exception):  # only a hint: reading the batch reports any real problem
                reader.advise(rows)

    adviser = threading.Thread(target=advise, daemon=True)
    adviser.start()
    started, reading = time.perf_counter(), reader.read_seconds
    try:
        advised = 0  # batches[:advised] have been advised (or read)
        for position, rows in enumerate(batches):
            if position == 1:  # the probe leaves out the first batch, which pays the consumer's one-time costs
                started, reading = time.perf_counter(), reader.read_seconds
            if position == 1 + PROBE_BATCHES:
                spent = time.perf_counter() - started
                if reader.read_seconds - reading > SLOW_READING * spent:
                    yield from _read_in_background(reader, batches[position:], 2)
                    return
            if advised <= position + 1 < len(batches):
                box = reader.box_size()
                per_batch = max(1, max(len(batch) for batch in batches) * box * box * 4)
                stop = min(len(batches), position + 1 + max(1, ADVICE_BYTES // per_batch))
                requests.put(np.concatenate(batches[position + 1:stop]))
                advised = stop
            yield rows, BatchImages(reader, rows) if on_demand else reader.read(rows, parallel=True)
    finally:
        requests.put(None)
        adviser.join()


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def images_on(images: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch of :func:`prefetch_batches` as a tensor on ``device``: page-locked tensors are copied
    asynchronously, arrays as usual."""
    import torch

    if isinstance(images, torch.Tensor):
        return images.to(device, non_blocking=images.is_pinned())
    return torch.from_numpy(images).to(device)


def _read_in_background(reader: StackReader, batches: Sequence[np.ndarray], depth: int, pinned: bool = False
                        ) -> Iterator[tuple[np.ndarray, np.ndarray | torch.Tensor]]:
    slots: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def read(rows: np.ndarray) -> np.ndarray | torch.Tensor:
        if not pinned or not len(rows):
            return reader.read(rows)
        import torch

        box = reader.box_size()
        buffer = torch.empty((len(rows), box, box), dtype=torch.float32, pin_memory=True)
        reader.read(rows, out=buffer.numpy())
        return buffer

    def work() -> None:
        try:
            for rows in batches:
                if stop.is_set():
                    return
                slots.put((rows, read(rows)))
        except BaseException as error:  # passed to the consumer
            slots.put(error)
            return
        slots.put(None)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                slots.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
