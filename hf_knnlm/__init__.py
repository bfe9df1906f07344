"""hf_knnlm: retrieval-augmented language models (kNN-LM, REALM open-QA) for transformers."""

from ._version import __version__
from .datastore import Datastore, DatastoreConfig
from .files import FolderInUseError, IntegrityError
from .hooks import FFNInputCapture, find_ffn_module
from .knn import KNNSettings, interpolate, knn_log_probs
from .logits_process import KNNProcessor
from .modeling_knnlm import KNNLMConfig, KNNLMForCausalLM
from .open_qa import (  # importing it registers RealmConfig/RealmForOpenQA with the Auto classes
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

__all__ = [
    "__version__",
    "BM25Retriever",
    "DenseRetriever",
    "InContextRALMProcessor",
    "REPLUGProcessor",
    "chunk_documents",
    "evaluate_retrieval_perplexity",
    "flare_generate",
    "Datastore",
    "DatastoreConfig",
    "DocumentIndex",
    "IndexRefreshCallback",
    "RealmConfig",
    "RealmDataCollator",
    "RealmForOpenQA",
    "RealmOpenQAOutput",
    "train_realm",
    "FFNInputCapture",
    "FolderInUseError",
    "IntegrityError",
    "KNNLMConfig",
    "KNNLMForCausalLM",
    "KNNProcessor",
    "KNNSettings",
    "evaluate_perplexity",
    "find_ffn_module",
    "interpolate",
    "knn_log_probs",
    "tune",
]
