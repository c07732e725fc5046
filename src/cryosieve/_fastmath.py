"""Vectorisable sine and exponential for the numba kernels (a libm call in a loop stops
the compiler from vectorising it). Plain arithmetic only; accuracy stated and tested
against libm in ``tests/test_ctf.py``."""

from __future__ import annotations

import math

import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency
    numba = None  # type: ignore[assignment]  # None marks numba as missing

AVAILABLE = numba is not None

_INVERSE_PI = 1.0 / math.pi
# Taylor coefficients of sin (float32)
_S3 = np.float32(-1.0 / 6.0)
_S5 = np.float32(1.0 / 120.0)
_S7 = np.float32(-1.0 / 5040.0)
_S9 = np.float32(1.0 / 362880.0)
_S11 = np.float32(-1.0 / 39916800.0)
#: exp(-x) is evaluated as exp(-x / 2^EXP_SQUARINGS) squared EXP_SQUARINGS times.
EXP_SQUARINGS = 10
#: Arguments of :func:`fast_exp_neg` are clamped here (exp(-700) is 1e-304).
EXP_LIMIT = 700.0


def _fast_sin(x):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    # sin(x) for |x| < ~1e6 rad: reduction to [-pi/2, pi/2] in float64, then the
    # float32 Taylor polynomial to x^11 (error < 6e-8 there).
    n = math.floor(x * _INVERSE_PI + 0.5)
    r = np.float32(x - n * math.pi)
    r2 = r * r
    p = r * (np.float32(1.0) + r2 * (_S3 + r2 * (_S5 + r2 * (_S7 + r2 * (_S9 + r2 * _S11)))))
    half_turns = n * 0.5
    odd = half_turns - math.floor(half_turns)  # 0 for even n, 0.5 for odd n
    return p * np.float32(1.0 - 4.0 * odd)


def _fast_exp_neg(x):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    # exp(-x) for x >= 0 (float64): y = x / 1024 <= 0.69 after clamping, the Taylor
    # polynomial to y^6 (relative error < 1.4e-13 for x <= 64, where exp(-x) > 1e-28), then
    # ten squarings (relative error x 1024: < 2e-10). Beyond x = 64 the error grows but the
    # value is below 1e-28.
    y = min(x, EXP_LIMIT) * (1.0 / 1024.0)
    p = 1.0 - y * (1.0 - y * (0.5 - y * (1.0 / 6.0 - y * (1.0 / 24.0 - y * (1.0 / 120.0 - y * (1.0 / 720.0))))))
    for _ in range(EXP_SQUARINGS):
        p = p * p
    return p


if AVAILABLE:
    fast_sin = numba.njit(fastmath=True, inline="always", cache=True)(_fast_sin)
    fast_exp_neg = numba.njit(fastmath=True, inline="always", cache=True)(_fast_exp_neg)
