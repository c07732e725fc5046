"""Shared command-line plumbing: device choice, logging, error reporting."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

import torch

from cryosieve.errors import CryoSieveInputError

EXIT_BAD_INPUT = 2


def choose_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else CPU; ``cpu``; ``cuda`` (an input error without a GPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CryoSieveInputError("--device cuda: no CUDA device is available")
    return torch.device(name)


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
