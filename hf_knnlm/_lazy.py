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
    package: str, exports: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``, whose ``exports`` map names to relative modules.

    Example: ``__getattr__, __dir__ = lazy_exports(__name__, {"Datastore": ".datastore"})``.
    """

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
