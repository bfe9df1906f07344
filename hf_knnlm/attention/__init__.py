"""Retrieval inside attention: Unlimiformer (test-time top-k keys of the whole input, one faiss index
per layer, ``unlimiformer.py``) and Memorizing Transformers (a gated kNN memory of earlier (key, value)
pairs in one layer, ``memorizing.py``), for the Llama family and GPT-2, through transformers' attention
interface (``interface.py``, ``adapters.py``); the bounded faiss memory both use (``memory.py``) and
their settings (``settings.py``); perplexity of long documents by window, Unlimiformer, Memorizing
Transformers or full attention (``evaluation.py``)."""

from typing import TYPE_CHECKING

from ..utils.lazy import lazy_exports

_IMPORT_STRUCTURE = {
    ".evaluation": ["full_attention_log_probs", "long_context_perplexity"],
    ".memorizing": ["MemorizingTransformer"],
    ".memory": ["KNNMemory"],
    ".settings": ["MemorizingSettings", "UnlimiformerSettings"],
    ".training": ["train_memorizing_gate"],
    ".unlimiformer": ["Unlimiformer", "windowed_log_probs"],
}
__getattr__, __dir__ = lazy_exports(__name__, _IMPORT_STRUCTURE)
__all__ = [name for names in _IMPORT_STRUCTURE.values() for name in names]

if TYPE_CHECKING:
    from .evaluation import full_attention_log_probs, long_context_perplexity
    from .memorizing import MemorizingTransformer
    from .memory import KNNMemory
    from .settings import MemorizingSettings, UnlimiformerSettings
    from .training import train_memorizing_gate
    from .unlimiformer import Unlimiformer, windowed_log_probs
