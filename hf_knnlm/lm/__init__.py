"""Running a causal LM: which module is the last FFN and the capture of its input (``hooks.py``),
sliding windows (``windows.py``), corpora as one token stream (``corpus.py``), batched forwards over
windows (``forward.py``) and loading a model + tokenizer by Hub id, folder or GGUF file
(``loading.py``). Shared by building a datastore, scoring and the retrieval-augmented LMs."""

from typing import TYPE_CHECKING

from ..utils.lazy import lazy_exports

_IMPORT_STRUCTURE = {
    ".forward": ["pad_batch"],
    ".hooks": ["FFNInputCapture", "find_ffn_module"],
    ".loading": ["load_model_and_tokenizer"],
    ".windows": ["WindowSettings"],
}
__getattr__, __dir__ = lazy_exports(__name__, _IMPORT_STRUCTURE)
__all__ = [name for names in _IMPORT_STRUCTURE.values() for name in names]

if TYPE_CHECKING:
    from .forward import pad_batch
    from .hooks import FFNInputCapture, find_ffn_module
    from .loading import load_model_and_tokenizer
    from .windows import WindowSettings
