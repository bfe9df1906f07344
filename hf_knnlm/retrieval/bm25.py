"""BM25 over a passage collection with ``bm25s``, saved as safetensors + JSON.

``bm25s`` keeps its index as a sparse CSC matrix of precomputed BM25 scores (one column per term) and a
term -> column vocabulary. We save exactly those: ``bm25.safetensors`` (``data``, ``indices``,
``indptr`` and, for BM25L/BM25+, ``nonoccurrence``), ``bm25_vocab.json``, the passages in
``documents.jsonl`` and ``bm25_config.json`` (parameters, sizes and the sha256 of every file, checked
before anything is parsed). Nothing is pickled. Saving, loading and pushing are
[`HubMixin`][hf_knnlm.utils.HubMixin]'s, as for datastores and document indexes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from safetensors.numpy import load_file, save_file

from ..utils.files import atomic_path, atomic_write_json
from ..utils.hub_mixin import HubMixin, StoreConfig, render_card
from .documents import read_documents, rows_of, write_documents
from .retriever import check_collection, check_search_args

CONFIG_NAME = "bm25_config.json"
SCORES_NAME = "bm25.safetensors"
VOCAB_NAME = "bm25_vocab.json"
DOCUMENTS_NAME = "documents.jsonl"
FORMAT = "hf_knnlm.bm25"
FORMAT_VERSION = 1
_PARAMS = ("k1", "b", "delta", "method", "idf_method", "dtype", "int_dtype")


def _bm25s():
    try:
        import bm25s
    except ImportError as error:
        raise ImportError("BM25 retrieval needs bm25s: pip install bm25s (or 'hf-knnlm[rag]').") from error
    return bm25s


@dataclass(kw_only=True)
class BM25Config(StoreConfig):
    """The on-disk contract of a BM25 index (``bm25_config.json``)."""

    CONFIG_NAME: ClassVar[str] = CONFIG_NAME
    WHAT: ClassVar[str] = "BM25 index"
    FORMAT_VERSION: ClassVar[int] = FORMAT_VERSION
    FORMAT: ClassVar[str] = FORMAT

    format: str = field(default=FORMAT, metadata={"help": "Identifies the file as a BM25 index."})
    num_documents: int = field(metadata={"help": "Number of passages (lines of documents.jsonl)."})
    vocab_size: int = field(metadata={"help": "Terms in bm25_vocab.json (columns of the score matrix)."})
    params: dict[str, Any] = field(metadata={"help": "bm25s.BM25 arguments: k1, b, delta, method, dtypes."})
    stopwords: str | None = field(default="en", metadata={"help": "Stop-word list used to index and query."})
    include_title: bool = field(default=True, metadata={"help": "Whether titles were indexed with the text."})
    bm25s_version: str = field(default="", metadata={"help": "bm25s version that built the index."})


class BM25Retriever(HubMixin):
    r"""
    Sparse lexical retrieval (BM25, Robertson et al.) over passages, with the retriever contract
    ``search(queries, k) -> (scores, doc_ids)``.

    Text is lower-cased and split into words of two or more characters; English stop words are dropped
    (``stopwords=None`` keeps them). A passage that shares no term with a query scores 0 and is never
    returned (its id is ``-1``). ``search`` only reads the index, so one retriever can serve several threads.

    Args:
        ids, titles, texts (`list[str]`): the passages.
        bm25 (`bm25s.BM25`): an index over exactly these passages.
        stopwords (`str` or `None`): the stop-word list used to index (and so to query).
        include_title (`bool`): whether titles were indexed with the text.

    Examples:

    ```python
    >>> from hf_knnlm.rag import BM25Retriever
    >>> bm25 = BM25Retriever.build([{"title": "Cats", "text": "The cat sat on the mat."},
    ...                             {"title": "Dogs", "text": "A dog chased the ball."}])
    >>> scores, doc_ids = bm25.search(["where did the cat sit?"], k=2)
    >>> doc_ids.tolist()
    [[0, -1]]
    ```
    """

    config_class = BM25Config
    hub_patterns = (DOCUMENTS_NAME, SCORES_NAME, VOCAB_NAME)
    default_commit_message = "Upload BM25 index"

    def __init__(
        self,
        ids: list[str],
        titles: list[str],
        texts: list[str],
        bm25: Any,
        *,
        stopwords: str | None = "en",
        include_title: bool = True,
    ) -> None:
        check_collection(ids, texts, titles)
        self.ids, self.titles, self.texts = ids, titles, texts
        self.bm25 = bm25
        self.stopwords = stopwords
        self.include_title = include_title

    @classmethod
    def build(
        cls,
        documents: Iterable[Mapping[str, Any]],
        *,
        k1: float = 1.5,
        b: float = 0.75,
        method: str = "lucene",
        stopwords: str | None = "en",
        include_title: bool = True,
    ) -> BM25Retriever:
        """Index ``documents`` (rows with ``text`` and optionally ``title`` and ``id``; a
        ``datasets.Dataset`` from [`chunk_documents`][hf_knnlm.retrieval.chunk_documents] works)."""
        bm25s = _bm25s()
        ids, titles, texts = rows_of(documents)
        indexed = [f"{t}\n{x}" if include_title and t else x for t, x in zip(titles, texts, strict=True)]
        tokens = bm25s.tokenize(indexed, stopwords=stopwords, show_progress=False)
        bm25 = bm25s.BM25(k1=k1, b=b, method=method)
        bm25.index(tokens, show_progress=False)
        return cls(ids, titles, texts, bm25, stopwords=stopwords, include_title=include_title)

    def __len__(self) -> int:
        return len(self.texts)

    def __repr__(self) -> str:
        bm25 = self.bm25
        return f"BM25Retriever({len(self)} passages, method={bm25.method!r}, k1={bm25.k1}, b={bm25.b})"

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ``(scores, doc_ids)`` for each query, best first; ``-1`` / ``0.0`` where fewer match."""
        queries = check_search_args(queries, k, len(self))
        scores = np.zeros((len(queries), k), dtype=np.float32)
        positions = np.full((len(queries), k), -1, dtype=np.int64)
        if not queries:
            return scores, positions
        tokens = _bm25s().tokenize(queries, stopwords=self.stopwords, return_ids=False, show_progress=False)
        known = [[t for t in row if t in self.bm25.vocab_dict] for row in tokens]
        rows = [i for i, row in enumerate(known) if row]  # bm25s cannot score a query of unknown words
        if rows:
            found, found_scores = self.bm25.retrieve([known[i] for i in rows], k=k, show_progress=False)
            matched = found_scores > 0
            scores[rows] = np.where(matched, found_scores, 0.0)
            positions[rows] = np.where(matched, found, -1)
        return scores, positions

    # -- persistence (HubMixin: save_pretrained / from_pretrained / push_to_hub) -------------------------
    def _save_pretrained(self, folder: Path) -> tuple[BM25Config, list[str]]:
        write_documents(folder / DOCUMENTS_NAME, self.ids, self.titles, self.texts)
        arrays = {
            name: np.ascontiguousarray(self.bm25.scores[name]) for name in ("data", "indices", "indptr")
        }
        if getattr(self.bm25, "nonoccurrence_array", None) is not None:
            arrays["nonoccurrence"] = np.ascontiguousarray(self.bm25.nonoccurrence_array)
        with atomic_path(folder / SCORES_NAME) as tmp:
            save_file(arrays, str(tmp), metadata={"format": FORMAT})
        atomic_write_json(folder / VOCAB_NAME, self.bm25.vocab_dict)
        config = BM25Config(
            num_documents=len(self),
            vocab_size=len(self.bm25.vocab_dict),
            params={name: getattr(self.bm25, name) for name in _PARAMS},
            stopwords=self.stopwords,
            include_title=self.include_title,
            bm25s_version=getattr(_bm25s(), "__version__", "unknown"),
        )
        return config, [DOCUMENTS_NAME, SCORES_NAME, VOCAB_NAME]

    @classmethod
    def _from_pretrained(cls, folder: Path, config: BM25Config) -> BM25Retriever:
        ids, titles, texts = read_documents(folder / DOCUMENTS_NAME)
        arrays = load_file(str(folder / SCORES_NAME))
        bm25 = _bm25s().BM25(**config.params)
        bm25.vocab_dict = json.loads((folder / VOCAB_NAME).read_text(encoding="utf-8"))
        bm25.unique_token_ids_set = set(bm25.vocab_dict.values())
        n = config.num_documents
        bm25.scores = {name: arrays[name] for name in ("data", "indices", "indptr")} | {"num_docs": n}
        bm25.nonoccurrence_array = arrays.get("nonoccurrence")
        columns = len(arrays["indptr"]) - 1  # bm25s keeps a placeholder term "" without a column
        if len(texts) != n or any(i >= columns for t, i in bm25.vocab_dict.items() if t):
            raise ValueError(
                f"BM25 index at {folder} is inconsistent: {len(texts)} passages (config: {n}), "
                f"{columns} score columns for {len(bm25.vocab_dict)} terms. Rebuild it."
            )
        return cls(ids, titles, texts, bm25, stopwords=config.stopwords, include_title=config.include_title)

    @classmethod
    def _model_card(cls, config: BM25Config, repo_id: str | None = None):
        from huggingface_hub import ModelCardData

        card_data = ModelCardData(library_name="hf_knnlm", tags=["hf_knnlm", "bm25", "retrieval"])
        return render_card(
            "bm25.md", card_data, config, repo_id=repo_id or "<this repo id or a local folder>"
        )


__all__ = ["BM25Config", "BM25Retriever"]
