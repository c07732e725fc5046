"""How the library reports progress without printing: a factory the caller gives.

``progress(description, total)`` is a context manager yielding ``update(count)``, called
with the number of particles done since the last call. The command line gives one that
draws a progress bar (and stops the work when the user interrupts it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

#: ``progress(description, total)`` -> context manager yielding ``update(count)``.
ProgressFactory = Callable[[str, int], contextlib.AbstractContextManager[Callable[[int], None]]]


@contextlib.contextmanager
def no_progress(_description: str, _total: int) -> Iterator[Callable[[int], None]]:
    """The factory that reports nothing."""
    yield lambda _count: None
