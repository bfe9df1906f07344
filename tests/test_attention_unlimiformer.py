"""Unlimiformer: k >= the input is full attention; the folded search finds the best key; the memory is
bounded; the model is restored after use; bad settings are refused."""

from __future__ import annotations

import pytest
import torch

from hf_knnlm.attention import Unlimiformer, UnlimiformerSettings, windowed_log_probs
from hf_knnlm.attention.interface import STATE

from .attention_utils import DECODER, document, full_log_probs, tiny

FAMILIES = ["llama", "qwen2", "gpt2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_k_at_least_the_input_is_full_attention(family):
    model, ids = tiny(family), document(150)
    unlimiformer = Unlimiformer(model, UnlimiformerSettings(k=150, max_length=32, stride=16))
    assert torch.allclose(unlimiformer.log_probs(ids), full_log_probs(model, ids), atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_small_k_retrieves_something_between_window_and_full(family):
    model, ids = tiny(family), document(150)
    full = full_log_probs(model, ids)
    window = windowed_log_probs(model, ids, 32, 16)
    retrieved = Unlimiformer(model, UnlimiformerSettings(k=4, max_length=32, stride=16)).log_probs(ids)
    first_window = slice(0, 31)  # nothing before the first window: all three agree there
    assert torch.allclose(retrieved[first_window], full[first_window], atol=1e-5)
    assert torch.allclose(window[first_window], full[first_window], atol=1e-5)
    assert not torch.allclose(retrieved, window, atol=1e-3)
    assert torch.isfinite(retrieved).all()


def test_layer_begin_leaves_earlier_layers_local():
    model, ids = tiny("llama", layers=3), document(100)
    unlimiformer = Unlimiformer(model, UnlimiformerSettings(k=100, layer_begin=2, max_length=32, stride=16))
    assert sorted(unlimiformer.context.states) == [2]
    out = unlimiformer.log_probs(ids)
    assert not torch.allclose(out, full_log_probs(model, ids), atol=1e-4)  # layers 0-1 saw the window only


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_folded_search_finds_the_best_unrotated_key(family):
    """q . (W_k h + b) ranked by searching W_k^T q among the stored h, per head (per kv head with GQA)."""
    model, ids = tiny(family), document(80)
    unlimiformer = Unlimiformer(model, UnlimiformerSettings(k=1, max_length=32, stride=16))
    unlimiformer.encode(ids[:64])
    layer = unlimiformer.context.states[1]
    adapter, module = unlimiformer.context.adapter, layer.module
    hidden = torch.randn(5, adapter.hidden_size)
    with torch.no_grad():
        queries = adapter.queries(module, hidden)  # (5, H, d)
        folded = torch.einsum("qhd,hdk->qhk", queries, adapter.key_weight(module)[adapter.kv_head_of()])
        _, rows = layer.memory.search(folded.reshape(-1, adapter.hidden_size), 1)
        keys = layer.memory.payload["key"][:, adapter.kv_head_of()]  # (N, H, d) un-rotated, with the bias
        best = torch.einsum("qhd,nhd->qhn", queries, keys).argmax(-1)
    assert len(layer.memory) == 64
    assert torch.equal(rows.view(5, -1), best)


def test_generate_on_a_long_prompt_matches_full_attention():
    model, ids = tiny("llama"), document(120)[None]
    unlimiformer = Unlimiformer(model, UnlimiformerSettings(k=200, max_length=32, stride=16))
    out = unlimiformer.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 126)
    assert torch.equal(out[:, :120], ids)
    assert torch.equal(out, model.generate(ids, max_new_tokens=6, do_sample=False))
    assert model.config._attn_implementation == "sdpa"


def test_memory_is_bounded_and_keeps_the_newest():
    model, ids = tiny("gpt2"), document(100)
    unlimiformer = Unlimiformer(model, UnlimiformerSettings(k=4, max_length=32, stride=16, max_memory=20))
    unlimiformer.encode(ids)
    for layer in unlimiformer.context.states.values():
        assert len(layer.memory) == 20
        assert layer.memory.payload["position"].tolist() == list(range(80, 100))


def test_the_model_is_restored_after_use():
    model, ids = tiny("llama"), document(60)
    before = full_log_probs(model, ids)
    Unlimiformer(model, UnlimiformerSettings(k=4, max_length=32, stride=16)).log_probs(ids)
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, STATE) for m in model.modules())
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert torch.equal(full_log_probs(model, ids), before)


def test_a_new_document_starts_with_an_empty_memory():
    model = tiny("llama")
    unlimiformer = Unlimiformer(model, UnlimiformerSettings(k=8, max_length=32, stride=16))
    first = unlimiformer.log_probs(document(90, seed=2))
    unlimiformer.log_probs(document(90, seed=3))
    assert torch.equal(unlimiformer.log_probs(document(90, seed=2)), first)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"k": 0}, "k=0 must be a positive integer"),
        ({"k": True}, "k=True must be a positive integer"),
        ({"layer_begin": -1}, "layer_begin=-1 must be an integer >= 0"),
        ({"max_length": 32, "stride": 32}, "stride=32 must be in"),
        ({"max_memory": 0}, "max_memory=0 must be a positive integer"),
    ],
)
def test_bad_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        UnlimiformerSettings(**changes)


def test_bad_uses_are_refused():
    model = tiny("llama")
    with pytest.raises(ValueError, match="layer_begin=5 must be below the model's 2 layers"):
        Unlimiformer(model, UnlimiformerSettings(layer_begin=5))
    with pytest.raises(TypeError, match="settings must be an UnlimiformerSettings"):
        Unlimiformer(model, {"k": 3})
    with pytest.raises(ValueError, match="one prompt at a time"):
        Unlimiformer(model).generate(torch.zeros(2, 5, dtype=torch.long))


def test_keys_behind_a_norm_cannot_be_folded():
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(**DECODER, num_hidden_layers=1, num_key_value_heads=2, head_dim=8)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="normalises its keys after k_proj"):
        Unlimiformer(model)
