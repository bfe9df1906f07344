"""Where every entry of a datastore came from: corpus positions, successors and document offsets.

Two optional files, hashed in ``datastore_config.json`` like the shards (stores without them load
as before: their entries are implicitly in corpus order, entry ``i`` predicting token ``i + 1``):

- ``entries.safetensors``: ``positions`` (int64 ``[N]``, the token-stream position of each entry's
  value), and for compressed stores ``next`` (int64 ``[N]``, the entry that follows in the corpus,
  -1 at the end: RetoMaton's pointers) and ``counts`` (int32 ``[N]``, entries merged into each).
- ``documents.safetensors``: ``doc_token_starts`` (int64 ``[D + 1]``), ``token_spans`` (int32
  ``[T, 2]``, character span of every stream token inside its document, -1 for separators and
  tokenizers without offsets), ``text`` (uint8, the UTF-8 documents back to back) and
  ``doc_text_starts`` (int64 ``[D + 1]``, byte offsets into ``text``); document names in the metadata.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from ..lm.corpus import _TOKENIZE_BATCH, CorpusLike, corpus_name, iter_documents
from ..utils.files import atomic_path
from .extras import DOCUMENTS_NAME, ENTRIES_NAME, add_files

logger = logging.getLogger(__name__)


@dataclass
class Documents:
    """The documents of a token stream: names, texts and the character span of every token."""

    names: list[str]
    doc_token_starts: np.ndarray  # [D + 1] int64
    token_spans: np.ndarray  # [T, 2] int32
    text: np.ndarray  # [B] uint8
    doc_text_starts: np.ndarray  # [D + 1] int64

    def document_of(self, positions: np.ndarray) -> np.ndarray:
        """Index of the document holding each stream position."""
        return np.searchsorted(self.doc_token_starts, positions, side="right") - 1

    def document_text(self, doc: int) -> str:
        start, end = self.doc_text_starts[doc], self.doc_text_starts[doc + 1]
        return bytes(self.text[start:end]).decode("utf-8")

    def save(self, path: Path) -> None:
        tensors = {
            "doc_token_starts": self.doc_token_starts,
            "token_spans": self.token_spans,
            "text": self.text,
            "doc_text_starts": self.doc_text_starts,
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"names": json.dumps(self.names)})

    @classmethod
    def load(cls, path: Path) -> Documents:
        with safe_open(path, framework="np") as f:
            names = json.loads((f.metadata() or {}).get("names", "[]"))
            arrays = {name: f.get_tensor(name) for name in f.keys()}
        return cls(names=names, **arrays)


def tokenize_documents(
    tokenizer,
    data: CorpusLike,
    text_column: str = "text",
    separator: str = "\n\n",
    names: Sequence[str] | None = None,
) -> tuple[np.ndarray, Documents]:
    """The token stream of ``hf_knnlm.lm.corpus.tokenize_corpus`` plus its ``Documents``.

    A text file is one document (tokenized in the same ~1 MB pieces); a list or a dataset column
    gives one document per element, joined by ``separator`` (whose tokens belong to no span).
    """
    is_file = isinstance(data, (str, os.PathLike))
    docs = list(iter_documents(data, text_column))
    if is_file:
        texts = ["".join(docs)]
        piece_starts = np.cumsum([0] + [len(d) for d in docs])[:-1]
        inputs, doc_of_input, shift = docs, [0] * len(docs), list(piece_starts)
    else:
        texts = docs
        inputs = [d if i == 0 else separator + d for i, d in enumerate(docs)]
        doc_of_input = list(range(len(docs)))
        shift = [0 if i == 0 else -len(separator) for i in range(len(docs))]
    if names is None:
        base = corpus_name(data)
        names = [base] if is_file else [f"{base}[{i}]" for i in range(len(texts))]
    if len(names) != len(texts):
        raise ValueError(
            f"{len(names)} document names for {len(texts)} documents; pass one name per document."
        )
    ids, spans = [], []
    for start in range(0, len(inputs), _TOKENIZE_BATCH):
        batch = inputs[start : start + _TOKENIZE_BATCH]
        try:
            enc = tokenizer(batch, add_special_tokens=False, return_offsets_mapping=True)
            offsets = enc["offset_mapping"]
        except (NotImplementedError, ValueError):  # slow tokenizers have no offsets
            enc = tokenizer(batch, add_special_tokens=False)
            offsets = None
        for j, tok in enumerate(enc["input_ids"]):
            ids.append(np.asarray(tok, dtype=np.int32))
            if offsets is None:
                spans.append(np.full((len(tok), 2), -1, dtype=np.int32))
                continue
            span = np.asarray(offsets[j], dtype=np.int64).reshape(-1, 2) + shift[start + j]
            # Separator tokens end at or before the document's first character: they have no span.
            valid = (span[:, 1] > 0) & (span[:, 1] > span[:, 0])
            spans.append(np.where(valid[:, None], np.maximum(span, 0), -1).astype(np.int32))
    counts = np.zeros(len(texts), dtype=np.int64)
    np.add.at(counts, doc_of_input, [len(t) for t in ids])
    encoded = [t.encode("utf-8") for t in texts]
    documents = Documents(
        names=list(names),
        doc_token_starts=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        token_spans=np.concatenate(spans) if spans else np.zeros((0, 2), np.int32),
        text=np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(),
        doc_text_starts=np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).astype(np.int64),
    )
    tokens = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)
    return tokens, documents


@dataclass
class Source:
    """One entry's origin: document, character span of its value token, and the text around it."""

    entry: int
    position: int
    document: str
    char_start: int
    char_end: int
    context: str  # up to ``context_chars`` characters before the span
    span_text: str


class Provenance:
    """Positions, successors, merge counts and documents of a store's entries (whatever is recorded)."""

    def __init__(
        self,
        num_entries: int,
        positions: np.ndarray | None = None,
        next_ids: np.ndarray | None = None,
        counts: np.ndarray | None = None,
        documents: Documents | None = None,
    ):
        self.num_entries = num_entries
        self.positions = positions
        self.next_ids = next_ids
        self.counts = counts
        self.documents = documents
        self._log_counts = None if counts is None else torch.from_numpy(np.log(counts.astype(np.float32)))

    @classmethod
    def load(cls, folder: Path, files: dict[str, str], num_entries: int) -> Provenance:
        arrays: dict[str, np.ndarray] = {}
        if ENTRIES_NAME in files:
            with safe_open(folder / ENTRIES_NAME, framework="np") as f:
                arrays = {name: f.get_tensor(name) for name in f.keys()}
            for name, array in arrays.items():
                if len(array) != num_entries:
                    raise ValueError(
                        f"{folder / ENTRIES_NAME}: {name} has {len(array)} rows for {num_entries} entries; "
                        f"the datastore is inconsistent, rebuild it."
                    )
        documents = Documents.load(folder / DOCUMENTS_NAME) if DOCUMENTS_NAME in files else None
        return cls(num_entries, arrays.get("positions"), arrays.get("next"), arrays.get("counts"), documents)

    def save(self, folder: Path) -> list[str]:
        """Write what is recorded; returns the file names written (to be hashed in the config)."""
        names = []
        tensors = {"positions": self.entry_positions(np.arange(self.num_entries))}
        if self.next_ids is not None:
            tensors["next"] = self.next_ids.astype(np.int64)
        if self.counts is not None:
            tensors["counts"] = self.counts.astype(np.int32)
        with atomic_path(folder / ENTRIES_NAME) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "hf_knnlm.entries.v1"})
        names.append(ENTRIES_NAME)
        if self.documents is not None:
            self.documents.save(folder / DOCUMENTS_NAME)
            names.append(DOCUMENTS_NAME)
        return names

    def entry_positions(self, ids: np.ndarray) -> np.ndarray:
        """Stream position of each entry's value token (entry i predicts token i + 1 when unrecorded)."""
        ids = np.asarray(ids, dtype=np.int64)
        return self.positions[ids].astype(np.int64) if self.positions is not None else ids + 1

    def successors(self, ids: np.ndarray) -> np.ndarray:
        """The entry that follows each of ``ids`` in the corpus, -1 where none does."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.next_ids is not None:
            return self.next_ids[ids].astype(np.int64)
        nxt = ids + 1
        return np.where(nxt < self.num_entries, nxt, -1)

    def log_counts(self, ids: torch.Tensor) -> torch.Tensor | None:
        """log(merge count) of each entry id (-1 ids get 0), or None for a store without merges."""
        if self._log_counts is None:
            return None
        return self._log_counts[ids.clamp(min=0).cpu()]

    def source(self, entry: int, context_chars: int = 80) -> Source | None:
        """The document and character span of ``entry``'s value token, or None without documents."""
        if self.documents is None or entry < 0:
            return None
        docs = self.documents
        position = int(self.entry_positions(np.array([entry]))[0])
        doc = int(docs.document_of(np.array([position]))[0])
        start, end = (int(x) for x in docs.token_spans[position])
        text = docs.document_text(doc)
        if start < 0:
            return Source(entry, position, docs.names[doc], -1, -1, "", "")
        return Source(
            entry,
            position,
            docs.names[doc],
            start,
            end,
            text[max(0, start - context_chars) : start],
            text[start:end],
        )


def record_provenance(
    folder: Path,
    tokenizer,
    data: CorpusLike,
    tokens: np.ndarray,
    text_column: str = "text",
    separator: str = "\n\n",
    names: Sequence[str] | None = None,
) -> list[str]:
    """Write the provenance of a freshly built store (entry i predicts stream token i + 1)."""
    stream, documents = tokenize_documents(tokenizer, data, text_column, separator, names)
    if not np.array_equal(stream, tokens):  # cannot happen with a deterministic tokenizer
        logger.warning("re-tokenizing the corpus gave another stream; document offsets are not recorded.")
        documents = None
    return Provenance(len(tokens) - 1, documents=documents).save(Path(folder))


def attach_documents(
    store,
    tokenizer,
    data: CorpusLike,
    *,
    text_column: str = "text",
    separator: str = "\n\n",
    names: Sequence[str] | None = None,
) -> None:
    """Record positions and document offsets in a store built without them (from the same corpus).

    The corpus is tokenized again and must reproduce the store exactly (every value is the next
    token of the stream); the files are added to the store's config with their sha256.
    """
    if store.provenance.next_ids is not None:
        raise ValueError(f"{store.folder} is a compressed store; attach documents to the store it came from.")
    tokens, documents = tokenize_documents(tokenizer, data, text_column, separator, names)
    values = store.values.to_numpy()
    if len(tokens) - 1 != len(values) or not np.array_equal(tokens[1:], values):
        raise ValueError(
            f"the corpus gives {len(tokens) - 1} targets that do not match the store's {len(values)} values; "
            f"pass the corpus (and separator / text_column) the store was built from."
        )
    provenance = Provenance(len(values), documents=documents)
    add_files(store, provenance.save)  # beside the store, swapped in whole under its lock
    store._provenance = provenance
