"""A whole known-truth data set: checked inputs, rendered stack, tables, maps and half maps.

Everything is written through :mod:`cryosieve.io` into a staging folder that replaces the
output folder at the end (all files together or none). Conventions as stated in
:mod:`cryosieve.simulate`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryosieve.io.atomic import OutputGroup, remove_stale_temporaries_of
from cryosieve.io.mrc import write_volume_to
from cryosieve.io.stack import StackWriter
from cryosieve.io.star import write_star_to
from cryosieve.io.tables import write_csv_to
from cryosieve.mask import soft_mask
from cryosieve.projection import FourierSliceProjector
from cryosieve.simulate.images import (
    ImageFormation,
    SignalStatistics,
    add_coloured_noise,
    add_noise,
    noise_filter,
    noise_sigma,
)
from cryosieve.simulate.inputs import check_inputs, check_output_folder
from cryosieve.simulate.models import atomic_model_map
from cryosieve.simulate.parameters import ParticleParameters, SimulationSettings, draw_parameters
from cryosieve.simulate.tables import STACK_NAME, STAR_NAME, TRUTH_CSV_NAME, star_blocks, truth_table

#: Header label of every MRC file of a simulated data set (fixed: same data, same bytes).
MRC_LABEL = "cryosieve-simulate"


@dataclass
class SimulationResult:
    """Where the simulated data set was written and what it holds."""

    folder: Path
    star: Path
    stack: Path
    truth_map: Path
    mask: Path
    truth_csv: Path
    half_maps: tuple[Path, Path] | None
    junk_count: int
    signal_variance: float  # pooled variance of the main model's noiseless images
    noise_variance: float  # 0 without noise


@contextlib.contextmanager
def _staging_folder(target: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside ``target``, renamed onto it on success (replacing an old one).

    On failure the temporary folder, and any parent folders created for it, are removed.
    """
    check_output_folder(target, overwrite)
    remove_stale_temporaries_of([target])
    with OutputGroup() as group:
        yield group.folder_for(target)


def _batches(count: int, batch_size: int) -> list[np.ndarray]:
    """Consecutive ``(b,)`` int64 index ranges of at most ``batch_size`` covering ``0 .. count - 1``."""
    return [np.arange(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


def _render_stack(writer: StackWriter, parameters: ParticleParameters, settings: SimulationSettings,
                  projectors: dict[bool, FourierSliceProjector], formation: ImageFormation,
                  progress: Callable[[int], None] | None, empty_generator: np.random.Generator) -> float:
    """Write every noiseless image, one batch at a time; returns the signal variance (of the main model's
    particles). Empty images are written at unit variance (:func:`_finish_stack` scales them).

    ``projectors``: by junk flag (``False``: the main model). Memory: one batch of images.
    """
    statistics = SignalStatistics()
    empty = parameters.is_empty if parameters.is_empty is not None else np.zeros(len(parameters), dtype=bool)
    for rows in _batches(len(parameters), settings.batch_size):
        images = torch.empty((len(rows), settings.box, settings.box), dtype=torch.float32, device=formation.device)
        for junk, projector in projectors.items():
            members = np.flatnonzero((parameters.is_junk[rows] == junk) & ~empty[rows])
            if members.size:
                images[torch.as_tensor(members, device=formation.device)] = formation.render(
                    projector, parameters, rows[members], settings)
        members = np.flatnonzero(empty[rows])
        if members.size:
            images[torch.as_tensor(members, device=formation.device)] = formation.render_empty(
                parameters, rows[members], settings, empty_generator)
        block = images.cpu().numpy()
        writer.write(int(rows[0]), block)
        statistics.add(block, ~parameters.is_junk[rows] & ~empty[rows])
        if progress is not None:
            progress(len(rows))
    return statistics.variance()


def _finish_stack(writer: StackWriter, parameters: ParticleParameters, settings: SimulationSettings,
                  signal_variance: float, sigma: float, generator: np.random.Generator) -> None:
    """Scale the empty images to the particles' signal variance and add the noise of standard deviation
    ``sigma`` (white; or coloured and scaled per micrograph, :class:`SimulationSettings`) to every written
    image, one batch at a time."""
    empty = parameters.is_empty
    coloured = settings.noise_bfactor > 0 or parameters.noise_scale is not None
    if sigma == 0 and (empty is None or not empty.any()):
        return
    amplitude = noise_filter(settings.box, settings.pixel_size, settings.noise_bfactor, settings.noise_floor) \
        if settings.noise_bfactor > 0 else np.ones((settings.box, settings.box // 2 + 1))
    for rows in _batches(settings.num_particles, settings.batch_size):
        block = writer.read(int(rows[0]), int(rows[-1]) + 1)
        if empty is not None:
            block[empty[rows]] *= np.float32(np.sqrt(signal_variance))
        if sigma > 0 and coloured:
            scale = parameters.noise_scale[rows] if parameters.noise_scale is not None else np.ones(len(rows))
            add_coloured_noise(block, sigma * scale, amplitude, generator)
        elif sigma > 0:
            add_noise(block, sigma, generator)
        writer.write(int(rows[0]), block)


def simulate_particles(output_folder: str | os.PathLike[str], settings: SimulationSettings, *,
                       model: str | None = None, junk_model: str | None = None,
                       device: torch.device | str = "cpu", overwrite: bool = False,
                       progress: Callable[[int], None] | None = None) -> SimulationResult:
    """Simulate a known-truth particle data set into ``output_folder``.

    Writes, all together or not at all (a temporary folder beside the target is renamed
    at the end), every file through :mod:`cryosieve.io`:

    * ``particles.star``: RELION 3.1 (data_optics, data_particles with poses, origins in
      Å, CTF, rlnOpticsGroup and random halves rlnRandomSubset 1/2; no B-factor), floats
      in the shortest text that reads back to the drawn values;
    * ``particles.mrcs``: the images, float32, written batch by batch (its space reserved first);
    * ``truth.mrc`` (the main model's map), ``junk.mrc`` (the junk model's map, when
      there is junk), ``mask.mrc`` (:func:`soft_mask` of the truth map);
    * ``half1.mrc``/``half2.mrc``: reconstructed from the particles of each half-set
      (with ``settings.half_maps``);
    * ``truth.csv``: per particle rlnImageName, is_junk, bfactor (Å^2), rot, tilt, psi,
      origin_x_angst, origin_y_angst, defocus_u, defocus_v, defocus_angle, random_subset.

    Every MRC file carries the voxel size and the fixed label :data:`MRC_LABEL`: the same
    settings, models and seed give the same bytes, whatever the batch size.

    Parameters
    ----------
    output_folder:
        Folder to create (an existing non-empty one needs ``overwrite``).
    settings:
        What to simulate (:class:`SimulationSettings`).
    model, junk_model:
        PDB/mmCIF files; ``None``: the bundled 1BD2 and 4E43 (HIV protease).
    device:
        Where to render images and reconstruct.
    progress:
        Called with a number of particles after each batch: rendered, then (with half
        maps) reconstructed, ``num_particles`` (or twice that with half maps) in all.
    """
    model, junk_model = check_inputs(output_folder, settings, model=model, junk_model=junk_model,
                                     overwrite=overwrite)
    device = torch.device(device)
    target = Path(output_folder)

    box, pixel = settings.box, settings.pixel_size
    truth = atomic_model_map(model, box, pixel)
    junk = atomic_model_map(junk_model, box, pixel) if settings.junk_count else None
    mask = soft_mask(truth, pixel)
    parameter_seed, noise_seed, empty_seed = np.random.SeedSequence(settings.seed).spawn(3)
    parameters = draw_parameters(settings, np.random.default_rng(parameter_seed))
    formation = ImageFormation(box, pixel, device)
    projectors = {False: FourierSliceProjector(torch.as_tensor(truth, device=device))}
    if junk is not None:
        projectors[True] = FourierSliceProjector(torch.as_tensor(junk, device=device))

    with _staging_folder(target, overwrite) as staging:
        with StackWriter(staging / STACK_NAME, settings.num_particles, box, pixel, label=MRC_LABEL) as writer:
            signal_variance = _render_stack(writer, parameters, settings, projectors, formation, progress,
                                            np.random.default_rng(empty_seed))
            del projectors
            noise_variance, sigma = noise_sigma(signal_variance, settings.snr)
            _finish_stack(writer, parameters, settings, signal_variance, sigma, np.random.default_rng(noise_seed))
        write_star_to(staging / STAR_NAME, star_blocks(parameters, settings))
        maps = {"truth.mrc": truth, "junk.mrc": junk, "mask.mrc": mask}
        for name, volume in maps.items():
            if volume is not None:
                write_volume_to(staging / name, volume, pixel, label=MRC_LABEL)
        write_csv_to(staging / TRUTH_CSV_NAME, truth_table(parameters))
        if settings.half_maps:
            halves = reconstruct_half_maps(staging, device=device, progress=progress)
            for subset, volume in halves.items():
                write_volume_to(staging / f"half{subset}.mrc", volume, pixel, label=MRC_LABEL)

    half_paths = (target / "half1.mrc", target / "half2.mrc") if settings.half_maps else None
    return SimulationResult(
        folder=target, star=target / STAR_NAME, stack=target / STACK_NAME, truth_map=target / "truth.mrc",
        mask=target / "mask.mrc", truth_csv=target / TRUTH_CSV_NAME, half_maps=half_paths,
        junk_count=settings.junk_count, signal_variance=signal_variance, noise_variance=noise_variance,
    )


def reconstruct_half_maps(folder: Path, device: torch.device | str = "cpu",
                          progress: Callable[[int], None] | None = None) -> dict[int, np.ndarray]:
    """Reconstruct the two half maps of a simulated data set from its own particles.

    ``cryosieve.reconstruct.reconstruct_subsets`` (CTF-corrected direct Fourier
    inversion, C1) of the particles with rlnRandomSubset 1 and 2 in ``folder``, as read
    back from its STAR file and stack. Returns ``{1: map, 2: map}``, ``(n, n, n)`` float32
    ``[z, y, x]``.
    """
    from cryosieve.io.stack import StackReader
    from cryosieve.io.star import read_particles
    from cryosieve.reconstruct import reconstruct_subsets

    table = read_particles(folder / STAR_NAME)
    reader = StackReader(table, folder)
    try:
        reader.validate()
        return reconstruct_subsets(table, reader, subsets=(1, 2), symmetry="C1", apply_ctf=True,
                                   device=str(torch.device(device)), progress=progress)
    finally:
        reader.close()
