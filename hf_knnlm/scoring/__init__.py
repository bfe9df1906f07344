"""Scoring a text: sliding-window perplexity (base vs kNN-LM) and cached λ × T × k tuning sweeps."""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_IMPORT_STRUCTURE = {
    ".evaluation": ["evaluate_perplexity"],
    ".tuning": ["tune"],
}
__getattr__, __dir__ = lazy_exports(__name__, _IMPORT_STRUCTURE)
__all__ = [name for names in _IMPORT_STRUCTURE.values() for name in names]

if TYPE_CHECKING:
    from .evaluation import evaluate_perplexity
    from .tuning import tune
