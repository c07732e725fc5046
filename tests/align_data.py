"""Known-truth data for the built-in refinement's tests: simulated particles whose STAR poses and origins are
then turned and moved by known amounts (the simulation's own poses are the truth)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from cryosieve.geometry import euler_to_matrix, matrix_to_euler
from cryosieve.io.star import read_particles
from cryosieve.simulate import SimulationSettings, simulate_particles


@dataclass
class Misaligned:
    """``star``: the particles with some poses turned and origins moved; ``truth``: ``(n, 3, 3)`` true
    matrices; ``origin``: ``(n, 2)`` true origins (pixels); ``turned``, ``shifted``: ``(n,)`` bool, which were."""

    folder: Path
    star: Path
    truth: np.ndarray
    origin: np.ndarray
    turned: np.ndarray
    shifted: np.ndarray


def simulate(folder: Path, count: int, box: int, pixel: float, snr: float, seed: int = 7,
             bfactor: tuple[float, float] = (0.0, 50.0)) -> Path:
    """A simulated set without junk or defects (its STAR file)."""
    settings = SimulationSettings(num_particles=count, box=box, pixel_size=pixel, junk_fraction=0.0, snr=snr,
                                  bfactor_min=bfactor[0], bfactor_max=bfactor[1], seed=seed, half_maps=False)
    simulate_particles(folder, settings)
    return folder / "particles.star"


def misalign(star: Path, out: Path, fraction: float, angles: tuple[float, float] = (5.0, 15.0),
             origins: tuple[float, float] = (3.0, 5.0), seed: int = 1) -> Misaligned:
    """Turn the poses of ``fraction`` of the particles by ``angles`` degrees (random axes) and move their origins
    by ``origins`` pixels (random directions); writes ``out`` beside the stack."""
    table = read_particles(star)
    count = len(table)
    rng = np.random.default_rng(seed)
    chosen = rng.random(count) < fraction
    angle = np.where(chosen, rng.uniform(*angles, count), 0.0)
    axis = rng.normal(size=(count, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    truth = euler_to_matrix(table.rot, table.tilt, table.psi)
    rot, tilt, psi = matrix_to_euler(Rotation.from_rotvec(axis * np.radians(angle)[:, None]).as_matrix() @ truth)
    distance = np.where(chosen, rng.uniform(*origins, count), 0.0)
    direction = rng.uniform(0, 2 * np.pi, count)
    moved = table.with_poses(np.where(chosen, rot, table.rot), np.where(chosen, tilt, table.tilt),
                             np.where(chosen, psi, table.psi), table.origin_x + distance * np.cos(direction),
                             table.origin_y + distance * np.sin(direction))
    moved.write(out)
    return Misaligned(folder=star.parent, star=out, truth=truth,
                      origin=np.stack([table.origin_x, table.origin_y], axis=1), turned=chosen, shifted=chosen)
