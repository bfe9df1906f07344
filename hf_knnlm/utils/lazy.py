"""Lazy package attributes (PEP 562): a package names what it exports; each is imported on first use.

``import hf_knnlm`` then costs almost nothing and needs neither faiss nor torch; ``hf_knnlm.Datastore``
imports the datastore modules when it is first read.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, structure: dict[str, list[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``; ``structure`` maps relative modules to the
    names they export, as transformers' ``_import_structure`` does.

    Examples:

    ```python
    >>> __getattr__, __dir__ = lazy_exports("hf_knnlm", {".datastore": ["Datastore"]})
    >>> __getattr__("Datastore").__name__  # imported now, on first use
    'Datastore'
    ```
    """
    exports = {name: module for module, names in structure.items() for name in names}

    def __getattr__(name: str) -> Any:
        try:
            module_name = exports[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(module_name, package), name)
        setattr(sys.modules[package], name, value)  # later reads skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
