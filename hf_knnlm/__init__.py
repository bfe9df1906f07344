"""hf_knnlm: retrieval-augmented language models (kNN-LM, REALM open-QA, RAG, Unlimiformer, Memorizing
Transformers) for transformers.

Importing the package is cheap and needs neither faiss nor torch: every name below is imported on
first use. The model types hf_knnlm defines are registered with transformers' Auto classes as soon
as transformers loads them (``hf_knnlm.auto_classes``).

Layout: ``knnlm/`` the kNN-LM method (settings, mixture, search policies, processor, wrapper,
evaluation, tuning, RetoMaton, gate, attribution); ``datastore/`` the store it searches;
``retrieval/`` passage indexes (BM25, dense, chunking) shared by ``rag/`` (In-Context RALM, REPLUG,
FLARE) and ``open_qa/`` (REALM); ``attention/`` retrieval inside attention (Unlimiformer,
Memorizing Transformers); ``lm/`` running a causal LM (FFN hooks, windows, corpora, batched
forwards, loading); ``utils/`` files, Hub, checks, fingerprints, lazy imports.
"""

from typing import TYPE_CHECKING

from . import auto_classes
from ._version import __version__
from .utils.lazy import lazy_exports

# Module -> the public names it defines (as transformers' _import_structure).
_IMPORT_STRUCTURE = {
    ".attention": [
        "KNNMemory",
        "MemorizingSettings",
        "MemorizingTransformer",
        "Unlimiformer",
        "UnlimiformerSettings",
        "long_context_perplexity",
        "train_memorizing_gate",
        "windowed_log_probs",
    ],
    ".datastore": ["Datastore", "DatastoreConfig", "Neighbours", "compress_datastore"],
    ".knnlm": [
        "GateTraining",
        "KNNLMConfig",
        "KNNLMForCausalLM",
        "KNNProcessor",
        "KNNSettings",
        "PerplexityOutput",
        "RetoMaton",
        "RetrievalGate",
        "TuningGrid",
        "TuningOutput",
        "evaluate_perplexity",
        "explain_generation",
        "interpolate",
        "knn_log_probs",
        "mix",
        "render_html",
        "train_gate",
        "tune",
    ],
    ".lm": ["FFNInputCapture", "WindowSettings", "find_ffn_module"],
    ".open_qa": [
        "IndexRefreshCallback",
        "RealmConfig",
        "RealmDataCollator",
        "RealmForOpenQA",
        "RealmOpenQAOutput",
        "train_realm",
    ],
    ".rag": [
        "RetrievalPerplexityOutput",
        "RetrievalSettings",
        "InContextRALMProcessor",
        "REPLUGProcessor",
        "evaluate_retrieval_perplexity",
        "flare_generate",
    ],
    ".retrieval": ["BM25Retriever", "DenseRetriever", "DocumentIndex", "chunk_documents"],
    ".utils": ["FolderInUseError", "IntegrityError"],
}
__getattr__, __dir__ = lazy_exports(__name__, _IMPORT_STRUCTURE)
__all__ = ["__version__", *(name for names in _IMPORT_STRUCTURE.values() for name in names)]

if TYPE_CHECKING:
    from .attention import (
        KNNMemory,
        MemorizingSettings,
        MemorizingTransformer,
        Unlimiformer,
        UnlimiformerSettings,
        long_context_perplexity,
        train_memorizing_gate,
        windowed_log_probs,
    )
    from .datastore import Datastore, DatastoreConfig, Neighbours, compress_datastore
    from .knnlm import (
        GateTraining,
        KNNLMConfig,
        KNNLMForCausalLM,
        KNNProcessor,
        KNNSettings,
        PerplexityOutput,
        RetoMaton,
        RetrievalGate,
        TuningGrid,
        TuningOutput,
        evaluate_perplexity,
        explain_generation,
        interpolate,
        knn_log_probs,
        mix,
        render_html,
        train_gate,
        tune,
    )
    from .lm import FFNInputCapture, WindowSettings, find_ffn_module
    from .open_qa import (
        IndexRefreshCallback,
        RealmConfig,
        RealmDataCollator,
        RealmForOpenQA,
        RealmOpenQAOutput,
        train_realm,
    )
    from .rag import (
        InContextRALMProcessor,
        REPLUGProcessor,
        RetrievalPerplexityOutput,
        RetrievalSettings,
        evaluate_retrieval_perplexity,
        flare_generate,
    )
    from .retrieval import BM25Retriever, DenseRetriever, DocumentIndex, chunk_documents
    from .utils import FolderInUseError, IntegrityError

auto_classes.install()
