"""Memorizing Transformers: an empty memory and a gate of 0 are the base model; the memory is bounded
(oldest evicted), cleared at document boundaries; the gate trains and round-trips through safetensors."""

from __future__ import annotations

import math

import pytest
import torch

from hf_knnlm.attention import MemorizingSettings, MemorizingTransformer, windowed_log_probs

from .attention_utils import document, tiny


def settings(**changes):
    return MemorizingSettings(**{"layer": 1, "k": 8, "max_length": 32, "stride": 16, **changes})


# GPT-2 is left out: the window baseline runs it at positions 0..max_length, the memory at true positions
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gate_at_zero_is_the_base_model(family):
    model, ids = tiny(family), document(120)
    memorizing = MemorizingTransformer(model, settings(gate_init=-math.inf))
    assert torch.allclose(memorizing.log_probs(ids), windowed_log_probs(model, ids, 32, 16), atol=1e-5)
    assert len(memorizing.memory.memories[0]) > 0  # the memory was used, with weight 0


def test_empty_memory_is_the_base_layer():
    model, ids = tiny("llama"), document(32)  # one window: nothing before it
    memorizing = MemorizingTransformer(model, settings(gate_init=5.0))
    assert torch.allclose(memorizing.log_probs(ids), windowed_log_probs(model, ids, 32, 16), atol=1e-5)


def test_an_open_gate_changes_later_windows_only():
    model, ids = tiny("llama"), document(120)
    base = windowed_log_probs(model, ids, 32, 16)
    out = MemorizingTransformer(model, settings(gate_init=0.0)).log_probs(ids)
    assert torch.allclose(out[:31], base[:31], atol=1e-5)
    assert not torch.allclose(out[31:], base[31:], atol=1e-4)


def test_memory_is_bounded_keeps_the_newest_and_is_cleared_per_document():
    model = tiny("llama")
    memorizing = MemorizingTransformer(model, settings(max_memory=20, gate_init=0.0))
    first = memorizing.log_probs(document(100, seed=2))
    for memory in memorizing.memory.memories:
        assert len(memory) == 20
        # windows start at 0, 16, ..., 64: the memory ends before the last one, at 68
        assert memory.payload["position"].tolist() == list(range(48, 68))
    memorizing.log_probs(document(100, seed=3))
    assert torch.equal(memorizing.log_probs(document(100, seed=2)), first)  # nothing left from seed 3


def test_the_gate_trains_and_round_trips(tmp_path):
    model, ids = tiny("llama"), document(96)
    memorizing = MemorizingTransformer(model, settings(gate_init=-2.0))
    assert [p for p in memorizing.parameters() if p.requires_grad] == [memorizing.gate]
    loss = memorizing(ids[None])["loss"]
    loss.backward()
    assert memorizing.gate.grad is not None and memorizing.gate.grad.abs().sum() > 0
    with torch.no_grad():
        memorizing.gate.add_(torch.arange(4.0))
    memorizing.save_gate(tmp_path)
    other = MemorizingTransformer(model, settings())
    other.load_gate(tmp_path)
    assert torch.equal(other.gate, memorizing.gate)
    assert not list(tmp_path.glob("*.tmp*"))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="layer=-1 must be an integer >= 0"):
        MemorizingSettings(layer=-1)
    with pytest.raises(ValueError, match="max_memory=0 must be a positive integer"):
        MemorizingSettings(max_memory=0)
    with pytest.raises(ValueError, match="gate_init=nan must be a number < inf"):
        MemorizingSettings(gate_init=float("nan"))
    with pytest.raises(ValueError, match="layer=9 must be below the model's 2 layers"):
        MemorizingTransformer(tiny("llama"), MemorizingSettings(layer=9))
