"""Passages on disk: ``documents.jsonl``, one ``{"id", "title", "text"}`` object per line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from ..utils.files import atomic_write_bytes


def rows_of(documents: Iterable[Mapping[str, Any]]) -> tuple[list[str], list[str], list[str]]:
    """ids, titles, texts of a ``datasets.Dataset`` or any iterable of mappings with ``text`` (and
    optionally ``title``, ``id``; a missing id is the row's position). Every retriever and
    [`DocumentIndex.build`][hf_knnlm.retrieval.DocumentIndex.build] read rows so, and so number passages
    alike."""
    ids, titles, texts = [], [], []
    for position, row in enumerate(documents):
        if not isinstance(row, Mapping) or "text" not in row:
            raise ValueError(
                f"document {position} is {type(row).__name__} without a 'text' field; pass rows like "
                "{'id': ..., 'title': ..., 'text': ...} (a datasets.Dataset with these columns works)."
            )
        ids.append(str(row.get("id", position)))
        titles.append(str(row.get("title") or ""))
        texts.append(str(row["text"]))
    if not texts:
        raise ValueError("the document collection is empty; pass at least one document.")
    if len(set(ids)) != len(ids):
        raise ValueError("document ids must be unique; drop the duplicates or leave 'id' out to number them.")
    return ids, titles, texts


def write_documents(path: str | os.PathLike, ids: list[str], titles: list[str], texts: list[str]) -> None:
    lines = (
        json.dumps({"id": i, "title": t, "text": x}, ensure_ascii=False)
        for i, t, x in zip(ids, titles, texts, strict=True)
    )
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))


def read_documents(path: str | os.PathLike) -> tuple[list[str], list[str], list[str]]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r["id"] for r in rows], [r["title"] for r in rows], [r["text"] for r in rows]
