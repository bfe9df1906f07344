"""Scoring a text: sliding-window perplexity (base vs kNN-LM) and cached λ × T × k tuning sweeps."""

from .evaluation import evaluate_perplexity
from .tuning import tune

__all__ = ["evaluate_perplexity", "tune"]
