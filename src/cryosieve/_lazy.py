"""Package faces that load their modules on first use (PEP 562), so that importing one light module of a
package (the settings a command checks before it computes) does not load torch with its neighbours."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_names(package: str, where: Mapping[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: the name ``name`` taken from the module ``where[name]`` (a
    module of ``package``, or a full name with dots) when it is first asked for."""

    def getattr_(name: str) -> object:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = where[name] if "." in where[name] else f"{package}.{where[name]}"
        return getattr(importlib.import_module(module), name)

    return getattr_
