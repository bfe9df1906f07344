"""Passage retrieval shared by the retrieval-augmented LMs (``rag/``) and REALM (``open_qa/``).

One contract, ``search(queries, k) -> (scores, doc_ids)`` (``retriever.py``); BM25 (``bm25.py``) and
dense retrieval (``dense.py``) over a FAISS inner-product [`DocumentIndex`][hf_knnlm.retrieval.DocumentIndex]
(``document_index.py``) of passages embedded by a [`RetrieverEmbedder`][hf_knnlm.retrieval.RetrieverEmbedder]
(``embedder.py``); passages cut from a corpus (``chunking.py``) and their storage (``documents.py``); a saved
retriever of either kind by folder or Hub id (``loading.py``).
"""

from typing import TYPE_CHECKING

from ..utils.lazy import lazy_exports

_IMPORT_STRUCTURE = {
    ".bm25": ["BM25Retriever"],
    ".chunking": ["chunk_documents"],
    ".dense": ["DenseRetriever"],
    ".document_index": ["DocumentIndex", "embed_corpus"],
    ".embedder": ["RetrieverEmbedder", "sentence_encoder"],
    ".loading": ["load_retriever"],
    ".retriever": ["Retriever"],
}
__getattr__, __dir__ = lazy_exports(__name__, _IMPORT_STRUCTURE)
__all__ = [name for names in _IMPORT_STRUCTURE.values() for name in names]

if TYPE_CHECKING:
    from .bm25 import BM25Retriever
    from .chunking import chunk_documents
    from .dense import DenseRetriever
    from .document_index import DocumentIndex, embed_corpus
    from .embedder import RetrieverEmbedder, sentence_encoder
    from .loading import load_retriever
    from .retriever import Retriever
