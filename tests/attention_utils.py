"""Tiny random models of the families retrieval inside attention supports (Llama with GQA, Qwen2, GPT-2)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

try:  # tests/ is a package on main, a plain folder elsewhere
    from tests.conftest import tiny_gpt2
except ImportError:
    from conftest import tiny_gpt2

VOCAB = 50
# What the tiny Llama-style decoders share; each family sets its layers and key/value heads.
DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4)
_FAMILIES = {"llama": (LlamaConfig, 2), "qwen2": (Qwen2Config, 1)}  # config class, key/value heads


def tiny(family: str, seed: int = 0, layers: int = 2):
    if family not in _FAMILIES:
        return tiny_gpt2(VOCAB, seed=seed, n_layer=layers, n_positions=512)
    torch.manual_seed(seed)
    config_class, kv_heads = _FAMILIES[family]
    config = config_class(
        **DECODER, num_hidden_layers=layers, num_key_value_heads=kv_heads, max_position_embeddings=512
    )
    return AutoModelForCausalLM.from_config(config).eval()


def full_log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1]
    return torch.log_softmax(logits.float(), -1).gather(1, ids[1:, None])[:, 0]


def document(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))
