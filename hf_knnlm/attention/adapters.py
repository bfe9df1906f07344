"""Where the query, key and value projections and the rotary embedding of a causal LM live.

Two families cover the models this package supports: the Llama family (``q_proj``/``k_proj``/
``v_proj`` linear layers, rotary embeddings on the base model: Llama, SmolLM2, Qwen2, Mistral) and
GPT-2 (one fused ``c_attn`` Conv1D, learned absolute positions). Keys are returned before the
rotation, so that a stored key can be rotated later to any position.
"""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every layer, in layer order."""
    found = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int) and _family(m)]
    found = [m for m in found if not getattr(m, "is_cross_attention", False)]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no supported attention layers: retrieval inside attention supports "
            "the Llama family (q_proj/k_proj/v_proj with rotary embeddings: Llama, SmolLM2, Qwen2, "
            "Mistral) and GPT-2."
        )
    return sorted(found, key=lambda m: m.layer_idx)


def _family(module: nn.Module) -> str | None:
    if all(isinstance(getattr(module, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj")):
        return "llama"
    if hasattr(module, "c_attn") and hasattr(module, "split_size"):
        return "gpt2"
    return None


class AttentionAdapter:
    """Un-rotated per-head projections of one model's attention modules.

    Args:
        model (`nn.Module`): A causal LM of the Llama family or GPT-2.
        foldable (`bool`): Refuse models whose keys pass through a norm after ``k_proj`` (Qwen3,
            OLMo 2): their key is not linear in the hidden state, so ``W_k`` cannot be folded into the query.
    """

    def __init__(self, model: nn.Module, *, foldable: bool = False) -> None:
        self.modules = attention_modules(model)
        first = self.modules[0]
        self.family = _family(first)
        config = model.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(first, "head_dim", None) or config.hidden_size // self.num_heads
        self.hidden_size = config.hidden_size
        self.rotary = getattr(model.base_model, "rotary_emb", None) if self.family == "llama" else None
        if self.family == "llama" and self.rotary is None:
            raise ValueError(
                f"{type(model).__name__}: no rotary embedding found at model.base_model.rotary_emb."
            )
        if foldable and any(hasattr(m, "k_norm") for m in self.modules):
            raise ValueError(
                f"{type(model).__name__} normalises its keys after k_proj (k_norm): W_k cannot be folded "
                "into the query; Unlimiformer supports models whose keys are linear in the hidden state."
            )

    @property
    def groups(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    def kv_head_of(self) -> torch.Tensor:
        """The key/value head every query head reads, shape (num_heads,)."""
        return torch.arange(self.num_heads) // self.groups

    def project(self, module: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Un-rotated queries (n, H, d), keys (n, G, d) and values (n, G, d) of hidden states (n, hidden)."""
        d = self.head_dim
        if self.family == "llama":
            q, k, v = module.q_proj(hidden), module.k_proj(hidden), module.v_proj(hidden)
        else:
            q, k, v = module.c_attn(hidden).split(module.split_size, dim=-1)
        n = hidden.shape[0]
        return q.view(n, -1, d), k.view(n, -1, d), v.view(n, -1, d)

    def queries(self, module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Un-rotated queries (n, H, d)."""
        if self.family == "llama":
            return module.q_proj(hidden).view(hidden.shape[0], -1, self.head_dim)
        return self.project(module, hidden)[0]

    def key_weight(self, module: nn.Module) -> torch.Tensor:
        """``W_k`` per key/value head, shape (G, d, hidden): head g's key is ``W_k[g] @ h + b_k[g]``."""
        d, size = self.head_dim, self.hidden_size
        if self.family == "llama":
            weight = module.k_proj.weight  # (G*d, hidden)
        else:  # Conv1D computes h @ W with W (hidden, 3*hidden); the key block is the middle one
            weight = module.c_attn.weight[:, module.split_size : 2 * module.split_size].T
        return weight.reshape(-1, d, size)

    def rotate(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``keys`` (..., d) rotated to ``positions`` (...) as the model rotates them (GPT-2: unchanged,
        its positions are already in the hidden states)."""
        if self.rotary is None:
            return keys
        flat = positions.reshape(1, -1)
        cos, sin = self.rotary(keys, flat)
        cos, sin = cos.reshape(*positions.shape, -1), sin.reshape(*positions.shape, -1)
        return keys * cos + rotate_half(keys) * sin


__all__ = ["AttentionAdapter", "attention_modules", "rotate_half"]
