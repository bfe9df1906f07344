"""The KV cache of retrieved passages, extended by the context of every passage-prefixed row that reads them.

A row ``d ⊕ tokens[window.begin:end]`` starts with the passage's tokens at positions ``0 .. |d| - 1``.
A causal LM's keys and values there depend on those tokens and positions alone, so they are computed
once per passage (one batched forward over the passages a batch of rows lacks) and each row extends a
transformers ``DynamicCache`` of them with its context instead of recomputing the passage.

The prefix is reused only where the recomputed input would be exactly the cached tokens followed by the
row's context: the same passage id, cut to the same ``max_document_tokens`` (one ``DocumentTokens`` per
evaluation), at the same positions from 0. A passage is kept only while rows that read it remain (the
evaluation knows every row in advance) and within a byte budget; one not kept is computed again.

Models whose cache is not a plain ``DynamicLayer`` per layer (sliding windows, linear attention) are not
served: ``supports`` is False and their rows are recomputed whole.
"""

from __future__ import annotations

from collections import Counter

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..lm.caches import cache_kwargs
from ..lm.log_probs import HeadCapture
from .prefix import left_pad

DEFAULT_BUDGET_BYTES = 1 << 30


def supports(model: torch.nn.Module) -> bool:
    """True when every layer of ``model``'s ``DynamicCache`` is a plain ``DynamicLayer`` (a full cache
    that a left-padded prefix may be written into)."""
    try:
        layers = DynamicCache(config=model.config).layers
    except (AttributeError, TypeError, ValueError):
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


class PassageKV:
    """Keys and values of passages for the rows of one evaluation.

    Args:
        head (`HeadCapture`): the model, run up to its LM head (nothing past the last layer is needed).
        uses (`Counter`): passage id -> rows that will read it; a passage is dropped after its last row.
        pad_id (`int`): the id that left-pads passages computed together.
        budget_bytes (`int`): the most bytes of keys and values kept between batches.
    """

    def __init__(
        self, head: HeadCapture, uses: Counter, pad_id: int, budget_bytes: int = DEFAULT_BUDGET_BYTES
    ):
        self.head = head
        self.remaining = Counter(uses)
        self.pad_id = pad_id
        self.budget_bytes = budget_bytes
        self._kept: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.forward_tokens = 0
        self.padded_tokens = 0

    def prefix(
        self, docs: list[int], tokens: list[list[int]], device: torch.device | str
    ) -> tuple[DynamicCache | None, torch.Tensor]:
        """The left-padded cache ``[rows, heads, P, d]`` of the rows' passages (``P``: the longest) and its
        ``[rows, P]`` attention mask; ``(None, [rows, 0] mask)`` when every passage is empty."""
        self._compute(docs, tokens, device)
        width = max(len(t) for t in tokens)
        mask = torch.zeros((len(docs), width), dtype=torch.long, device=device)
        for r, t in enumerate(tokens):
            mask[r, width - len(t) :] = 1
        cache = None
        if width:
            layers = len(next(iter(self._batch.values())))
            cache = DynamicCache(ddp_cache_data=[self._padded(docs, tokens, i, width) for i in range(layers)])
        self._release(docs)
        return cache, mask

    def _compute(self, docs: list[int], tokens: list[list[int]], device) -> None:
        """One forward over the passages neither kept nor empty (each once); every row's KV in ``_batch``."""
        self._batch = {d: self._kept[d] for d in docs if d in self._kept}
        todo: dict[int, list[int]] = {}
        for d, t in zip(docs, tokens, strict=True):
            seen = d in self._batch or d in todo
            self.hits, self.misses = self.hits + seen, self.misses + (not seen)
            if not seen and t:
                todo[d] = t
        if not todo:
            return
        padded = left_pad(list(todo.values()), self.pad_id, device)
        self.forward_tokens += sum(len(t) for t in todo.values())
        self.padded_tokens += padded.input_ids.numel()
        cache = DynamicCache()
        # The layers fill ``cache`` before the forward stops at the head.
        self.head.forward(
            padded.input_ids,
            padded.attention_mask,
            position_ids=padded.position_ids,
            use_cache=True,
            **cache_kwargs(self.head.model, cache),
        )
        width = padded.width
        for i, (d, t) in enumerate(todo.items()):
            cut = slice(width - len(t), None)
            self._batch[d] = [
                (kv.keys[i : i + 1, :, cut].clone(), kv.values[i : i + 1, :, cut].clone())
                for kv in cache.layers
            ]

    def _padded(self, docs, tokens, layer: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = next(kv for kv in self._batch.values())[layer][0]
        shape = (len(docs), sample.shape[1], width, sample.shape[3])
        keys, values = sample.new_zeros(shape), sample.new_zeros(shape)
        for r, (d, t) in enumerate(zip(docs, tokens, strict=True)):
            if t:
                k, v = self._batch[d][layer]
                keys[r, :, width - len(t) :] = k[0]
                values[r, :, width - len(t) :] = v[0]
        return keys, values

    def _release(self, docs: list[int]) -> None:
        """Keep the passages later rows read (within the budget); forget the rest."""
        for d in set(docs):
            self.remaining[d] -= docs.count(d)
            kv = self._batch.get(d)
            if kv is None:
                continue
            size = sum(k.numel() * k.element_size() * 2 for k, _ in kv)
            if self.remaining[d] > 0 and d not in self._kept and self._bytes + size <= self.budget_bytes:
                self._kept[d], self._bytes = kv, self._bytes + size
            elif self.remaining[d] <= 0 and d in self._kept:
                del self._kept[d]
                self._bytes -= size
        self._batch = {}

    @property
    def hit_rate(self) -> float:
        """Rows whose passage KV came from the cache, of all rows served."""
        served = self.hits + self.misses
        return self.hits / served if served else 0.0


__all__ = ["DEFAULT_BUDGET_BYTES", "PassageKV", "supports"]
