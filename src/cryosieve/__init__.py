"""CryoSieve: sieve the particles of a refined single-particle cryo-EM stack.

Each particle is scored by ``||HP(CTF * P(V) - T(I))||^2 - ||HP(T(I))||^2`` against
the masked half map of its random half-set, and the lowest-scoring fraction is kept.
"""

from cryosieve.errors import CryoSieveInputError

#: The package version, defined here only (``pyproject.toml`` reads it).
__version__ = "0.2.0"
__all__ = ["CryoSieveInputError", "__version__"]
