"""Document-retrieval language models over one passage collection: In-Context RALM, REPLUG and FLARE,
with BM25 and dense retrievers that share one ``search(queries, k) -> (scores, doc_ids)`` contract."""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_EXPORTS = {
    "BM25Retriever": ".bm25",
    "DenseRetriever": ".dense",
    "FLAREOutput": ".flare",
    "InContextRALMProcessor": ".logits_process",
    "REPLUGProcessor": ".logits_process",
    "RetrievalSettings": ".settings",
    "Retriever": ".retriever",
    "answer_questions": ".qa",
    "chunk_documents": ".chunking",
    "evaluate_retrieval_perplexity": ".perplexity",
    "flare_generate": ".flare",
    "load_retriever": ".loading",
    "sentence_encoder": ".dense",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .bm25 import BM25Retriever
    from .chunking import chunk_documents
    from .dense import DenseRetriever, sentence_encoder
    from .flare import FLAREOutput, flare_generate
    from .loading import load_retriever
    from .logits_process import InContextRALMProcessor, REPLUGProcessor
    from .perplexity import evaluate_retrieval_perplexity
    from .qa import answer_questions
    from .retriever import Retriever
    from .settings import RetrievalSettings
