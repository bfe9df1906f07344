"""Span scoring of the REALM reader: REALM's span MLP, or start + end logits of a question-answering head.

Both produce ``[n, seq, max_span_width]`` scores: entry ``[r, i, w]`` scores the span from token ``i`` to
token ``i + w`` of window ``r``; spans that do not lie entirely on document tokens hold ``SPAN_MASK_VALUE``.
"""

from __future__ import annotations

import torch
from torch import nn

# Score of spans that are not candidates (question tokens, special tokens, padding, too wide). Finite so
# that a window with no candidate at all (padding) still gives finite log-softmax values; exp(-1e4) is
# exactly 0 in float32 and float16, so masked spans never carry probability.
SPAN_MASK_VALUE = -1e4


def _shifted(values: torch.Tensor, widths: int, fill: float | bool) -> torch.Tensor:
    """``[n, seq, ...]`` -> ``[n, seq, widths, ...]`` with entry ``[:, i, w]`` = ``values[:, i + w]``."""
    pad = [0, 0] * (values.dim() - 2)
    return torch.stack(
        [nn.functional.pad(values[:, w:], [*pad, 0, w], value=fill) for w in range(widths)], dim=2
    )


def mask_spans(scores: torch.Tensor, doc_mask: torch.Tensor, max_span_width: int) -> torch.Tensor:
    """Give non-document spans ``SPAN_MASK_VALUE`` and pad the width axis to ``max_span_width``."""
    doc_mask = doc_mask.bool()
    widths = scores.shape[2]
    # Document tokens are contiguous, so a span whose both ends are document tokens lies inside the document.
    valid = doc_mask.unsqueeze(2) & _shifted(doc_mask, widths, False)
    scores = scores.masked_fill(~valid, SPAN_MASK_VALUE)
    if widths < max_span_width:
        scores = nn.functional.pad(scores, (0, max_span_width - widths), value=SPAN_MASK_VALUE)
    return scores


class SpanHead(nn.Module):
    """Scores every span (i, i + w), w < max_span_width, from its start and end token vectors.

    As in REALM's reader: start and end vectors are projected, summed, passed through ReLU and LayerNorm and
    mapped to one score.
    """

    def __init__(self, hidden_size: int, span_hidden_size: int, max_span_width: int):
        super().__init__()
        self.start = nn.Linear(hidden_size, span_hidden_size)
        self.end = nn.Linear(hidden_size, span_hidden_size)
        self.norm = nn.LayerNorm(span_hidden_size)
        self.score = nn.Linear(span_hidden_size, 1)
        self.max_span_width = max_span_width

    def forward(self, hidden: torch.Tensor, doc_mask: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``[n, seq, h]``, ``doc_mask`` ``[n, seq]`` -> scores ``[n, seq, max_span_width]``."""
        widths = min(self.max_span_width, hidden.shape[1])
        end_shifted = _shifted(self.end(hidden), widths, 0.0)
        scores = self.score(self.norm(torch.relu(self.start(hidden).unsqueeze(2) + end_shifted))).squeeze(-1)
        return mask_spans(scores, doc_mask, self.max_span_width)


def start_end_span_scores(
    start_logits: torch.Tensor, end_logits: torch.Tensor, doc_mask: torch.Tensor, max_span_width: int
) -> torch.Tensor:
    """Span score = start logit of its first token + end logit of its last token (BERT / DPR readers):
    ``[n, seq]`` logits -> ``[n, seq, max_span_width]``. Its argmax is the span
    ``pipeline("question-answering", max_answer_len=max_span_width)`` picks in a single window."""
    widths = min(max_span_width, start_logits.shape[1])
    scores = start_logits.unsqueeze(2) + _shifted(end_logits, widths, 0.0)
    return mask_spans(scores, doc_mask, max_span_width)


def answer_span_mask(
    answer_starts: torch.Tensor, answer_ends: torch.Tensor, seq_len: int, max_span_width: int
) -> torch.Tensor:
    """Dense ``[..., seq, max_span_width]`` mask of the labelled answer spans (``-1`` entries are padding)."""
    widths = answer_ends - answer_starts
    ok = (answer_starts >= 0) & (widths >= 0) & (widths < max_span_width) & (answer_ends < seq_len)
    flat_index = answer_starts.clamp(min=0) * max_span_width + widths.clamp(min=0, max=max_span_width - 1)
    # Padding entries write into one extra slot that is dropped, so every write is a True and order-free.
    dump = seq_len * max_span_width
    mask = torch.zeros(*answer_starts.shape[:-1], dump + 1, dtype=torch.bool, device=answer_starts.device)
    mask.scatter_(-1, torch.where(ok, flat_index, dump), True)
    mask = mask[..., :dump]
    return mask.view(*answer_starts.shape[:-1], seq_len, max_span_width)


__all__ = ["SPAN_MASK_VALUE", "SpanHead", "answer_span_mask", "mask_spans", "start_end_span_scores"]
