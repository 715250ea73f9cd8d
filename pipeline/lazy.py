"""Package faces that import their modules on first use (PEP 562), so that a light import stays light.

A face maps each public name to the module of its package that defines it; ``from pipeline.features import
run_extract`` then imports ``pipeline.features.extract`` (and torch) only at that moment, while the report can
import the torch-free ``pipeline.features.images`` through the same package without loading the backbone.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_face(
    package: str, modules: Mapping[str, tuple[str, ...]]
) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``(__all__, __getattr__, __dir__)`` for ``package``; ``modules`` maps each module (relative to the package)
    to the public names it defines."""
    exports = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        globals_of_package = importlib.import_module(package).__dict__
        globals_of_package[name] = value  # the next lookup is a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted(exports)

    return sorted(exports), __getattr__, __dir__
