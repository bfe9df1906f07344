"""Reader windows of a batch: every (question, retrieved document) pair read in overlapping windows.

A pair longer than ``max_reader_length`` tokens is read in windows (the question, then a part of the
document) overlapping by ``window_stride`` tokens (``return_overflowing_tokens``, as extractive QA does).
The windows of one question share one axis, padded to the largest count in the batch: ``[b, n, seq]``,
with ``window_doc`` ``[b, n]`` saying which of the question's documents each window reads (``-1``:
padding). [`build_features`][hf_knnlm.open_qa.build_features] turns them into model inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class ReaderWindows:
    """The reader windows of a batch laid out per question (``n``: the most windows of any question)."""

    tensors: dict[str, torch.Tensor]  # input_ids / attention_mask / token_type_ids: [b, n, seq]
    window_doc: torch.Tensor  # [b, n]: which of the question's k documents each window reads; -1: padding
    doc_mask: torch.Tensor  # [b, n, seq]: True on the document's tokens
    offsets: list[list[list[tuple[int, int]]]]  # [b][window][token]: character offsets in the document


def read_in_windows(
    reader_tok: Any, questions: list[str], texts: list[list[str]], positions: np.ndarray, config: Any
) -> ReaderWindows:
    """Tokenise every pair whose document exists (``positions >= 0``) and lay its windows out per question."""
    batch, k = positions.shape
    pairs = [(b, z) for b in range(batch) for z in range(k) if positions[b, z] >= 0]
    encoded = _encode_pairs(reader_tok, questions, texts, pairs, config)
    rows: list[list[int]] = [[] for _ in range(batch)]  # rows of encoded per question
    for row, pair in enumerate(encoded["overflow_to_sample_mapping"] if pairs else []):
        rows[pairs[pair][0]].append(row)
    return _lay_out(encoded, pairs, rows, reader_tok.pad_token_id)


def _encode_pairs(
    reader_tok: Any, questions: list[str], texts: list[list[str]], pairs: list[tuple[int, int]], config: Any
) -> Any:
    """One tokenizer call for the whole batch; an empty pair stands in when no document exists, so that the
    padded layout still has a sequence length."""
    return reader_tok(
        [questions[b] for b, _ in pairs] or [""],
        [texts[b][z] for b, z in pairs] or [""],
        truncation="only_second",
        max_length=config.max_reader_length,
        stride=config.window_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=True,
    )


def _lay_out(encoded: Any, pairs: list[tuple[int, int]], rows: list[list[int]], pad_id: int) -> ReaderWindows:
    """Copy each question's windows into its ``[n, seq]`` slot; the rest stays padding."""
    batch, n, seq = len(rows), max(1, max(len(r) for r in rows)), len(encoded["input_ids"][0])
    window_doc = torch.full((batch, n), -1, dtype=torch.long)
    doc_mask = torch.zeros(batch, n, seq, dtype=torch.bool)
    tensors = {
        name: torch.full((batch, n, seq), pad_id if name == "input_ids" else 0)
        for name in ("input_ids", "attention_mask", "token_type_ids")
        if name in encoded
    }
    offsets: list[list[list[tuple[int, int]]]] = [[] for _ in range(batch)]
    for b, question_rows in enumerate(rows):
        for w, row in enumerate(question_rows):
            window_doc[b, w] = pairs[encoded["overflow_to_sample_mapping"][row]][1]
            doc_mask[b, w] = torch.tensor([sid == 1 for sid in encoded.sequence_ids(row)])
            for name, tensor in tensors.items():
                tensor[b, w] = torch.tensor(encoded[name][row])
            offsets[b].append(encoded["offset_mapping"][row])
    return ReaderWindows(tensors, window_doc, doc_mask, offsets)
