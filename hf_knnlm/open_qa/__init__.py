"""REALM open-domain QA on transformers 5: dense retriever + span reader, FAISS document index, Trainer
support.

``RealmConfig`` / ``RealmForOpenQA`` (model type ``realm_open_qa``) are registered with ``AutoConfig`` /
``AutoModel`` as soon as transformers loads them (see ``hf_knnlm.auto_classes``), so a saved model loads
with ``AutoModel.from_pretrained`` after ``import hf_knnlm``. Names here are imported on first use.
"""

from typing import TYPE_CHECKING

from ..utils.lazy import lazy_exports

_IMPORT_STRUCTURE = {
    ".callbacks": ["IndexRefreshCallback"],
    ".configuration": ["RealmConfig"],
    ".data": ["RealmDataCollator", "build_features", "normalize_answers", "precompute_retrieval", "retrieve"],
    "..retrieval.document_index": ["DocumentIndex", "embed_corpus"],
    ".evaluation": ["evaluate_gold", "evaluate_open", "retrieval_recall"],
    ".modeling": ["RealmForOpenQA", "RealmOpenQAOutput", "RealmPreTrainedModel"],
    ".reader_training": ["prepare_reader_features", "train_reader"],
    ".squad": ["load_squad", "load_squad_open"],
    ".tokenization": ["RealmTokenizerPair"],
    ".training": ["realm_optimizer", "train_realm"],
}
__getattr__, __dir__ = lazy_exports(__name__, _IMPORT_STRUCTURE)
__all__ = [name for names in _IMPORT_STRUCTURE.values() for name in names]

if TYPE_CHECKING:
    from ..retrieval.document_index import DocumentIndex, embed_corpus
    from .callbacks import IndexRefreshCallback
    from .configuration import RealmConfig
    from .data import RealmDataCollator, build_features, normalize_answers, precompute_retrieval, retrieve
    from .evaluation import evaluate_gold, evaluate_open, retrieval_recall
    from .modeling import RealmForOpenQA, RealmOpenQAOutput, RealmPreTrainedModel
    from .reader_training import prepare_reader_features, train_reader
    from .squad import load_squad, load_squad_open
    from .tokenization import RealmTokenizerPair
    from .training import realm_optimizer, train_realm
