"""Document-retrieval language models over one passage collection: In-Context RALM, REPLUG and FLARE,
with BM25 and dense retrievers that share one ``search(queries, k) -> (scores, doc_ids)`` contract."""

from typing import TYPE_CHECKING

from ..utils.lazy import lazy_exports

_IMPORT_STRUCTURE = {
    "..retrieval.bm25": ["BM25Retriever"],
    "..retrieval.chunking": ["chunk_documents"],
    "..retrieval.dense": ["DenseRetriever"],
    "..retrieval.embedder": ["sentence_encoder"],
    ".flare": ["FLAREOutput", "flare_generate"],
    "..retrieval.loading": ["load_retriever"],
    ".logits_process": ["InContextRALMProcessor", "REPLUGProcessor"],
    ".perplexity": ["RetrievalPerplexityOutput", "evaluate_retrieval_perplexity"],
    ".qa": ["answer_questions"],
    "..retrieval.retriever": ["Retriever"],
    ".settings": ["RetrievalSettings"],
}
__getattr__, __dir__ = lazy_exports(__name__, _IMPORT_STRUCTURE)
__all__ = [name for names in _IMPORT_STRUCTURE.values() for name in names]

if TYPE_CHECKING:
    from ..retrieval.bm25 import BM25Retriever
    from ..retrieval.chunking import chunk_documents
    from ..retrieval.dense import DenseRetriever
    from ..retrieval.embedder import sentence_encoder
    from ..retrieval.loading import load_retriever
    from ..retrieval.retriever import Retriever
    from .flare import FLAREOutput, flare_generate
    from .logits_process import InContextRALMProcessor, REPLUGProcessor
    from .perplexity import RetrievalPerplexityOutput, evaluate_retrieval_perplexity
    from .qa import answer_questions
    from .settings import RetrievalSettings
