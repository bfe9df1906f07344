"""Document-retrieval language models over one passage collection: In-Context RALM, REPLUG and FLARE,
with BM25 and dense retrievers that share one ``search(queries, k) -> (scores, doc_ids)`` contract."""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_IMPORT_STRUCTURE = {
    ".bm25": ["BM25Retriever"],
    ".chunking": ["chunk_documents"],
    ".dense": ["DenseRetriever", "sentence_encoder"],
    ".flare": ["FLAREOutput", "flare_generate"],
    ".loading": ["load_retriever"],
    ".logits_process": ["InContextRALMProcessor", "REPLUGProcessor"],
    ".perplexity": ["evaluate_retrieval_perplexity"],
    ".qa": ["answer_questions"],
    ".retriever": ["Retriever"],
    ".settings": ["RetrievalSettings"],
}
__getattr__, __dir__ = lazy_exports(__name__, _IMPORT_STRUCTURE)
__all__ = [name for names in _IMPORT_STRUCTURE.values() for name in names]

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
