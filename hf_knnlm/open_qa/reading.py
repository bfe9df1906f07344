"""Reading in windows: run the reader over the real windows of a batch, normalise span scores per document
across its windows, and turn the best span back into text and character offsets.

A document longer than one reader window is read as several overlapping windows (``reader_stride``). All
windows of a question lie along one axis ``[b, n, seq]``; ``window_doc`` ``[b, n]`` says which of the k
retrieved documents a window belongs to (``-1``: padding). p(s|z, x) is one softmax over the spans of *all*
windows of document z, so documents compete through p(z|x) alone whatever their length; a span inside the
overlap of two windows is scored once in each (as in extractive QA with a doc stride).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .heads import SPAN_MASK_VALUE

# Stands for log 0 where a document has no window; finite, so logsumexp never meets an all -inf row (whose
# gradient is NaN).
_NO_WINDOW = -1e9


def run_reader(
    score: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor],
    inputs: dict[str, torch.Tensor],
    doc_mask: torch.Tensor,
    valid: torch.Tensor,
    max_span_width: int,
    chunk_rows: int = 16,
) -> torch.Tensor:
    """Span scores ``[N, seq, max_span_width]`` of flat windows ``[N, seq]``; rows with ``valid`` false are
    never run and hold ``SPAN_MASK_VALUE``.

    Windows are sorted by length and read ``chunk_rows`` at a time, each chunk cut to its own longest window:
    right padding does not change what an encoder computes for the real tokens, so this only saves time.
    """
    rows_total, seq = doc_mask.shape
    lengths = inputs["attention_mask"].sum(-1)
    rows = valid.nonzero().flatten()
    rows = rows[torch.argsort(lengths[rows], descending=True, stable=True)]
    out = torch.full(
        (rows_total, seq, max_span_width), SPAN_MASK_VALUE, dtype=torch.float32, device=doc_mask.device
    )
    if rows.numel() == 0:
        return out
    pieces = []
    for chunk in rows.split(chunk_rows):
        width = int(lengths[chunk].max())
        scores = score({name: t[chunk, :width] for name, t in inputs.items()}, doc_mask[chunk, :width])
        pieces.append(torch.nn.functional.pad(scores.float(), (0, 0, 0, seq - width), value=SPAN_MASK_VALUE))
    return out.index_copy(0, rows, torch.cat(pieces))


def doc_normalised_log_probs(span_logits: torch.Tensor, window_doc: torch.Tensor, k: int) -> torch.Tensor:
    """log p(s|z, x): span scores ``[b, n, seq, w]`` minus the logsumexp over all spans of all windows of the
    same document (``window_doc`` ``[b, n]``)."""
    window_lse = torch.logsumexp(span_logits.flatten(2), dim=-1)  # [b, n]
    belongs = window_doc.unsqueeze(1) == torch.arange(k, device=window_doc.device)[None, :, None]  # [b, k, n]
    doc_lse = torch.logsumexp(window_lse.unsqueeze(1).masked_fill(~belongs, _NO_WINDOW), dim=-1)  # [b, k]
    per_window = doc_lse.gather(1, window_doc.clamp(min=0)).masked_fill(window_doc < 0, 0.0)
    return span_logits - per_window[..., None, None]


def _expand_to_words(text: str, start: int, end: int) -> tuple[int, int]:
    """Grow ``[start, end)`` to whole words, like the question-answering pipeline's ``align_to_words``: a span
    that starts or ends inside a word (a sub-word token) takes the rest of the word."""
    while start > 0 and text[start - 1].isalnum() and text[start].isalnum():
        start -= 1
    while end < len(text) and text[end].isalnum() and text[end - 1].isalnum():
        end += 1
    return start, end


def _candidates(
    joint: torch.Tensor, window_doc: torch.Tensor, meta: dict[str, Any], b: int, top_spans: int, align: bool
):
    """The ``top_spans`` best spans of each real window of question ``b``: (log p, doc slot, start, end)."""
    _, n, seq, width = joint.shape
    values, indices = joint[b].reshape(n, -1).topk(min(top_spans, seq * width), dim=-1)
    for window in range(n):
        z = int(window_doc[b, window])
        if z < 0:
            continue
        offsets, text = meta["offsets"][b][window], meta["texts"][b][z]
        for value, index in zip(values[window].tolist(), indices[window].tolist(), strict=True):
            if value < SPAN_MASK_VALUE / 2:  # not a document span
                break
            start, w = divmod(index, width)
            char_start, char_end = offsets[start][0], offsets[start + w][1]
            if align:
                char_start, char_end = _expand_to_words(text, char_start, char_end)
            yield value, z, char_start, char_end


def decode_best_spans(
    joint: torch.Tensor,
    window_doc: torch.Tensor,
    doc_probs: torch.Tensor,
    meta: dict[str, Any],
    align_to_words: bool = True,
    top_spans: int = 12,
) -> list[dict[str, Any]]:
    """The answer of each question, aggregated over all its windows and documents (``joint`` = log p(z, s|x)
    ``[b, n, seq, w]``).

    As transformers 4's question-answering pipeline does across windows: the ``top_spans`` best spans of every
    window are grouped by their (lower-cased) text and the probabilities of a group are summed; the answer is
    the group with the largest sum, reported with the document id and character offsets of its best span.
    """
    results = []
    for b in range(joint.shape[0]):
        groups: dict[str, list] = {}
        for value, z, start, end in _candidates(joint, window_doc, meta, b, top_spans, align_to_words):
            text = meta["texts"][b][z][start:end]
            group = groups.setdefault(text.lower(), [0.0, float("-inf"), None])
            group[0] += math.exp(value)
            if value > group[1]:
                group[1], group[2] = value, (z, start, end, text)
        total, _, best = max(groups.values(), key=lambda g: g[0]) if groups else (0.0, 0.0, None)
        z, start, end, text = best if best is not None else (0, 0, 0, "")
        results.append(
            {
                "answer": text,
                "score": float(total),
                "start": int(start),
                "end": int(end),
                "doc_id": meta["doc_ids"][b][z] if best is not None else None,
                "doc_ids": [d for d in meta["doc_ids"][b] if d is not None],
                "doc_scores": [
                    float(p) for p, d in zip(doc_probs[b], meta["doc_ids"][b], strict=True) if d is not None
                ],
            }
        )
    return results


__all__ = ["decode_best_spans", "doc_normalised_log_probs", "run_reader"]
