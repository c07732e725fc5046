"""Shared command-line plumbing: device choice, logging, error reporting."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from cryosieve.errors import CryoSieveInputError

if TYPE_CHECKING:
    import torch

EXIT_BAD_INPUT = 2

#: Device nodes of a GPU driver that torch can use as "cuda" (NVIDIA; AMD ROCm's /dev/kfd).
_GPU_DRIVER_NODES = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")


def _cuda_available() -> bool:
    # Importing torch takes about a second; on Linux without any GPU driver node there can be
    # no CUDA device, so commands that run their CPU path without torch (cryosieve-reconstruct)
    # skip that import.
    if sys.platform.startswith("linux") and not any(os.path.exists(node) for node in _GPU_DRIVER_NODES):
        return False
    import torch

    return bool(torch.cuda.is_available())


def choose_device_name(name: str) -> str:
    """``auto``: ``"cuda"`` when a CUDA device is present, else ``"cpu"``; ``cpu``; ``cuda``
    (an input error without a GPU)."""
    if name == "auto":
        return "cuda" if _cuda_available() else "cpu"
    if name == "cuda" and not _cuda_available():
        raise CryoSieveInputError("--device cuda: no CUDA device is available")
    return name


def choose_device(name: str) -> torch.device:
    """:func:`choose_device_name` as a ``torch.device``."""
    import torch

    return torch.device(choose_device_name(name))


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to compute: auto (CUDA when present, else CPU), cpu or cuda.")


def setup_logging(verbose: bool = True) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)


def run_command(program: str, body: Callable[[Sequence[str] | None], int | None],
                argv: Sequence[str] | None = None) -> int:
    """Run ``body(argv)``; a bad-input error becomes one line on stderr and exit code 2."""
    try:
        code = body(argv)
    except CryoSieveInputError as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)
