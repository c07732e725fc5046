"""Particle stacks to maps: :func:`reconstruct`, :func:`reconstruct_subsets`, :func:`reconstruct_star_file`.

Each reads the stack once in batches (:func:`~cryosieve.io.stack.prefetch_batches`),
inserts every batch with one engine, and turns each accumulated grid into a map
(:func:`cryosieve.reconstruct.grid.finish_grid`). The engine (keyword ``engine``):

* ``"numba"``: the CPU kernels of :mod:`.cpu` (``device`` must be the CPU);
* ``"torch"``: the tensor code of :mod:`.tensor_path` on ``device`` (the CPU included);
* ``"auto"`` (default): numba on the CPU, torch on any other device.

Memory is bounded by the grids (``(2n+1)^2 (n+2)`` voxels of 3 float64 each per map:
0.2 GB at box 128, 1.6 GB at box 256) plus one batch, and while a map is finished three
float32 arrays of ``(2n+1)^2 (n+1)`` voxels for its gridding weight (0.1 GB at box 128,
0.8 GB at box 256), never by the number of particles.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from cryosieve.batch import ParticleBatch
from cryosieve.errors import CryoSieveInputError, setting
from cryosieve.io.stack import BatchImages, StackReader, prefetch_batches
from cryosieve.particles import ParticleSet
from cryosieve.progress import ProgressFactory, no_progress
from cryosieve.reconstruct import cpu
from cryosieve.reconstruct.grid import finish_grid
from cryosieve.symmetry import canonical_name, symmetry_matrices
from cryosieve.world import World, job_progress
from cryosieve.world import current as current_world

if TYPE_CHECKING:
    import torch

log = logging.getLogger("cryosieve")

#: The values of the ``engine`` keyword.
ENGINES = ("auto", "numba", "torch")


def choose_engine(engine: str, device: torch.device | str) -> str:
    """``"numba"`` or ``"torch"``: the engine that ``engine`` (one of :data:`ENGINES`) means on ``device``.

    Raises :class:`~cryosieve.errors.CryoSieveInputError` for an unknown engine, or numba
    asked for off the CPU or without numba installed.
    """
    on_cpu = str(device).split(":")[0] == "cpu"
    if engine == "auto":
        return "numba" if on_cpu and cpu.AVAILABLE else "torch"
    if engine == "numba":
        if not on_cpu:
            raise CryoSieveInputError(f"{setting('engine')} numba: runs on the CPU only, not on {device}")
        if not cpu.AVAILABLE:
            raise CryoSieveInputError(f"{setting('engine')} numba: numba is not installed")
        return engine
    if engine == "torch":
        return engine
    raise CryoSieveInputError(f"{setting('engine')} {engine!r}: expected one of {', '.join(ENGINES)}")


class Insertion(Protocol):
    """An engine's insertion of a reconstruction's batches into its grids (:class:`~.cpu.NumbaInsertion`,
    :class:`~.tensor_path.TensorInsertion`; chosen once, :func:`make_insertion`)."""

    def insert(self, images: Any, batch: ParticleBatch, labels: np.ndarray) -> None: ...

    def pop(self, group: int) -> Any: ...

    def snapshot(self, group: int) -> Any: ...

    def release(self) -> None: ...


def make_insertion(engine: str, box: int, pad_factor: int, groups: Sequence[int], apply_ctf: bool, batch_size: int,
                   device: torch.device | str) -> Insertion:
    """The insertion of ``engine`` (``"numba"`` or ``"torch"``, :func:`choose_engine`) into one grid per group
    of ``groups`` for ``box``-pixel images."""
    if engine == "numba":
        return cpu.NumbaInsertion(box, pad_factor, groups, apply_ctf, batch_size)
    from cryosieve.reconstruct.tensor_path import TensorInsertion

    return TensorInsertion(box, pad_factor, groups, apply_ctf, device)


def torch_device_type(device: str) -> str:
    """``"cuda"`` of ``"cuda:1"``: the kind of a device's name."""
    return device.split(":")[0]


def _selected_rows(table: ParticleSet, rows: np.ndarray | None) -> np.ndarray:
    if rows is None:
        return np.arange(len(table), dtype=np.int64)
    rows = np.asarray(rows)
    if rows.dtype == bool:
        if rows.shape != (len(table),):
            raise CryoSieveInputError(f"{table.path}: row mask has {rows.size} entries for {len(table)} particles")
        return np.flatnonzero(rows)
    rows = rows.astype(np.int64, copy=False).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= len(table)):
        raise CryoSieveInputError(f"{table.path}: selected row outside the {len(table)} particles")
    return rows


def _check_pixel_size(table: ParticleSet, rows: np.ndarray) -> float:
    pixel = table.pixel_size[rows]
    if np.any(np.abs(pixel - pixel[0]) > 1e-6 * pixel[0]):
        raise CryoSieveInputError(
            f"{table.path}: particles have different pixel sizes ({pixel.min():g} to {pixel.max():g} Å); "
            "reconstruct each optics group separately"
        )
    return float(pixel[0])


def reconstruct_subsets(table: ParticleSet, reader: StackReader, *, subsets: Sequence[int] = (1, 2),
                        rows: np.ndarray | None = None, symmetry: str = "C1", apply_ctf: bool = True,
                        pad_factor: int = 2, batch_size: int = 128, device: torch.device | str = "cpu",
                        engine: str = "auto", progress: Callable[[int], None] | None = None,
                        unions: dict[int, Sequence[int]] | None = None) -> dict[int, np.ndarray]:
    """One map per half-set (``rlnRandomSubset``), reading the stack once.

    Parameters
    ----------
    table, reader:
        The particles and their images.
    subsets:
        ``rlnRandomSubset`` values to reconstruct; each must select at least one particle.
    rows:
        Optional selection (integer rows or boolean mask) of the table; default all.
    symmetry:
        RELION point group (:func:`cryosieve.symmetry.symmetry_matrices`).
    apply_ctf:
        CTF correction (``relion_reconstruct --ctf``).
    pad_factor:
        Oversampling of the Fourier grid (2, as RELION).
    batch_size:
        Images per batch.
    device:
        Where to compute.
    engine:
        ``"numba"`` (CPU kernels), ``"torch"`` (tensor code on ``device``, the CPU included)
        or ``"auto"``: numba on the CPU, torch elsewhere (:func:`choose_engine`).
    progress:
        Called with the number of particles just inserted, after each batch.
    unions:
        Further maps, each of the particles of several subsets: ``{label: subsets}`` (labels not among
        ``subsets``). Their grids are the sums of their subsets' grids, so each is the map those
        particles make together, at no further reading or insertion.

    Returns
    -------
    ``{subset: (n, n, n) float32 map [z, y, x]}`` (and ``{label: map}`` of each union), voxel size = the
    particles' pixel size.
    """
    selected = _selected_rows(table, rows)
    if table.random_subset is None:
        raise CryoSieveInputError(f"{table.path}: column rlnRandomSubset missing (needed for half-set maps)")
    subsets = [int(value) for value in subsets]
    members = {value: selected[table.random_subset[selected] == value] for value in subsets}
    for value, chosen in members.items():
        if chosen.size == 0:
            raise CryoSieveInputError(f"{table.path}: no particles with rlnRandomSubset {value}")
    merged = {int(label): [int(value) for value in parts] for label, parts in (unions or {}).items()}
    for label, parts in merged.items():
        if label in subsets or not parts or not set(parts) <= set(subsets):
            raise ValueError(f"union {label}: needs a new label and subsets among {subsets}, got {parts}")
    keep = np.isin(table.random_subset[selected], subsets)
    return _reconstruct(table, reader, selected[keep], table.random_subset[selected[keep]], subsets,
                        symmetry=symmetry, apply_ctf=apply_ctf, pad_factor=pad_factor, batch_size=batch_size,
                        device=device, engine=engine, progress=progress, unions=merged)


def reconstruct(table: ParticleSet, reader: StackReader, *, rows: np.ndarray | None = None,
                symmetry: str = "C1", apply_ctf: bool = True, pad_factor: int = 2, batch_size: int = 128,
                device: torch.device | str = "cpu", engine: str = "auto",
                progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Reconstruct one map from the selected particles (all by default).

    Same keywords as :func:`reconstruct_subsets`. Returns a ``(n, n, n)`` float32 map
    ``[z, y, x]`` centred at voxel ``n // 2`` whose projections match the images (same
    scale as ``relion_reconstruct``); the voxel size is the particles' pixel size.
    """
    selected = _selected_rows(table, rows)
    if selected.size == 0:
        raise CryoSieveInputError(f"{table.path}: no particles selected for reconstruction")
    labels = np.zeros(selected.size, dtype=np.int64)
    return _reconstruct(table, reader, selected, labels, [0], symmetry=symmetry, apply_ctf=apply_ctf,
                        pad_factor=pad_factor, batch_size=batch_size, device=device, engine=engine,
                        progress=progress)[0]


def nested_subset_maps(table: ParticleSet, reader: StackReader, steps: Sequence[np.ndarray], *,
                       subsets: Sequence[int] = (1, 2), symmetry: str = "C1", apply_ctf: bool = True,
                       pad_factor: int = 2, batch_size: int = 128, device: torch.device | str = "cpu",
                       engine: str = "auto", progress: Callable[[int], None] | None = None
                       ) -> Iterator[dict[int, np.ndarray]]:
    """Half-set maps of growing nested selections, reading every image once.

    ``steps``: disjoint integer row arrays; after step ``j`` the generator yields
    ``{subset: (n, n, n) float32 map}`` of every particle in ``steps[0..j]``, each map
    exactly what :func:`reconstruct_subsets` makes of those rows (the grids are sums over
    particles, so each step only inserts its own rows). Every subset must have a particle
    in the first step. Other keywords as for :func:`reconstruct_subsets`.
    """
    if table.random_subset is None:
        raise CryoSieveInputError(f"{table.path}: column rlnRandomSubset missing (needed for half-set maps)")
    groups = [int(value) for value in subsets]
    chosen = [_selected_rows(table, rows) for rows in steps]
    chosen = [rows[np.isin(table.random_subset[rows], groups)] for rows in chosen]
    if not chosen:
        raise CryoSieveInputError(f"{table.path}: no particles selected for reconstruction")
    for value in groups:
        if not np.any(table.random_subset[chosen[0]] == value):
            raise CryoSieveInputError(f"{table.path}: no particles with rlnRandomSubset {value}")
    yield from _accumulate(table, reader, chosen, [table.random_subset[rows] for rows in chosen], groups,
                           symmetry=symmetry, apply_ctf=apply_ctf, pad_factor=pad_factor, batch_size=batch_size,
                           device=device, engine=engine, progress=progress)


def _reconstruct(table: ParticleSet, reader: StackReader, rows: np.ndarray, labels: np.ndarray,
                 groups: Sequence[int], *, symmetry: str, apply_ctf: bool, pad_factor: int, batch_size: int,
                 device: torch.device | str, engine: str, progress: Callable[[int], None] | None,
                 unions: dict[int, list[int]] | None = None) -> dict[int, np.ndarray]:
    if rows.size == 0:
        raise CryoSieveInputError(f"{table.path}: no particles selected for reconstruction")
    (maps,) = _accumulate(table, reader, [rows], [labels], groups, symmetry=symmetry, apply_ctf=apply_ctf,
                          pad_factor=pad_factor, batch_size=batch_size, device=device, engine=engine, progress=progress,
                          unions=unions)
    return maps


def _accumulate(table: ParticleSet, reader: StackReader, steps: Sequence[np.ndarray], step_labels: Sequence[np.ndarray],
                groups: Sequence[int], *, symmetry: str, apply_ctf: bool, pad_factor: int, batch_size: int,
                device: torch.device | str, engine: str, progress: Callable[[int], None] | None,
                unions: dict[int, list[int]] | None = None) -> Iterator[dict[int, np.ndarray]]:
    """Insert ``steps`` (rows, with the map of each in ``step_labels``) one after the other and yield the maps
    of ``groups`` (and of their ``unions``) after each (:class:`InsertionTask`; in a ``torchrun`` job every rank
    inserts its share)."""
    if pad_factor < 1:
        raise CryoSieveInputError(f"pad factor must be >= 1, got {pad_factor}")
    if batch_size < 1:
        raise CryoSieveInputError(f"{setting('batch_size')} {batch_size}: must be at least 1")
    symmetry_matrices(symmetry)  # an unknown group is refused before anything is handed out
    _check_pixel_size(table, np.concatenate(steps))
    task = InsertionTask(table, reader.directory, list(steps), list(step_labels), list(groups), symmetry, apply_ctf,
                         pad_factor, batch_size, str(device), choose_engine(engine, device), dict(unions or {}))
    world = current_world()
    world.hand_out(task)
    yield from task.maps(world, reader, progress)


@dataclass
class InsertionTask:
    """Reconstruction as a task of a ``torchrun`` job (:mod:`cryosieve.world`), and in one process.

    Every rank inserts its contiguous share of each step's rows into grids of its own (data and
    CTF^2 weight, float64); after each step the grids are summed on rank 0, which finishes the maps
    (from a copy of the grids, except after the last step), and the map of each union from the sum of its
    groups' grids. Fields as for :func:`_accumulate`.
    """

    table: ParticleSet
    directory: Any
    steps: list[np.ndarray]
    step_labels: list[np.ndarray]
    groups: list[int]
    symmetry: str
    apply_ctf: bool
    pad_factor: int
    batch_size: int
    device: str
    engine: str
    unions: dict[int, list[int]] = field(default_factory=dict)

    def run(self, world: World) -> None:
        """A rank other than 0: its part of every step."""
        with StackReader(self.table, self.directory) as reader:
            for _ in self.maps(world, reader, None):
                pass

    def maps(self, world: World, reader: StackReader, progress: Callable[[int], None] | None
             ) -> Iterator[dict[int, np.ndarray]]:
        """After each step, ``{group: (n, n, n) float32 map}`` on rank 0 (nothing on the others).
        ``progress``: called with the particles inserted (rank 0's, counted for every rank: :func:`job_progress`)."""
        rotations_group = symmetry_matrices(self.symmetry)
        device = world.device(self.device)
        insertion: Insertion | None = None
        error: BaseException | None = None
        box = 0
        try:
            box = reader.validate()
            insertion = make_insertion(self.engine, box, self.pad_factor, self.groups, self.apply_ctf, self.batch_size,
                                       device)
        except Exception as raised:
            error = raised
        world.check(error)
        assert insertion is not None
        workspace: list[np.ndarray] = []  # the gridding weight's work arrays, reused from map to map
        try:
            for index, (rows, labels) in enumerate(zip(self.steps, self.step_labels, strict=True)):
                try:
                    share = world.share(np.arange(rows.size))
                    self._insert(insertion, reader, rows[share], labels[share],
                                 job_progress(progress, world, int(rows.size)))
                except Exception as raised:
                    error = raised
                world.check(error)
                last = index == len(self.steps) - 1
                grids = {group: insertion.pop(group) if last else insertion.snapshot(group) for group in self.groups}
                for grid in grids.values():
                    world.sum_to_root(grid)
                if world.is_root:
                    for label, members in self.unions.items():  # summed before any grid is finished (in place)
                        total = grids[members[0]] + grids[members[1]] if len(members) > 1 else grids[members[0]] * 1
                        for member in members[2:]:
                            total += grids[member]
                        grids[label] = total
                    yield {group: finish_grid(grid, box, self.pad_factor, rotations_group, workspace)
                           for group, grid in grids.items()}
                del grids
        finally:
            insertion.release()

    def _insert(self, insertion: Insertion, reader: StackReader, rows: np.ndarray, labels: np.ndarray,
                progress: Callable[[int], None] | None) -> None:
        batches = [rows[start:start + self.batch_size] for start in range(0, rows.size, self.batch_size)]
        label_of = dict(zip(rows.tolist(), labels.tolist(), strict=True))
        pinned = self.engine == "torch" and torch_device_type(self.device) == "cuda"
        for batch_rows, images in prefetch_batches(reader, batches, pinned=pinned):
            assert not isinstance(images, BatchImages)  # whole batches (not read on demand)
            batch_labels = np.array([label_of[row] for row in batch_rows.tolist()])
            insertion.insert(images, ParticleBatch.from_table(self.table, batch_rows), batch_labels)
            if progress is not None:
                progress(len(batch_rows))


def reconstruct_star_file(star: str, out: str, *, angpix: float | None = None, symmetry: str = "C1",
                          apply_ctf: bool = True, subset: int | None = None, directory: str | None = None,
                          batch_size: int = 128, device: torch.device | str = "cpu", engine: str = "auto",
                          progress: ProgressFactory = no_progress) -> tuple[Path, int]:
    """One map from files to a file (``cryosieve-reconstruct``, RELION's ``relion_reconstruct``).

    ``subset`` 1 or 2 selects that ``rlnRandomSubset`` (anything else: every particle, as
    RELION); ``engine`` as for :func:`reconstruct_subsets`. Refuses an output that would
    land on an input or in an unwritable place before reading any image; writes ``out``
    atomically. Returns its path and the number of particles used.
    """
    from cryosieve.io.atomic import remove_stale_temporaries_of
    from cryosieve.io.mrc import write_volume
    from cryosieve.io.paths import InputFile, check_outputs
    from cryosieve.io.stack import stack_paths
    from cryosieve.io.star import read_particles

    if not str(out).strip():
        raise CryoSieveInputError(f"{setting('output')}: empty output path")
    if batch_size < 1:
        raise CryoSieveInputError(f"{setting('batch_size')} {batch_size}: must be at least 1")
    symmetry = canonical_name(symmetry)
    chosen = choose_engine(engine, device)
    table = read_particles(star, angpix)
    inputs = [InputFile(Path(star), "particle STAR file")]
    inputs += [InputFile(path, f"particle stack of {star}") for path in stack_paths(table, directory)]
    check_outputs([out], inputs)
    rows = np.arange(len(table))
    if subset in (1, 2):  # RELION: 1 or 2 selects a half-set, anything else all particles
        if table.random_subset is None:
            raise CryoSieveInputError(f"{star}: column rlnRandomSubset missing (needed by {setting('subset')})")
        rows = np.flatnonzero(table.random_subset == subset)
        if rows.size == 0:
            raise CryoSieveInputError(
                f"{setting('subset')} {subset}: no particles with rlnRandomSubset {subset} in {star}")
    remove_stale_temporaries_of([out])
    with StackReader(table, directory) as reader:
        box = reader.validate()
        pixel = _check_pixel_size(table, rows)
        log.info("reconstructing %d particles (box %d, %.4g Å/px, symmetry %s, CTF %s) on %s (%s)", rows.size, box,
                 pixel, symmetry, "on" if apply_ctf else "off", device, chosen)
        with progress("inserting", int(rows.size)) as update:
            volume = reconstruct(table, reader, rows=rows, symmetry=symmetry, apply_ctf=apply_ctf,
                                 batch_size=batch_size, device=device, engine=chosen, progress=update)
    write_volume(out, volume, pixel)
    return Path(out), int(rows.size)
