"""Passages on disk: ``documents.jsonl``, one ``{"id", "title", "text"}`` object per line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from ..utils.files import atomic_write_bytes
from .document_index import documents_from_rows


def rows_of(documents: Iterable[Mapping[str, Any]]) -> tuple[list[str], list[str], list[str]]:
    """ids, titles, texts of rows with ``text`` (and optionally ``title``, ``id``); the same reading
    as [`DocumentIndex.build`][hf_knnlm.retrieval.DocumentIndex.build], so both retrievers number passages
    alike."""
    return documents_from_rows(documents)


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
