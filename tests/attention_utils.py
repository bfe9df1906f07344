"""Tiny random models of the families retrieval inside attention supports (Llama with GQA, Qwen2, GPT-2)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

VOCAB = 50


def tiny(family: str, seed: int = 0, layers: int = 2):
    torch.manual_seed(seed)
    if family == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
    elif family == "qwen2":
        config = Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=1,
            max_position_embeddings=512,
        )
    else:
        config = GPT2Config(
            n_layer=layers,
            n_embd=32,
            n_head=2,
            vocab_size=VOCAB,
            n_positions=512,
            bos_token_id=1,
            eos_token_id=1,
            pad_token_id=1,
        )
    return AutoModelForCausalLM.from_config(config).eval()


def full_log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1]
    return torch.log_softmax(logits.float(), -1).gather(1, ids[1:, None])[:, 0]


def document(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))
