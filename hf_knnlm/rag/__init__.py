"""Document-retrieval language models over one passage collection: In-Context RALM, REPLUG and FLARE,
with BM25 and dense retrievers that share one ``search(queries, k) -> (scores, doc_ids)`` contract."""

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

__all__ = [
    "BM25Retriever",
    "DenseRetriever",
    "FLAREOutput",
    "InContextRALMProcessor",
    "REPLUGProcessor",
    "RetrievalSettings",
    "Retriever",
    "answer_questions",
    "chunk_documents",
    "evaluate_retrieval_perplexity",
    "flare_generate",
    "load_retriever",
    "sentence_encoder",
]
