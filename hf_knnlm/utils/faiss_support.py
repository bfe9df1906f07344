"""faiss is an optional dependency: ``faiss-cpu`` or ``faiss-gpu``, installed through the extras.

Everything that searches or writes a faiss index imports it through ``import_faiss``, so that
``import hf_knnlm`` works without it and a feature that needs it fails with one line that says
how to install it.
"""

from __future__ import annotations

from types import ModuleType

INSTALL_HINT = "pip install 'hf-knnlm[cpu]' (faiss-cpu) or 'hf-knnlm[gpu]' (faiss-gpu, CUDA)"


class MissingDependencyError(ImportError):
    """An optional dependency a feature needs is not installed; the message says how to install it."""


def import_faiss(feature: str = "this feature") -> ModuleType:
    """The ``faiss`` module, or ``MissingDependencyError`` naming ``feature`` and the install command."""
    try:
        import faiss
    except ImportError as err:
        raise MissingDependencyError(
            f"{feature} needs faiss, which is not installed: {INSTALL_HINT}."
        ) from err
    return faiss


__all__ = ["INSTALL_HINT", "MissingDependencyError", "import_faiss"]
