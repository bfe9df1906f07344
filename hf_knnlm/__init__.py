"""hf_knnlm: retrieval-augmented language models (kNN-LM, REALM open-QA, RAG) for transformers.

Importing the package is cheap and needs neither faiss nor torch: every name below is imported on
first use. The model types hf_knnlm defines are registered with transformers' Auto classes as soon
as transformers loads them (:mod:`hf_knnlm.auto_classes`).
"""

from typing import TYPE_CHECKING

from . import auto_classes
from ._lazy import lazy_exports
from ._version import __version__

# Public name -> the module that defines it.
_EXPORTS = {
    "Datastore": ".datastore",
    "DatastoreConfig": ".datastore",
    "FolderInUseError": ".files",
    "IntegrityError": ".files",
    "FFNInputCapture": ".hooks",
    "find_ffn_module": ".hooks",
    "KNNSettings": ".knn",
    "interpolate": ".knn",
    "knn_log_probs": ".knn",
    "KNNProcessor": ".logits_process",
    "KNNLMConfig": ".configuration_knnlm",
    "KNNLMForCausalLM": ".modeling_knnlm",
    "DocumentIndex": ".open_qa",
    "IndexRefreshCallback": ".open_qa",
    "RealmConfig": ".open_qa",
    "RealmDataCollator": ".open_qa",
    "RealmForOpenQA": ".open_qa",
    "RealmOpenQAOutput": ".open_qa",
    "train_realm": ".open_qa",
    "BM25Retriever": ".rag",
    "DenseRetriever": ".rag",
    "InContextRALMProcessor": ".rag",
    "REPLUGProcessor": ".rag",
    "chunk_documents": ".rag",
    "evaluate_retrieval_perplexity": ".rag",
    "flare_generate": ".rag",
    "evaluate_perplexity": ".scoring",
    "tune": ".scoring",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = ["__version__", *_EXPORTS]

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
