"""Retrieval inside attention: Unlimiformer (test-time top-k keys of the whole input, one faiss index
per layer) and Memorizing Transformers (a gated kNN memory of earlier (key, value) pairs in one layer),
for the Llama family and GPT-2, through transformers' attention interface."""

from .memorizing import MemorizingTransformer
from .memory import KNNMemory
from .settings import MemorizingSettings, UnlimiformerSettings
from .unlimiformer import Unlimiformer, windowed_log_probs

__all__ = [
    "KNNMemory",
    "MemorizingSettings",
    "MemorizingTransformer",
    "Unlimiformer",
    "UnlimiformerSettings",
    "windowed_log_probs",
]
