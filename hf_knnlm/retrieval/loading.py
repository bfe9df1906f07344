"""Open a saved retriever by what its folder holds: a BM25 index or a dense document index."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..utils.hub import fetch_snapshot
from .bm25 import CONFIG_NAME as BM25_CONFIG
from .bm25 import BM25Retriever
from .dense import DenseRetriever
from .embedder import sentence_encoder
from .retriever import Retriever

DENSE_CONFIG = "document_index.json"


def load_retriever(
    path: str | os.PathLike, encoder: str | os.PathLike | None = None, **kwargs: Any
) -> Retriever:
    """A [`BM25Retriever`][hf_knnlm.retrieval.BM25Retriever] (folder with ``bm25_config.json``) or a
    [`DenseRetriever`][hf_knnlm.retrieval.DenseRetriever] (folder with ``document_index.json``; ``encoder`` is
    the sentence encoder that embedded it, by default the one its metadata names).

    Examples:

    ```python
    >>> from hf_knnlm.retrieval import BM25Retriever, load_retriever
    >>> bm25 = BM25Retriever.build([{"text": "The cat sat on the mat."}, {"text": "Dogs bark."}])
    >>> folder = bm25.save_pretrained("bm25")
    >>> retriever = load_retriever("bm25")  # the kind is read from the folder's config
    >>> type(retriever).__name__, retriever.search(["dogs"], k=1)[1].tolist()
    ('BM25Retriever', [[1]])
    ```
    """
    folder = Path(path).expanduser()
    source: str | Path = folder
    if not folder.is_dir():  # a Hub id (or no such folder): the configs it holds say which kind it is
        hub = {
            key: kwargs[key]
            for key in ("revision", "cache_dir", "token", "local_files_only")
            if key in kwargs
        }
        hint = "; build a retriever with `hf-knnlm rag-index`"
        folder = fetch_snapshot(path, hint, allow_patterns=[BM25_CONFIG, DENSE_CONFIG], **hub)
        source = str(path)
    if (folder / BM25_CONFIG).is_file():
        return BM25Retriever.from_pretrained(source, **kwargs)
    if (folder / DENSE_CONFIG).is_file():
        from transformers import AutoTokenizer

        from .document_index import DocumentIndex

        index = DocumentIndex.from_pretrained(source, **kwargs)
        encoder = encoder or index.metadata.get("encoder")
        if not encoder:
            raise ValueError(
                f"{folder} is a dense index without a recorded encoder; pass encoder=<its path>."
            )
        return DenseRetriever(index, sentence_encoder(encoder), AutoTokenizer.from_pretrained(encoder))
    raise FileNotFoundError(
        f"{folder} holds neither {BM25_CONFIG} (BM25) nor {DENSE_CONFIG} (dense index); build one with "
        "`hf-knnlm rag-index`."
    )


__all__ = ["load_retriever"]
