"""A corpus cut into passages of a fixed number of tokens with overlap, ready to index.

The passages are a ``datasets.Dataset`` with the columns ``id``, ``title``, ``text`` (what
[`BM25Retriever.build`][hf_knnlm.retrieval.BM25Retriever.build],
[`DenseRetriever.build`][hf_knnlm.retrieval.DenseRetriever.build] and
[`DocumentIndex`][hf_knnlm.retrieval.DocumentIndex] take), plus ``document`` (the source row) and
``start_token``. Each passage's text is an exact substring of its source document, cut at token boundaries
found with the tokenizer's offsets, so nothing is re-tokenized differently.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import datasets

from ..lm.corpus import read_text_file
from ..utils.checks import is_int


def _rows(data: Any, text_column: str, title_column: str, title: str | None) -> Iterator[tuple[str, str]]:
    """(title, text) of every source document."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise ValueError(
                f"data={str(data)!r} is not a file; pass a text file, strings, rows or a Dataset."
            )
        yield (title if title is not None else path.stem), read_text_file(path)
        return
    if hasattr(data, "column_names") and text_column not in data.column_names:
        raise ValueError(
            f"text_column={text_column!r} is not a column of the dataset {data.column_names}; "
            "pass text_column='<name of the text column>'."
        )
    for position, row in enumerate(data):
        if isinstance(row, str):
            yield title or "", row
        elif isinstance(row, Mapping) and isinstance(row.get(text_column), str):
            yield str(row.get(title_column) or title or ""), str(row[text_column])
        else:
            has = isinstance(row, Mapping) and text_column in row
            field = f" ({text_column}={row[text_column]!r})" if has else ""
            raise ValueError(
                f"document {position} is {type(row).__name__} without a {text_column!r} text{field}; pass "
                f"strings or rows like {{'{title_column}': ..., '{text_column}': ...}}."
            )


def token_spans(num_tokens: int, chunk_tokens: int, overlap: int) -> list[tuple[int, int]]:
    """``[start, end)`` token ranges of ``chunk_tokens`` (the last may be shorter) covering every token,
    consecutive ranges sharing ``overlap`` tokens."""
    if not is_int(chunk_tokens) or not is_int(overlap) or chunk_tokens < 1 or not 0 <= overlap < chunk_tokens:
        raise ValueError(
            f"chunk_tokens={chunk_tokens!r}, overlap={overlap!r}: need integers with chunk_tokens >= 1 and "
            "0 <= overlap < chunk_tokens (e.g. chunk_tokens=128, overlap=32)."
        )
    step = chunk_tokens - overlap
    spans = [(0, min(chunk_tokens, num_tokens))] if num_tokens else []
    while spans and spans[-1][1] < num_tokens:
        start = spans[-1][0] + step
        spans.append((start, min(start + chunk_tokens, num_tokens)))
    return spans


def chunk_documents(
    data: Any,
    tokenizer: Any,
    *,
    chunk_tokens: int = 128,
    overlap: int = 32,
    text_column: str = "text",
    title_column: str = "title",
    title: str | None = None,
) -> datasets.Dataset:
    """Cut every document of ``data`` into passages of ``chunk_tokens`` tokens, ``overlap`` shared.

    Args:
        data: a text file path (one document, titled by the file name unless ``title`` is given), a list
            of strings, a list of mappings or a ``datasets.Dataset`` with ``text_column`` (and optionally
            ``title_column``).
        tokenizer: a fast tokenizer (it needs offsets); use the LM's, so that a passage is
            ``chunk_tokens`` tokens where it will be read.
        chunk_tokens: tokens per passage (the last passage of a document may be shorter).
        overlap: tokens shared by consecutive passages of a document.
        title: title of documents that have none.

    Returns:
        `datasets.Dataset` with ``id`` (``"<document>-<passage>"``), ``title``, ``text``, ``document``,
        ``start_token``.

    Examples:

    ```python
    >>> from transformers import AutoTokenizer
    >>> from hf_knnlm.rag import chunk_documents
    >>> tokenizer = AutoTokenizer.from_pretrained("gpt2")
    >>> passages = chunk_documents(["one two three four five six seven"], tokenizer,
    ...                            chunk_tokens=4, overlap=1)
    >>> list(passages["text"])
    ['one two three four', ' four five six seven']
    ```
    """
    token_spans(1, chunk_tokens, overlap)  # validates before any tokenization
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow tokenizer; chunking needs offsets. Load it with "
            "AutoTokenizer.from_pretrained(..., use_fast=True)."
        )
    columns: dict[str, list] = {"id": [], "title": [], "text": [], "document": [], "start_token": []}
    for doc, (doc_title, text) in enumerate(_rows(data, text_column, title_column, title)):
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        for number, (start, end) in enumerate(token_spans(len(offsets), chunk_tokens, overlap)):
            passage = text[offsets[start][0] : offsets[end - 1][1]]
            if not passage.strip():
                continue
            columns["id"].append(f"{doc}-{number}")
            columns["title"].append(doc_title)
            columns["text"].append(passage)
            columns["document"].append(doc)
            columns["start_token"].append(start)
    if not columns["text"]:
        raise ValueError("the corpus has no text to chunk; check that data is not empty.")
    return datasets.Dataset.from_dict(columns)


__all__ = ["chunk_documents", "token_spans"]
