"""Memorizing Transformers (Wu et al. 2022): one layer's kNN memory of earlier (key, value) pairs of
the same document, mixed with local attention by a learned per-head gate.

Memory attention is position-free, as in the paper: queries and keys are compared before the rotary
embedding. The mix is ``local + g * (memory - local)`` with ``g = sigmoid(bias)`` per head, so a
gate of exactly 0 (``bias = -inf``) returns the base layer's output unchanged, and an empty memory
calls the base attention itself.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils.files import atomic_path
from .interface import LayerState, RetrievalContext
from .memory import KNNMemory
from .settings import MemorizingSettings
from .unlimiformer import windowed_log_probs

GATE_FILE = "memorizing_gate.safetensors"


class MemorizingLayer(LayerState):
    """The memory layer: one faiss index of un-rotated keys per key/value head."""

    def __init__(
        self, context: RetrievalContext, module: nn.Module, settings: MemorizingSettings, gate
    ) -> None:
        super().__init__(context, module)
        adapter = context.adapter
        self.k, self.gate = settings.k, gate
        self.memories = [
            KNNMemory(adapter.head_dim, settings.max_memory) for _ in range(adapter.num_kv_heads)
        ]

    def ready(self) -> bool:
        return len(self.memories[0]) > 0

    def clear(self) -> None:
        for memory in self.memories:
            memory.clear()

    def _store(self, hidden, keys, values, positions) -> None:
        for g, memory in enumerate(self.memories):
            memory.add(keys[:, g], key=keys[:, g], value=values[:, g], position=positions)

    def attend(self, module, query, key, value, attention_mask, *, base, scaling=None, **kwargs):
        local, weights = base(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        batch, heads, q_len, d = query.shape
        if batch != 1:
            raise ValueError(f"Memorizing Transformers run one sequence at a time; got a batch of {batch}.")
        scaling = d**-0.5 if scaling is None else scaling
        adapter = self.context.adapter
        queries = self.queries().to(query.dtype)  # (q, H, d), un-rotated
        mem = torch.empty_like(local[0])  # (q, H, d)
        for h in range(heads):
            memory = self.memories[h // adapter.groups]
            _, rows = memory.search(queries[:, h], self.k)
            scores = torch.einsum("qd,qkd->qk", queries[:, h], memory.payload["key"][rows]) * scaling
            mem[:, h] = torch.einsum(
                "qk,qkd->qd", torch.softmax(scores.float(), -1).to(query.dtype), memory.payload["value"][rows]
            )
        g = torch.sigmoid(self.gate).to(local.dtype).view(1, 1, heads, 1)
        return local + g * (mem[None] - local), weights


class MemorizingTransformer(nn.Module):
    """A causal LM whose layer ``settings.layer`` also attends over a kNN memory of the document so far.

    Only the gate (one bias per head) is trainable; ``forward(input_ids, labels)`` scores one document
    in sliding windows from an empty memory (a document boundary), so ``transformers.Trainer`` can
    fine-tune the gate on long documents.

    Args:
        model (`PreTrainedModel`): A causal LM of the Llama family or GPT-2 (its weights stay frozen).
        settings (`MemorizingSettings`, *optional*): The layer, k, memory size, windows, gate start.

    Examples:

    ```python
    >>> import torch
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> from hf_knnlm.attention import MemorizingSettings, MemorizingTransformer, windowed_log_probs
    >>> _ = torch.manual_seed(0)
    >>> config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                      num_attention_heads=4, num_key_value_heads=2)
    >>> model = AutoModelForCausalLM.from_config(config).eval()
    >>> ids = torch.randint(0, 50, (80,))
    >>> memorizing = MemorizingTransformer(model, MemorizingSettings(layer=1, max_length=32, stride=16,
    ...                                                             gate_init=float("-inf")))
    >>> base = windowed_log_probs(model, ids, 32, 16)
    >>> bool(torch.allclose(memorizing.log_probs(ids), base, atol=1e-5))  # a gate of 0: the base model
    True
    >>> memorizing.gate.data.fill_(0.0)  # doctest: +ELLIPSIS
    tensor(...)
    >>> bool(torch.equal(memorizing.log_probs(ids), base))  # half memory, half local attention
    False
    ```
    """

    def __init__(self, model: nn.Module, settings: MemorizingSettings | None = None) -> None:
        super().__init__()
        self.settings = settings or MemorizingSettings()
        if not isinstance(self.settings, MemorizingSettings):
            raise TypeError(f"settings must be a MemorizingSettings, not {type(self.settings).__name__}.")
        layers = model.config.num_hidden_layers
        if self.settings.layer >= layers:
            raise ValueError(f"layer={self.settings.layer} must be below the model's {layers} layers.")
        self.model = model
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        heads = model.config.num_attention_heads
        self.gate = nn.Parameter(torch.full((heads,), float(self.settings.gate_init)))
        self.context = RetrievalContext(model, self._layer, foldable=False)

    def _layer(self, context: RetrievalContext, module: nn.Module) -> MemorizingLayer | None:
        if module.layer_idx != self.settings.layer:
            return None
        return MemorizingLayer(context, module, self.settings, self.gate)

    @property
    def memory(self) -> MemorizingLayer:
        return self.context.states[self.settings.layer]

    def reset(self) -> None:
        """Forget the memory (a document boundary)."""
        self.context.reset()

    @torch.no_grad()
    def log_probs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Log-probs of tokens 1..n-1 of one document (1-D ids), from an empty memory."""
        return windowed_log_probs(self.model, input_ids, self.settings.max_length, self.settings.stride, self)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any) -> dict:
        """Mean negative log-likelihood of one document (batch 1) in windows, memory cleared first."""
        if input_ids.ndim == 2:
            if input_ids.shape[0] != 1:
                raise ValueError(f"input_ids of shape {tuple(input_ids.shape)}: one document per batch.")
            input_ids = input_ids[0]
        with torch.enable_grad():
            scores = windowed_log_probs(
                self.model, input_ids, self.settings.max_length, self.settings.stride, self
            )
        return {"loss": -scores.mean()}

    def save_gate(self, folder: str | Path) -> Path:
        """Write the gate (and the settings it was trained with) to ``folder/memorizing_gate.safetensors``."""
        from safetensors.torch import save_file

        path = Path(folder) / GATE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {name: str(value) for name, value in self.settings.to_dict().items()}
        with atomic_path(path) as tmp:
            save_file({"gate": self.gate.detach().cpu().contiguous()}, str(tmp), metadata=metadata)
        return path

    def load_gate(self, folder: str | Path) -> None:
        """Read a gate ``save_gate`` wrote; its number of heads must be this model's."""
        from safetensors.torch import load_file

        gate = load_file(str(Path(folder) / GATE_FILE))["gate"]
        if gate.shape != self.gate.shape:
            raise ValueError(
                f"the saved gate has {gate.shape[0]} heads; this model has {self.gate.shape[0]}."
            )
        with torch.no_grad():
            self.gate.copy_(gate)

    def gate_values(self) -> list[float]:
        """The gate per head, ``sigmoid(bias)`` (0: local attention only)."""
        return [
            0.0 if math.isinf(b) and b < 0 else float(torch.sigmoid(torch.tensor(b)))
            for b in self.gate.tolist()
        ]


__all__ = ["GATE_FILE", "MemorizingLayer", "MemorizingTransformer"]
