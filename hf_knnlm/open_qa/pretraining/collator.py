"""Batches for REALM pre-training: MIPS retrieval with the live query encoder, minus the trivial document.

[`RealmPretrainingCollator`][hf_knnlm.open_qa.pretraining.RealmPretrainingCollator] takes masked rows
(``input_ids`` of ``[CLS] x [SEP]`` with ``[MASK]`` tokens, ``labels`` holding the original ids there and
-100 elsewhere, and ``source``, the index position of the document x was taken from), embeds x with the
current query encoder (no gradient, dropout off), searches the index for the top-k, drops ``source``
(trivial retrieval: the masked text itself sits in that document) and lays out, per row, the k documents
for the document embedder and the k (+ null) joined inputs ``[CLS] x [SEP] title [SEP] text [SEP]`` for the
knowledge-augmented encoder. The query embedder and the encoder share one tokenizer (one vocabulary).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ...retrieval.document_index import DocumentIndex
from ...retrieval.embedder import retriever_tokenizer
from ..data import _require_fast, resolve_top_k
from .modeling import IGNORE_INDEX


def _pad(rows: Sequence[Sequence[int]], value: int, length: int | None = None) -> torch.Tensor:
    length = max((len(r) for r in rows), default=0) if length is None else length
    out = torch.full((len(rows), max(length, 1)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


class RealmPretrainingCollator:
    """Masked rows -> the inputs of [`RealmForMaskedLM`][hf_knnlm.open_qa.pretraining.RealmForMaskedLM].

    Args:
        model: the model being trained (its query embedder retrieves; its config gives the lengths).
        tokenizer: the fast tokenizer of the query embedder and of the encoder.
        index: the [`DocumentIndex`][hf_knnlm.retrieval.DocumentIndex] searched (possibly stale: an
            [`AsyncIndexRefresh`][hf_knnlm.open_qa.pretraining.AsyncIndexRefresh] swaps new vectors in).
        top_k (`int`, *optional*): documents retrieved per row (default: ``model.config.top_k``).
        exclude_source (`bool`, defaults to `True`): never retrieve a row's ``source`` document.

    Examples:

    ```python
    >>> from hf_knnlm.open_qa.pretraining.testing import tiny_realm_mlm
    >>> model, tokenizer, index = tiny_realm_mlm(top_k=1)  # a random 1-layer RealmForMaskedLM, 2 documents
    >>> from hf_knnlm.open_qa.pretraining import RealmPretrainingCollator
    >>> x = tokenizer("[MASK] is the capital of france")["input_ids"]
    >>> paris = tokenizer.convert_tokens_to_ids("paris")
    >>> row = {"input_ids": x, "labels": [-100, paris] + [-100] * (len(x) - 2), "source": 0}
    >>> collator = RealmPretrainingCollator(model, tokenizer, index)
    >>> collator.retrieve([row]).tolist()  # document 0 is where x came from: never retrieved
    [[1]]
    >>> batch = collator([row])
    >>> tokenizer.decode(batch["joined_input_ids"][0, 0])  # x joined with the retrieved document
    '[CLS] [MASK] is the capital of france [SEP] italy [SEP] rome is the capital of italy [SEP]'
    >>> tokenizer.decode(batch["joined_input_ids"][0, 1], skip_special_tokens=False).split(" [PAD]")[0]
    '[CLS] [MASK] is the capital of france [SEP]'
    ```
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        index: DocumentIndex,
        *,
        top_k: int | None = None,
        exclude_source: bool = True,
    ):
        self.model, self.tokenizer, self.index = model, retriever_tokenizer(tokenizer), index
        _require_fast(self.tokenizer)
        self.top_k = resolve_top_k(top_k, model)
        self.exclude_source = exclude_source
        self._doc_tokens: dict[tuple[int, int], list[int]] = {}

    def _tokens(self, position: int, max_length: int) -> list[int]:
        """``[CLS] title [SEP] text [SEP]`` ids of a document (cached per length)."""
        key = (position, max_length)
        if key not in self._doc_tokens:
            self._doc_tokens[key] = self.tokenizer(
                self.index.titles[position],
                self.index.texts[position],
                truncation="only_second",
                max_length=max_length,
            )["input_ids"]
        return self._doc_tokens[key]

    @torch.no_grad()
    def retrieve(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Top-k index positions ``[len(rows), k]`` for the current query encoder, each row's ``source``
        left out when ``exclude_source``; ``-1`` where fewer documents are left."""
        embedder = self.model.query_embedder
        device = next(embedder.parameters()).device
        ids = _pad([row["input_ids"] for row in rows], self.tokenizer.pad_token_id or 0).to(device)
        mask = _pad([[1] * len(row["input_ids"]) for row in rows], 0).to(device)
        was_training = embedder.training
        embedder.eval()  # dropout would make the search noisy and the run non-reproducible
        try:
            query = embedder(ids, mask)
        finally:
            embedder.train(was_training)
        sources = [int(row.get("source", -1)) if self.exclude_source else -1 for row in rows]
        extra = 1 if any(source >= 0 for source in sources) else 0
        _, found = self.index.search(query, min(self.top_k + extra, len(self.index)))
        out = np.full((len(rows), self.top_k), -1, dtype=np.int64)
        for i, (hits, source) in enumerate(zip(found, sources, strict=True)):
            kept = [int(p) for p in hits if p >= 0 and p != source][: self.top_k]
            out[i, : len(kept)] = kept
        return out

    def _joined(
        self, x: list[int], labels: list[int], position: int
    ) -> tuple[list[int], list[int], list[int]]:
        """Joined ids, token types and labels of x with one document (``position`` -1: the null document)."""
        limit = self.model.config.max_reader_length
        doc = self._tokens(position, limit)[1:] if position >= 0 else []
        ids = (x + doc)[:limit]
        if len(x) + len(doc) > limit:
            ids[-1] = self.tokenizer.sep_token_id
        types = ([0] * len(x) + [1] * len(doc))[:limit]
        return ids, types, (labels + [IGNORE_INDEX] * len(doc))[:limit]

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        for name in ("input_ids", "labels"):
            if name not in rows[0]:
                raise ValueError(
                    f"collator got rows with columns {sorted(rows[0])}, missing {name!r}; make rows with "
                    "masked_examples() and keep TrainingArguments(remove_unused_columns=False)."
                )
        positions = self.retrieve(rows)
        pad = self.tokenizer.pad_token_id or 0
        max_doc = self.model.config.max_doc_embed_length
        null = [-1] if self.model.config.null_document else []
        docs, joined, types, labels = [], [], [], []
        for row, hits in zip(rows, positions, strict=True):
            x, y = list(row["input_ids"]), list(row["labels"])
            docs += [self._tokens(int(p), max_doc) if p >= 0 else [] for p in hits]
            for p in [*hits.tolist(), *null]:
                ids, kinds, targets = self._joined(x, y, int(p))
                joined.append(ids), types.append(kinds), labels.append(targets)
        batch, k, c = len(rows), positions.shape[1], positions.shape[1] + len(null)
        doc_ids = _pad(docs, pad)
        return {
            "input_ids": _pad([row["input_ids"] for row in rows], pad),
            "attention_mask": _pad([[1] * len(row["input_ids"]) for row in rows], 0),
            "doc_input_ids": doc_ids.view(batch, k, -1),
            "doc_attention_mask": _pad([[1] * len(d) for d in docs], 0, doc_ids.shape[1]).view(batch, k, -1),
            "doc_valid": torch.as_tensor(positions >= 0),
            "joined_input_ids": _pad(joined, pad).view(batch, c, -1),
            "joined_attention_mask": _pad([[1] * len(j) for j in joined], 0).view(batch, c, -1),
            "joined_token_type_ids": _pad(types, 0).view(batch, c, -1),
            "labels": _pad(labels, IGNORE_INDEX).view(batch, c, -1),
        }


__all__ = ["RealmPretrainingCollator"]
