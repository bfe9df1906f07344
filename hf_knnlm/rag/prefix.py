"""Document-prefixed LM inputs: a retrieved passage's tokens placed before the context, batched.

Every retrieval-augmented LM here reads ``p_LM(y | d ⊕ x)``: the passage ``d`` (its title and text, see
``document_text``) tokenized by the LM's tokenizer and put in front of the
context ``x``. Rows of different lengths are left-padded with explicit position ids, so a row's log-probs
do not depend on what it is batched with (up to float rounding).
"""

from __future__ import annotations

import inspect
import math
import threading
from dataclasses import dataclass

import numpy as np
import torch

from ..lm.caches import cache_kwargs, cache_of
from ..retrieval.retriever import Retriever, document_text


class DocumentTokens:
    """LM token ids of retrieved passages, cut from the left to ``max_document_tokens`` (so the end of a
    passage, the part next to the context, is kept), cached per passage. ``-1`` (no passage) is empty."""

    def __init__(self, tokenizer, retriever: Retriever, max_document_tokens: int = 256) -> None:
        if max_document_tokens < 1:
            raise ValueError(f"max_document_tokens={max_document_tokens} must be >= 1 (e.g. 256).")
        self.tokenizer = tokenizer
        self.retriever = retriever
        self.max_document_tokens = max_document_tokens
        self._cache: dict[int, list[int]] = {}
        self._lock = threading.Lock()

    def __call__(self, position: int) -> list[int]:
        if position < 0:
            return []
        with self._lock:
            cached = self._cache.get(position)
        if cached is None:
            text = document_text(self.retriever.titles[position], self.retriever.texts[position])
            cached = self.tokenizer(text, add_special_tokens=False)["input_ids"][-self.max_document_tokens :]
            with self._lock:
                self._cache[position] = cached
        return cached


@dataclass
class PaddedRows:
    input_ids: torch.Tensor  # [B, L] left-padded
    attention_mask: torch.Tensor  # [B, L]
    position_ids: torch.Tensor  # [B, L] 0-based positions of the real tokens

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> PaddedRows:
    """Left-pad token lists into one batch, with the position ids each row would have alone."""
    if any(len(row) == 0 for row in rows):
        raise ValueError("a document-prefixed row is empty; every row needs at least one context token.")
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row) :] = torch.as_tensor(row, dtype=torch.long)
        mask[r, width - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return PaddedRows(ids.to(device), mask.to(device), positions.to(device))


def pad_token_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


_STOP_TOKENS: dict[tuple[int, tuple[str, ...]], list[int]] = {}


def tokens_containing(tokenizer, strings: tuple[str, ...]) -> list[int]:
    """Ids of every token whose text contains one of ``strings`` (cached per tokenizer).

    Passed to ``generate(eos_token_id=...)`` they end a sequence at a line or sentence break at the
    cost of a set lookup per step; ``stop_strings`` re-scans the vocabulary on every ``generate`` call.
    """
    key = (id(tokenizer), tuple(strings))
    if key not in _STOP_TOKENS:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        _STOP_TOKENS[key] = [i for i, text in enumerate(texts) if any(s in text for s in strings)]
    return _STOP_TOKENS[key]


def max_positions(model: torch.nn.Module) -> int:
    """The longest input the model takes (its position table), 2048 if the config does not say."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(
        getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    )


def document_log_weights(scores: np.ndarray, doc_ids: np.ndarray, temperature: float) -> torch.Tensor:
    """``log softmax(score / temperature)`` over the passages found in each row, ``-inf`` where none
    (``doc_id == -1``); a row with no passage at all is all ``-inf``."""
    logits = torch.as_tensor(np.asarray(scores, dtype=np.float64)) / temperature
    logits = logits.masked_fill(torch.as_tensor(np.asarray(doc_ids) < 0), -math.inf)
    return torch.nan_to_num(torch.log_softmax(logits, dim=-1), nan=-math.inf).float()


def _accepts(model: torch.nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


@torch.no_grad()
def last_log_probs(
    model: torch.nn.Module, batch: PaddedRows, keep: int, **kwargs
) -> tuple[torch.Tensor, object]:
    """``log_softmax`` of the logits at the last ``keep`` positions of every row, ``[B, keep, V]`` float32,
    and the model output (for ``past_key_values``). Only those positions go through the LM head when the
    model takes ``logits_to_keep``."""
    extra = {"logits_to_keep": keep} if _accepts(model, "logits_to_keep") else {}
    output = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        **extra,
        **kwargs,
    )
    return torch.log_softmax(output.logits[:, -keep:].float(), dim=-1), output


__all__ = [
    "document_log_weights",
    "tokens_containing",
    "max_positions",
    "cache_kwargs",
    "cache_of",
    "DocumentTokens",
    "PaddedRows",
    "last_log_probs",
    "left_pad",
    "pad_token_id",
]
