"""Scoring a text: sliding-window perplexity (base vs kNN-LM) and cached λ × T × k tuning sweeps."""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_EXPORTS = {"evaluate_perplexity": ".evaluation", "tune": ".tuning"}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .evaluation import evaluate_perplexity
    from .tuning import tune
