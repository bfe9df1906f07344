"""hf_knnlm's model types in transformers' Auto classes, registered as soon as transformers loads them.

``import hf_knnlm`` loads neither torch nor transformers, yet afterwards ``AutoConfig.from_pretrained``
and ``AutoModel.from_pretrained`` must know the model types this package defines. Each of our config
and model modules registers itself when imported; a post-import hook imports them right after
transformers' auto module that needs them has loaded (at once if it already has).

A registration waits while a module it depends on is half-initialised (transformers importing
itself in a cycle, or our own module being the one that is importing transformers: it registers
itself when it finishes).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import logging
import sys
import threading
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

# transformers module defining Auto classes -> our modules that register with them when imported.
REGISTRATIONS: dict[str, tuple[str, ...]] = {
    "transformers.models.auto.configuration_auto": (
        "hf_knnlm.knnlm.configuration_knnlm",
        "hf_knnlm.open_qa.configuration",
        "hf_knnlm.open_qa.pretraining.configuration",
    ),
    "transformers.models.auto.modeling_auto": (
        "hf_knnlm.open_qa.modeling",
        "hf_knnlm.open_qa.pretraining.modeling",
    ),
}
# Importing our model modules needs these complete (they define PreTrainedConfig / PreTrainedModel).
_PREREQUISITES = ("transformers.configuration_utils", "transformers.modeling_utils")

_lock = threading.RLock()
_pending: list[tuple[str, str]] = [
    (trigger, ours) for trigger, mods in REGISTRATIONS.items() for ours in mods
]


def _initializing(name: str) -> bool:
    module = sys.modules.get(name)
    return module is not None and bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _loaded(name: str, just_loaded: str | None) -> bool:
    return name == just_loaded or (name in sys.modules and not _initializing(name))


def register_pending(just_loaded: str | None = None) -> None:
    """Import every module of ours whose transformers counterpart is loaded (and complete)."""
    with _lock:
        if any(_initializing(p) for p in _PREREQUISITES if p != just_loaded):
            return  # retried when that module finishes (it is watched too)
        for entry in list(_pending):
            trigger, ours = entry
            if entry not in _pending or not _loaded(trigger, just_loaded) or _initializing(ours):
                continue  # done by a nested call, not needed yet, or registers itself when it finishes
            try:
                importlib.import_module(ours)
            except Exception as err:  # never break the user's import of transformers; retried later
                logger.debug("registering %s with the Auto classes failed (%r); will retry", ours, err)
                continue
            if entry in _pending:
                _pending.remove(entry)
        if not _pending and _FINDER in sys.meta_path:
            sys.meta_path.remove(_FINDER)


class _Loader(importlib.abc.Loader):
    """Runs a watched module's own loader, then ``register_pending``."""

    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        register_pending(just_loaded=module.__name__)

    def __getattr__(self, name: str) -> Any:  # get_source, get_data, ... of the real loader
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds watched transformers modules with the other finders and wraps their loader."""

    def find_spec(
        self, fullname: str, path: Any, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


_WATCHED = frozenset(REGISTRATIONS) | frozenset(_PREREQUISITES)
_FINDER = _Finder()


def install() -> None:
    """Register now what transformers has already loaded, and watch for the rest."""
    with _lock:
        if _pending and _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
    register_pending()


__all__ = ["REGISTRATIONS", "install", "register_pending"]
