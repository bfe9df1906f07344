"""hf_knnlm: retrieval-augmented language models (kNN-LM, REALM open-QA, RAG) for transformers.

Importing the package is cheap and needs neither faiss nor torch: every name below is imported on
first use. The model types hf_knnlm defines are registered with transformers' Auto classes as soon
as transformers loads them (:mod:`hf_knnlm.auto_classes`).
"""

from typing import TYPE_CHECKING

from . import auto_classes
from ._lazy import lazy_exports
from ._version import __version__

# Module -> the public names it defines (as transformers' _import_structure).
_IMPORT_STRUCTURE = {
    ".configuration_knnlm": ["KNNLMConfig"],
    ".datastore": ["Datastore", "DatastoreConfig"],
    ".files": ["FolderInUseError", "IntegrityError"],
    ".hooks": ["FFNInputCapture", "find_ffn_module"],
    ".knn": ["KNNSettings", "interpolate", "knn_log_probs"],
    ".logits_process": ["KNNProcessor"],
    ".modeling_knnlm": ["KNNLMForCausalLM"],
    ".open_qa": [
        "DocumentIndex",
        "IndexRefreshCallback",
        "RealmConfig",
        "RealmDataCollator",
        "RealmForOpenQA",
        "RealmOpenQAOutput",
        "train_realm",
    ],
    ".rag": [
        "BM25Retriever",
        "DenseRetriever",
        "InContextRALMProcessor",
        "REPLUGProcessor",
        "chunk_documents",
        "evaluate_retrieval_perplexity",
        "flare_generate",
    ],
    ".scoring": ["evaluate_perplexity", "tune"],
}
__getattr__, __dir__ = lazy_exports(__name__, _IMPORT_STRUCTURE)
__all__ = ["__version__", *(name for names in _IMPORT_STRUCTURE.values() for name in names)]

if TYPE_CHECKING:
    from .configuration_knnlm import KNNLMConfig
    from .datastore import Datastore, DatastoreConfig
    from .files import FolderInUseError, IntegrityError
    from .hooks import FFNInputCapture, find_ffn_module
    from .knn import KNNSettings, interpolate, knn_log_probs
    from .logits_process import KNNProcessor
    from .modeling_knnlm import KNNLMForCausalLM
    from .open_qa import (
        DocumentIndex,
        IndexRefreshCallback,
        RealmConfig,
        RealmDataCollator,
        RealmForOpenQA,
        RealmOpenQAOutput,
        train_realm,
    )
    from .rag import (
        BM25Retriever,
        DenseRetriever,
        InContextRALMProcessor,
        REPLUGProcessor,
        chunk_documents,
        evaluate_retrieval_perplexity,
        flare_generate,
    )
    from .scoring import evaluate_perplexity, tune

auto_classes.install()
