"""Adaptive retrieval: the gate's skipped tokens keep p_LM exactly; it is saved with the store."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import LogitsProcessorList

from hf_knnlm import Datastore, KNNLMForCausalLM, KNNProcessor, evaluate_perplexity
from hf_knnlm.knnlm.gate import RetrievalGate, lm_features
from hf_knnlm.knnlm.gate_training import fit_gate, train_gate

WINDOWS = dict(max_length=64, stride=32, batch_size=4, disable_progress=True)


def test_lm_features_match_their_definition():
    log_probs = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), -1)
    p = log_probs.exp()
    expected = [-(p * log_probs).sum(), log_probs.max(), log_probs[0, 0] - log_probs[0, 1]]
    torch.testing.assert_close(lm_features(log_probs)[0], torch.stack(expected))


def test_fit_gate_learns_where_retrieval_helps():
    torch.manual_seed(0)
    n = 2000
    features = torch.randn(n, 3)
    helps = features[:, 0] > 0  # p_kNN is right exactly when the first feature is positive
    lm_target = torch.full((n,), -3.0)
    knn_target = torch.where(helps, torch.tensor(-0.1), torch.tensor(-9.0))
    gate = fit_gate(features, None, lm_target, knn_target, skip_fraction=0.5, calibration_fraction=0.0)
    lam = torch.sigmoid(gate.logits(features))
    assert lam[helps].mean() > 0.8 and lam[~helps].mean() < 0.2
    skipped = gate.lmbda(features) == 0
    assert abs(skipped.float().mean().item() - 0.5) < 0.01
    assert (skipped == ~helps).float().mean() > 0.95


def test_calibration_tokens_set_the_threshold_and_are_not_fitted():
    torch.manual_seed(0)
    n = 2000
    features = torch.randn(n, 3)
    lm_target = torch.full((n,), -3.0)
    knn_target = torch.where(features[:, 0] > 0, torch.tensor(-0.1), torch.tensor(-9.0))
    gate = fit_gate(features, None, lm_target, knn_target, skip_fraction=0.3, calibration_fraction=0.25)
    assert gate.info["train_tokens"] == 1500 and gate.info["calibration_tokens"] == 500
    held = torch.sigmoid(gate.logits(features[1500:]))
    assert gate.skip_below == pytest.approx(torch.quantile(held, 0.3).item())
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=f"calibration_fraction={bad}"):
            fit_gate(features, None, lm_target, knn_target, calibration_fraction=bad)


@pytest.fixture()
def gated_store(store_dir, tmp_path, model, tokenizer, other_text):
    folder = tmp_path / "gated"
    shutil.copytree(store_dir, folder)
    store = Datastore.from_pretrained(folder)
    train_gate(model, tokenizer, [other_text], store, k=8, temperature=5.0, skip_fraction=0.5, **WINDOWS)
    return folder


def test_gate_is_saved_with_the_store_and_verified(gated_store):
    store = Datastore.from_pretrained(gated_store)  # verifies every sha256, the gate's included
    assert "gate.safetensors" in store.config.files
    gate = RetrievalGate.from_datastore(store)
    assert gate.info["k"] == 8 and 0 < gate.skip_below < 1
    (gated_store / "gate.safetensors").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="gate.safetensors"):
        Datastore.from_pretrained(gated_store)


def test_gate_skips_searches_and_skipped_tokens_are_the_lm(model, tokenizer, gated_store, corpus_text):
    store = Datastore.from_pretrained(gated_store)
    settings = dict(k=8, lmbda=0.3, temperature=5.0, max_tokens=300, **WINDOWS)
    result = evaluate_perplexity(model, tokenizer, [corpus_text], store, gate=True, **settings)
    assert 0.2 < result["searches_saved"] < 0.9
    assert result["searches"] + round(result["searches_saved"] * result["steps"]) == result["steps"]

    # A gate that skips everything is the base model exactly.
    gate = RetrievalGate.from_datastore(store)
    gate.skip_below = 2.0
    none = evaluate_perplexity(model, tokenizer, [corpus_text], store, gate=gate, **settings)
    assert none["knn_ppl"] == none["base_ppl"] and none["searches"] == 0


def test_gate_in_processor_and_wrapper(model, tokenizer, gated_store):
    store = Datastore.from_pretrained(gated_store)
    inputs = tokenizer("The king sees", return_tensors="pt")
    with KNNProcessor(model, store, k=8, temperature=5.0, gate=True) as knn:
        model.generate(
            **inputs, max_new_tokens=6, do_sample=False, logits_processor=LogitsProcessorList([knn])
        )
        assert knn.retrieval_stats.steps == 6
    wrapped = KNNLMForCausalLM.from_pretrained(model, datastore=store, k=8, temperature=5.0, gate=True)
    out = wrapped(**inputs)
    torch.testing.assert_close(out.logits.exp().sum(-1), torch.ones(out.logits.shape[:2]))


def test_retomaton_and_gate_together_are_refused(model, store):
    with pytest.raises(ValueError, match="does not combine"):
        KNNProcessor(model, store, k=8, retomaton=2, gate=True)
    with pytest.raises(ValueError, match="no retrieval gate"):
        KNNProcessor(model, store, k=8, gate=True)
