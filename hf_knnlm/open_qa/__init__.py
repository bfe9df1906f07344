"""REALM open-domain QA on transformers 5: dense retriever + span reader, FAISS document index, Trainer
support.

Importing this package registers ``RealmConfig`` / ``RealmForOpenQA`` with ``AutoConfig`` / ``AutoModel``
(model type ``realm_open_qa``), so a saved model loads with ``AutoModel.from_pretrained``.
"""

from transformers import AutoConfig, AutoModel

from .callbacks import IndexRefreshCallback
from .configuration import RealmConfig
from .data import RealmDataCollator, build_features, normalize_answers, precompute_retrieval, retrieve
from .document_index import DocumentIndex, embed_corpus
from .evaluation import evaluate_gold, evaluate_open, retrieval_recall
from .modeling import RealmForOpenQA, RealmOpenQAOutput, RealmPreTrainedModel
from .reader_training import prepare_reader_features, train_reader
from .squad import load_squad, load_squad_open
from .tokenization import RealmTokenizerPair
from .training import realm_optimizer, train_realm

AutoConfig.register(RealmConfig.model_type, RealmConfig, exist_ok=True)
AutoModel.register(RealmConfig, RealmForOpenQA, exist_ok=True)

__all__ = [
    "DocumentIndex",
    "IndexRefreshCallback",
    "RealmConfig",
    "RealmDataCollator",
    "RealmForOpenQA",
    "RealmOpenQAOutput",
    "RealmPreTrainedModel",
    "RealmTokenizerPair",
    "build_features",
    "embed_corpus",
    "evaluate_gold",
    "evaluate_open",
    "load_squad",
    "load_squad_open",
    "prepare_reader_features",
    "normalize_answers",
    "precompute_retrieval",
    "realm_optimizer",
    "retrieval_recall",
    "retrieve",
    "train_reader",
    "train_realm",
]
