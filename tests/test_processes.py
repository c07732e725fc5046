"""How this package's processes end (:mod:`cryosieve.processes`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

MODULE = """
import sys
from cryosieve.processes import forget_caught_interrupts
try:
    exec("raise KeyboardInterrupt")  # as a Ctrl-C landing while a dataclass is made
except KeyboardInterrupt:
    pass
if sys.argv[1] == "forget":
    forget_caught_interrupts()
sys.exit(3)
"""


@pytest.mark.parametrize("forget", [False, True])
def test_a_caught_interrupt_leaves_the_exit_code_alone_once_forgotten(tmp_path: Path, forget: bool) -> None:
    """Python's own behaviour (the reason for the function) and the function's repair of it, under ``-m``."""
    (tmp_path / "caught_in_exec.py").write_text(MODULE)
    done = subprocess.run([sys.executable, "-m", "caught_in_exec", "forget" if forget else "keep"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.stderr == ""
    if not forget and done.returncode == 3:
        pytest.skip(f"Python {sys.version.split()[0]} no longer ends such a run by SIGINT")
    assert done.returncode == (3 if forget else -2)
