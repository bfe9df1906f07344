"""Dense retrieval over a [`DocumentIndex`][hf_knnlm.retrieval.DocumentIndex] (the open-QA index) for text
queries."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .document_index import DocumentIndex, embed_corpus
from .documents import rows_of
from .retriever import check_search_args


class DenseRetriever:
    r"""
    Text queries in, ``(scores, doc_ids)`` out, over a [`DocumentIndex`][hf_knnlm.retrieval.DocumentIndex]:
    the query encoder embeds the queries and FAISS finds the documents of largest inner product.

    The index is the same object open-QA uses, so a REALM model's index serves retrieval-augmented LMs too:
    ``DenseRetriever(index, realm_model.query_embedder, realm_tokenizer)``. ``search`` runs the encoder
    under ``torch.no_grad()`` and the index search under its lock, so it is safe from several threads.

    Args:
        index (`DocumentIndex`): documents and their vectors.
        query_encoder (`nn.Module`): maps tokenized queries to ``[n, dim]`` vectors in the index's space
            (a [`sentence_encoder`][hf_knnlm.retrieval.sentence_encoder] or
            ``RealmForOpenQA.query_embedder``).
        tokenizer: the query encoder's tokenizer.
        max_query_length (`int`, defaults to 64): queries are truncated to this many tokens.
        batch_size (`int`, defaults to 64): queries embedded per forward pass.

    Examples:

    ```python
    >>> from transformers import AutoTokenizer, BertModel
    >>> from hf_knnlm.rag import DenseRetriever
    >>> from hf_knnlm.retrieval.testing import tiny_encoder_config
    >>> tokenizer = AutoTokenizer.from_pretrained("gpt2", pad_token="<|endoftext|>")
    >>> encoder = BertModel(tiny_encoder_config(len(tokenizer)))  # a random 1-layer BERT
    >>> embed = lambda **batch: encoder(**batch).last_hidden_state.mean(dim=1)  # any text -> vector map
    >>> dense = DenseRetriever.build([{"text": "The cat sat."}, {"text": "A dog ran."}], embed, tokenizer)
    >>> scores, doc_ids = dense.search(["Where is the cat?", "A dog"], k=2)
    >>> doc_ids.shape, sorted(doc_ids[0].tolist())
    ((2, 2), [0, 1])
    ```
    """

    def __init__(
        self,
        index: DocumentIndex,
        query_encoder: Any,
        tokenizer: Any,
        *,
        max_query_length: int = 64,
        batch_size: int = 64,
    ) -> None:
        self.index = index
        self.query_encoder = query_encoder
        self.tokenizer = tokenizer
        self.max_query_length = max_query_length
        self.batch_size = batch_size

    @classmethod
    def build(
        cls,
        documents: Iterable[Mapping[str, Any]],
        encoder: Any,
        tokenizer: Any,
        *,
        max_length: int = 256,
        index_type: str = "flat",
        batch_size: int = 64,
        show_progress: bool = False,
        **kwargs: Any,
    ) -> DenseRetriever:
        """Embed ``documents`` (``title [SEP] text``, ``max_length`` tokens) with ``encoder`` and index them;
        the same encoder embeds the queries."""
        ids, titles, texts = rows_of(documents)
        options = {"batch_size": batch_size, "max_length": max_length, "show_progress": show_progress}
        embeddings = embed_corpus(_as_module(encoder), tokenizer, titles, texts, **options)
        metadata = {"encoder": str(getattr(encoder, "name_or_path", "")), "max_length": max_length}
        index = DocumentIndex(ids, titles, texts, embeddings, index_type=index_type, metadata=metadata)
        return cls(index, encoder, tokenizer, **kwargs)

    @property
    def ids(self) -> list[str]:
        return self.index.ids

    @property
    def titles(self) -> list[str]:
        return self.index.titles

    @property
    def texts(self) -> list[str]:
        return self.index.texts

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return f"DenseRetriever({len(self)} documents, dim={self.index.dim}, {self.index.index_type})"

    @torch.no_grad()
    def embed_queries(self, queries: Sequence[str]) -> torch.Tensor:
        module = _as_module(self.query_encoder)
        device = next(module.parameters()).device
        chunks = []
        for start in range(0, len(queries), self.batch_size):
            encoded = self.tokenizer(
                list(queries[start : start + self.batch_size]),
                truncation=True,
                max_length=self.max_query_length,
                padding=True,
                return_tensors="pt",
            )
            chunks.append(module(**{n: t.to(device) for n, t in encoded.items()}).float().cpu())
        return torch.cat(chunks)

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ``(scores, doc_ids)`` by inner product for each text query, best first."""
        queries = check_search_args(queries, k, len(self))
        if not queries:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        scores, positions = self.index.search(self.embed_queries(queries), k)
        return scores.astype(np.float32), positions.astype(np.int64)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Save the document index (the query encoder is a model: save it with its own
        ``save_pretrained``)."""
        self.index.save_pretrained(save_directory)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Push the document index as one commit."""
        return self.index.push_to_hub(repo_id, **kwargs)

    @classmethod
    def from_pretrained(
        cls, repo_id_or_path: str | os.PathLike, query_encoder: Any, tokenizer: Any, **kwargs: Any
    ) -> DenseRetriever:
        """A saved [`DocumentIndex`][hf_knnlm.retrieval.DocumentIndex] (folder or Hub id, sha256-checked) with
        its query encoder."""
        hub_keys = (
            "subfolder",
            "revision",
            "cache_dir",
            "local_files_only",
            "token",
            "force_download",
            "verify",
        )
        hub = {key: kwargs.pop(key) for key in hub_keys if key in kwargs}
        return cls(DocumentIndex.from_pretrained(repo_id_or_path, **hub), query_encoder, tokenizer, **kwargs)


class _CallableModule(nn.Module):
    """Lets a plain function (``lambda **batch: ...``) stand where an encoder module is expected."""

    def __init__(self, function: Any) -> None:
        super().__init__()
        self.function = function
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)  # gives the module a device

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return self.function(**batch)


def _as_module(encoder: Any) -> nn.Module:
    return encoder if isinstance(encoder, nn.Module) else _CallableModule(encoder)


__all__ = ["DenseRetriever"]
