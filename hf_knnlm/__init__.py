"""hf_knnlm: retrieval-augmented language models (kNN-LM, REALM open-QA) for transformers."""

__version__ = "0.1.0"

from .config import DatastoreConfig  # noqa: E402
from .datastore import Datastore  # noqa: E402
from .evaluation import evaluate_perplexity  # noqa: E402
from .hooks import FFNInputCapture, find_ffn_module  # noqa: E402
from .knn import KNNSettings, interpolate, knn_log_probs  # noqa: E402
from .logits_process import KNNProcessor  # noqa: E402
from .modeling_knnlm import KNNLMConfig, KNNLMForCausalLM  # noqa: E402
from .open_qa import (  # noqa: E402  (also registers RealmConfig/RealmForOpenQA with the Auto classes)
    DocumentIndex,
    IndexRefreshCallback,
    RealmConfig,
    RealmDataCollator,
    RealmForOpenQA,
    RealmOpenQAOutput,
    train_realm,
)
from .tuning import tune  # noqa: E402

__all__ = [
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
