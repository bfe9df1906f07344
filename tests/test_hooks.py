"""The hook finds the last layer's FFN and captures its post-LayerNorm input, for many families."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from hf_knnlm import FFNInputCapture, find_ffn_module
from hf_knnlm.lm.hooks import FFN_MODULES

_LLAMA_LIKE = dict(
    num_hidden_layers=2,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=2,
    num_key_value_heads=2,
    vocab_size=100,
)

# family -> (config, expected FFN path, the LayerNorm whose output the FFN reads)
FAMILIES = {
    "gpt2": (
        T.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100),
        "transformer.h.1.mlp",
        "transformer.h.1.ln_2",
    ),
    "llama": (T.LlamaConfig(**_LLAMA_LIKE), "model.layers.1.mlp", "model.layers.1.post_attention_layernorm"),
    "qwen2": (T.Qwen2Config(**_LLAMA_LIKE), "model.layers.1.mlp", "model.layers.1.post_attention_layernorm"),
    "mistral": (
        T.MistralConfig(**_LLAMA_LIKE),
        "model.layers.1.mlp",
        "model.layers.1.post_attention_layernorm",
    ),
    "gemma": (
        T.GemmaConfig(**_LLAMA_LIKE, head_dim=16),
        "model.layers.1.mlp",
        "model.layers.1.post_attention_layernorm",
    ),
    "gemma2": (
        T.Gemma2Config(**_LLAMA_LIKE, head_dim=16),
        "model.layers.1.mlp",
        "model.layers.1.pre_feedforward_layernorm",
    ),
    "qwen3": (
        T.Qwen3Config(**_LLAMA_LIKE, head_dim=16),
        "model.layers.1.mlp",
        "model.layers.1.post_attention_layernorm",
    ),
    "phi": (
        T.PhiConfig(
            num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, vocab_size=100
        ),
        "model.layers.1.mlp",
        "model.layers.1.input_layernorm",
    ),
    "phi3": (
        T.Phi3Config(**_LLAMA_LIKE, pad_token_id=0),
        "model.layers.1.mlp",
        "model.layers.1.post_attention_layernorm",
    ),
    "gpt_neox": (
        T.GPTNeoXConfig(
            num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, vocab_size=100
        ),
        "gpt_neox.layers.1.mlp",
        "gpt_neox.layers.1.post_attention_layernorm",
    ),
    "opt": (
        T.OPTConfig(
            num_hidden_layers=2,
            hidden_size=32,
            ffn_dim=64,
            num_attention_heads=2,
            vocab_size=100,
            word_embed_proj_dim=32,
        ),
        "model.decoder.layers.1.fc1",
        "model.decoder.layers.1.final_layer_norm",
    ),
    "falcon": (
        T.FalconConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, vocab_size=100),
        "transformer.h.1.mlp",
        "transformer.h.1.input_layernorm",
    ),
    "bloom": (
        T.BloomConfig(n_layer=2, hidden_size=32, n_head=2, vocab_size=100),
        "transformer.h.1.mlp",
        "transformer.h.1.post_attention_layernorm",
    ),
    "gptj": (
        T.GPTJConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=100, rotary_dim=8),
        "transformer.h.1.mlp",
        "transformer.h.1.ln_1",
    ),
    "gpt_bigcode": (
        T.GPTBigCodeConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=100),
        "transformer.h.1.mlp",
        "transformer.h.1.ln_2",
    ),
}


def _model(family: str):
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(FAMILIES[family][0]).eval()


def _layernorm_output(model, path: str, input_ids: torch.Tensor) -> torch.Tensor:
    seen = {}
    handle = model.get_submodule(path).register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    with torch.no_grad():
        model(input_ids=input_ids)
    handle.remove()
    return seen["out"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_capture_is_post_layernorm_ffn_input_of_last_layer(family):
    model = _model(family)
    _, ffn_path, ln_path = FAMILIES[family]
    assert find_ffn_module(model) == ffn_path
    ids = torch.randint(0, 100, (2, 7))
    expected = _layernorm_output(model, ln_path, ids).reshape(2, 7, -1)
    with FFNInputCapture(model) as capture, torch.no_grad():
        model(input_ids=ids)
        hidden = capture.hidden_states(2)
    assert hidden.shape == (2, 7, 32)
    torch.testing.assert_close(hidden, expected, rtol=0, atol=0)


def test_at_least_eight_families_are_in_the_table():
    assert len(set(FAMILIES) & set(FFN_MODULES)) >= 8


def test_generic_fallback_finds_unlisted_model(monkeypatch):
    monkeypatch.delitem(FFN_MODULES, "llama")
    assert find_ffn_module(_model("llama")) == "model.layers.1.mlp"


def test_hook_module_override_and_bad_override():
    model = _model("gpt2")
    assert find_ffn_module(model, "transformer.h.0.mlp") == "transformer.h.0.mlp"
    with pytest.raises(ValueError, match="transformer.h.9.mlp"):
        find_ffn_module(model, "transformer.h.9.mlp")


def test_clear_error_when_nothing_is_found():
    with pytest.raises(ValueError, match="hook_module="):
        find_ffn_module(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_hook_is_removed_cleanly():
    model = _model("llama")
    module = model.get_submodule("model.layers.1.mlp")
    before = len(module._forward_pre_hooks)
    with FFNInputCapture(model):
        assert len(module._forward_pre_hooks) == before + 1
    assert len(module._forward_pre_hooks) == before


def test_capture_before_forward_is_an_error():
    with (
        FFNInputCapture(_model("gpt2")) as capture,
        pytest.raises(RuntimeError, match="No input was captured"),
    ):
        capture.hidden_states(1)
