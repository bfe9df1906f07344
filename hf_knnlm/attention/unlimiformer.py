"""Unlimiformer (Bertsch et al. 2023) for decoder-only models: every head attends over its local
window plus its top-k keys of the whole preceding input, retrieved from one faiss index per layer.

The index stores each token's attention input ``h`` (after the layer norm), once per layer. Head
``i``'s score of a stored token is ``q_i . (W_k h + b)``, and ``q_i . W_k h = (W_k^T q_i) . h``: the
query is folded through ``W_k`` of its key/value head (grouped-query attention: one kv head serves
several query heads) and searched in the layer's index, so one index serves every head.

Positions: the search ranks stored tokens by the position-free score ``q . k`` (rotary embeddings
make the rotated score depend on the distance, which no single index can hold). The retrieved keys
are then rotated to their original positions and the query to its own, so the attention over them
is exactly full attention's over those tokens; with ``k`` at least the input length, Unlimiformer
equals full attention (tests/test_attention_unlimiformer.py). GPT-2's learned positions are already
in the stored hidden states, which were computed at the tokens' positions in the whole input.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..lm.windows import sliding_windows
from .interface import LayerState, RetrievalContext, additive_mask
from .memory import KNNMemory
from .settings import UnlimiformerSettings


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


class UnlimiformerLayer(LayerState):
    """One layer's index of attention inputs and the attention over window + retrieved keys."""

    def __init__(self, context: RetrievalContext, module: nn.Module, settings: UnlimiformerSettings) -> None:
        super().__init__(context, module)
        self.k, self.sink_tokens = settings.k, settings.sink_tokens
        self.memory = KNNMemory(context.adapter.hidden_size, settings.max_memory)
        self.sinks: dict[str, torch.Tensor] = {}  # key, value, position of the first sink_tokens tokens

    def ready(self) -> bool:
        return len(self.memory) > 0 or bool(self.sinks)

    def clear(self) -> None:
        self.memory.clear()
        self.sinks = {}

    def _store(self, hidden, keys, values, positions) -> None:
        early = positions < self.sink_tokens  # attended by every query, never searched
        if bool(early.any()):
            new = {"key": keys[early], "value": values[early], "position": positions[early]}
            self.sinks = {n: torch.cat([self.sinks[n], t]) if self.sinks else t for n, t in new.items()}
        if not bool(early.all()):
            late = ~early
            self.memory.add(hidden[late], key=keys[late], value=values[late], position=positions[late])

    def _retrieved(self, module, query) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (q, H, k, d) rotated to their positions and values (q, H, k, d) of each head's top k."""
        adapter = self.context.adapter
        q_len, heads = query.shape[2], query.shape[1]
        kv_head = adapter.kv_head_of()
        with torch.no_grad():
            folded = torch.einsum(
                "qhd,hdk->qhk", self.queries().to(query.dtype), adapter.key_weight(module)[kv_head]
            )
            _, rows = self.memory.search(folded.reshape(q_len * heads, -1), self.k)
        rows = rows.view(q_len, heads, -1)
        heads_index = kv_head[None, :, None]
        keys = self.memory.payload["key"][rows, heads_index]
        values = self.memory.payload["value"][rows, heads_index]
        return adapter.rotate(keys, self.memory.payload["position"][rows]), values

    def _sink_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (H, s, d) rotated to their positions and values (H, s, d) of the sink tokens."""
        adapter, kv_head = self.context.adapter, self.context.adapter.kv_head_of()
        keys, values = self.sinks["key"][:, kv_head], self.sinks["value"][:, kv_head]  # (s, H, d)
        keys = adapter.rotate(keys, self.sinks["position"][:, None].expand(-1, keys.shape[1]))
        return keys.transpose(0, 1), values.transpose(0, 1)

    def attend(self, module, query, key, value, attention_mask, *, base, scaling=None, **kwargs):
        adapter = self.context.adapter
        batch, heads, q_len, d = query.shape
        if batch != 1:
            raise ValueError(f"Unlimiformer runs one sequence at a time; got a batch of {batch}.")
        scaling = d**-0.5 if scaling is None else scaling
        q = query[0]  # (H, q, d)
        local_keys = repeat_kv(key, adapter.groups)[0]
        local = torch.matmul(q, local_keys.transpose(-1, -2)) * scaling
        scores = [local + additive_mask(attention_mask, q_len, local.shape[-1], local.dtype)[0]]
        values = [repeat_kv(value, adapter.groups)[0]]  # (H, n, d) shared by every query, or (q, H, k, d)
        if self.sinks:
            sink_keys, sink_values = self._sink_keys()
            scores.append(torch.matmul(q, sink_keys.transpose(-1, -2)) * scaling)
            values.append(sink_values)
        if len(self.memory):
            keys, retrieved_values = self._retrieved(module, query)
            scores.append(torch.einsum("hqd,qhkd->hqk", q, keys) * scaling)
            values.append(retrieved_values)
        weights = torch.softmax(torch.cat(scores, dim=-1).float(), dim=-1).to(query.dtype)
        out, begin = torch.zeros_like(q), 0
        for part, part_values in zip(scores, values, strict=True):
            w = weights[..., begin : begin + part.shape[-1]]
            begin += part.shape[-1]
            per_query = part_values.ndim == 4
            out = out + (torch.einsum("hqk,qhkd->hqd", w, part_values) if per_query else w @ part_values)
        return out.transpose(0, 1)[None].contiguous(), None


class Unlimiformer:
    """A causal LM whose attention, from ``settings.layer_begin`` on, also sees the top-k keys of the
    whole preceding input: perplexity over long documents and ``generate`` on long prompts.

    Args:
        model (`PreTrainedModel`): A causal LM of the Llama family (Llama, SmolLM2, Qwen2) or GPT-2.
        settings (`UnlimiformerSettings`, *optional*): k, the first retrieving layer, the window.

    Examples:

    ```python
    >>> import torch
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> from hf_knnlm.attention import Unlimiformer, UnlimiformerSettings
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    >>> model = AutoModelForCausalLM.from_config(config).eval()
    >>> ids = torch.randint(0, 50, (1, 96))
    >>> full = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(1, ids[0, 1:, None])[:, 0]
    >>> unlimiformer = Unlimiformer(model, UnlimiformerSettings(k=96, max_length=32, stride=16))
    >>> windowed = unlimiformer.log_probs(ids[0])  # 32-token windows + every earlier token retrieved
    >>> bool(torch.allclose(windowed, full, atol=1e-4))  # k >= the input: exactly full attention
    True
    >>> unlimiformer.generate(ids, max_new_tokens=3, do_sample=False).shape
    torch.Size([1, 99])
    ```
    """

    def __init__(self, model: nn.Module, settings: UnlimiformerSettings | None = None) -> None:
        self.settings = settings or UnlimiformerSettings()
        if not isinstance(self.settings, UnlimiformerSettings):
            raise TypeError(f"settings must be an UnlimiformerSettings, not {type(self.settings).__name__}.")
        layers = model.config.num_hidden_layers
        if self.settings.layer_begin >= layers:
            raise ValueError(
                f"layer_begin={self.settings.layer_begin} must be below the model's {layers} layers."
            )
        self.model = model
        self.context = RetrievalContext(model, self._layer, foldable=True)

    def _layer(self, context: RetrievalContext, module: nn.Module) -> UnlimiformerLayer | None:
        if module.layer_idx < self.settings.layer_begin:
            return None
        return UnlimiformerLayer(context, module, self.settings)

    def __enter__(self) -> Unlimiformer:
        self.context.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.context.__exit__(*exc)

    def reset(self) -> None:
        """Forget the memory (a new document)."""
        self.context.reset()

    @torch.no_grad()
    def log_probs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of tokens 1..n-1 of one document (1-D ids), scored from its start."""
        return windowed_log_probs(self.model, input_ids, self.settings.max_length, self.settings.stride, self)

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor) -> None:
        """Put the tokens of ``input_ids`` (1-D) into the memory (after a reset)."""
        self.reset()
        with self:
            self.context.collect = True
            for window in sliding_windows(len(input_ids), self.settings.max_length, self.settings.stride):
                self.context.commit(window.begin)
                self.context.offset = window.begin
                self.model(input_ids[None, window.begin : window.end])
            if len(input_ids) == 1:
                self.model(input_ids[None])
            self.context.commit(len(input_ids))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``model.generate`` on a long prompt (batch 1): the prompt before its last window goes into the
        memory; the last window (and what is generated) is the local context."""
        if input_ids.ndim != 2 or input_ids.shape[0] != 1:
            raise ValueError(
                f"input_ids of shape {tuple(input_ids.shape)} must be (1, n): one prompt at a time."
            )
        split = max(0, input_ids.shape[1] - self.settings.max_length)
        if split:
            self.encode(input_ids[0, :split])
        else:
            self.reset()
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = kwargs["attention_mask"][:, split:]
        with self:
            self.context.collect, self.context.offset = False, split
            out = self.model.generate(input_ids[:, split:], **kwargs)
            self.context.collect = True
        return torch.cat([input_ids[:, :split], out], dim=1)


def windowed_log_probs(
    model: nn.Module, input_ids: torch.Tensor, max_length: int, stride: int, retrieval: Any | None = None
) -> torch.Tensor:
    """Log-probabilities of tokens 1..n-1 of one document (1-D ids) in sliding windows of
    ``max_length`` tokens, ``stride`` new targets each (the first window scores all of its tokens).

    Without ``retrieval`` this is the sliding-window baseline: every window runs alone, at positions
    0..max_length. With ``retrieval`` (an [`Unlimiformer`][hf_knnlm.Unlimiformer] or a
    [`MemorizingTransformer`][hf_knnlm.MemorizingTransformer]) its memory is cleared first (a document
    boundary), every window also attends over the memory of the tokens before it, and runs at its
    positions in the whole document.

    Args:
        model (`PreTrainedModel`): The causal LM.
        input_ids (`torch.Tensor`): One document's token ids, 1-D.
        max_length (`int`): Window length in tokens.
        stride (`int`): New tokens scored per window.
        retrieval (`Unlimiformer | MemorizingTransformer`, *optional*): The memory windows also see.

    Returns:
        `torch.Tensor`: ``n - 1`` log-probabilities, one per token after the first.

    Examples:

    ```python
    >>> import torch
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> from hf_knnlm.attention import windowed_log_probs
    >>> _ = torch.manual_seed(0)
    >>> config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                      num_attention_heads=4, num_key_value_heads=2)
    >>> model = AutoModelForCausalLM.from_config(config).eval()
    >>> ids = torch.randint(0, 50, (64,))
    >>> full = torch.log_softmax(model(ids[None]).logits[0, :-1], -1).gather(1, ids[1:, None])[:, 0]
    >>> bool(torch.allclose(windowed_log_probs(model, ids, 64, 32), full, atol=1e-5))  # one window
    True
    >>> windowed = windowed_log_probs(model, ids, 16, 8)  # each token sees 8 to 15 tokens before it
    >>> windowed.shape, bool(torch.allclose(windowed[:15], full[:15], atol=1e-5))  # the first window
    (torch.Size([63]), True)
    >>> bool(torch.allclose(windowed, full, atol=1e-3))  # later ones lose the context before them
    False
    ```
    """
    if input_ids.ndim != 1:
        raise ValueError(f"input_ids of shape {tuple(input_ids.shape)} must be 1-D (one document).")
    out = torch.empty(max(len(input_ids) - 1, 0))
    if retrieval is not None:
        retrieval.reset()
    context = retrieval.context if retrieval is not None else None
    with context if context is not None else _nothing():
        for window in sliding_windows(len(input_ids), max_length, stride):
            ids = input_ids[None, window.begin : window.end]
            if context is not None:
                context.collect = True
                context.commit(window.begin)
                context.offset = window.begin
                logits = model(ids).logits[0]
            else:
                logits = model(ids, position_ids=torch.arange(ids.shape[1])[None]).logits[0]
            first = window.first_target - window.begin
            targets = input_ids[window.first_target : window.end]
            scores = torch.log_softmax(logits[first - 1 : -1].float(), dim=-1)
            out[window.first_target - 1 : window.end - 1] = scores.gather(1, targets[:, None])[:, 0]
    return out


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


__all__ = ["Unlimiformer", "UnlimiformerLayer", "windowed_log_probs"]
