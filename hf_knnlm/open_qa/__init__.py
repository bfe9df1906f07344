"""REALM open-domain QA on transformers 5: dense retriever + span reader, FAISS document index, Trainer
support.

``RealmConfig`` / ``RealmForOpenQA`` (model type ``realm_open_qa``) are registered with ``AutoConfig`` /
``AutoModel`` as soon as transformers loads them (see :mod:`hf_knnlm.auto_classes`), so a saved model loads
with ``AutoModel.from_pretrained`` after ``import hf_knnlm``. Names here are imported on first use.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_EXPORTS = {
    "DocumentIndex": ".document_index",
    "IndexRefreshCallback": ".callbacks",
    "RealmConfig": ".configuration",
    "RealmDataCollator": ".data",
    "RealmForOpenQA": ".modeling",
    "RealmOpenQAOutput": ".modeling",
    "RealmPreTrainedModel": ".modeling",
    "RealmTokenizerPair": ".tokenization",
    "build_features": ".data",
    "embed_corpus": ".document_index",
    "evaluate_gold": ".evaluation",
    "evaluate_open": ".evaluation",
    "load_squad": ".squad",
    "load_squad_open": ".squad",
    "prepare_reader_features": ".reader_training",
    "normalize_answers": ".data",
    "precompute_retrieval": ".data",
    "realm_optimizer": ".training",
    "retrieval_recall": ".evaluation",
    "retrieve": ".data",
    "train_reader": ".reader_training",
    "train_realm": ".training",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
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
