"""Direct Fourier inversion of a particle stack (a stand-in for ``relion_reconstruct``).

For a particle with RELION matrix ``A``, origin ``o`` (pixels) and CTF ``C``, the
origin-shifted, centred transform of its image satisfies
``S(k) = C(k) * Vhat(A^T k)`` (see :mod:`cryosieve.geometry`), ``Vhat`` being the 3D
DFT of the map centred at voxel ``n // 2``. The reconstruction is, as RELION's,
the data weighted by a gridding weight ``M`` close to the inverse of the weight::

    Vhat(K) = M(K) sum_i C_i S_i,    M ~ 1 / sum_i C_i^2  (smoothed over a few voxels)

accumulated on a grid padded by ``pad_factor`` (2, as RELION):

1. each image's ``rfft2`` samples with ``|k| < n / 2`` are shifted by its origin and
   multiplied by its CTF, ``rlnCtfBfactor`` and ``rlnCtfScalefactor`` included, as RELION
   does (:mod:`.samples`, :mod:`cryosieve.fourier`, :mod:`cryosieve.ctf`);
2. each sample is placed at ``pad * A^T k`` and spread to its 8 trilinear neighbours,
   ``C S`` into the data and ``C^2`` into the weight of the half-transform grid (by the
   numba engine, :mod:`.cpu`, or the tensor engine, :mod:`.tensor_path`);
3. the ``x = 0`` plane is made Hermitian, the grid is symmetrised for a point group
   (RELION's ``BackProjector::applyPointGroupSymmetry``), multiplied by the gridding
   weight of RELION's iterative weight correction (``BackProjector::reconstruct``;
   :func:`.grid.gridding_multiplier`), inverse transformed, cropped to ``n``, masked
   outside the sphere of radius ``n/2`` (RELION's ``softMaskOutsideMap``, which
   ``relion_reconstruct`` applies too) and divided by ``sinc^2`` (RELION's
   ``griddingCorrect``) (:mod:`.grid`).

Modules, one concept each:

* :mod:`.grid`: the padded half-transform grid: its layout and conventions (stated there
  once) and the operations on it, numba and torch side by side;
* :mod:`.samples`: which ``rfft2`` samples of an image are inserted (the per-particle values,
  origin phases and CTF, come with each :class:`~cryosieve.batch.ParticleBatch`);
* :mod:`.cpu`: the numba engine (insertion kernels and per-thread accumulation grids);
  it does not import torch;
* :mod:`.tensor_path`: the tensor engine (the same insertion with torch, any device);
* :mod:`.api`: stack to maps, with the ``engine`` keyword: :func:`reconstruct`,
  :func:`reconstruct_subsets`, :func:`reconstruct_star_file`.

Importing this package does not import torch; the tensor engine imports it when used.
"""

from cryosieve.reconstruct.api import ENGINES, choose_engine, reconstruct, reconstruct_star_file, reconstruct_subsets
from cryosieve.reconstruct.cpu import (
    ACCUMULATION_MEMORY,
    PREFETCH_DISTANCE,
    GridAccumulators,
    NumbaInsertion,
    insert_slices_cpu,
    locate_samples,
    prepare_slices_cpu,
)
from cryosieve.reconstruct.grid import (
    GRIDDING_ITERATIONS,
    MASK_EDGE_WIDTH,
    RELATIVE_REGULARISATION,
    enforce_hermitian,
    finish_grid,
    grid_shape,
    grid_to_map,
    gridding_multiplier,
    symmetrise_grid,
)
from cryosieve.reconstruct.samples import SliceSamples

__all__ = [
    "ACCUMULATION_MEMORY", "ENGINES", "GRIDDING_ITERATIONS", "MASK_EDGE_WIDTH",
    "PREFETCH_DISTANCE", "RELATIVE_REGULARISATION", "GridAccumulators", "NumbaInsertion", "SliceSamples",
    "choose_engine", "enforce_hermitian", "finish_grid", "grid_shape", "grid_to_map",
    "gridding_multiplier", "insert_slices_cpu", "locate_samples", "prepare_slices_cpu", "reconstruct",
    "reconstruct_star_file", "reconstruct_subsets", "symmetrise_grid",
]
