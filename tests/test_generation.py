"""KNNProcessor and KNNLMForCausalLM against the base model and p_kNN references."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import LogitsProcessorList

from hf_knnlm import KNNLMForCausalLM, KNNProcessor, knn_log_probs

PROMPT = "The king sees the bridge. A knight"


def _inputs(tokenizer, texts=(PROMPT,)):
    tokenizer.padding_side = "left"
    return tokenizer(list(texts), return_tensors="pt", padding=True)


def _base_last_log_probs(model, inputs):
    with torch.no_grad():
        return torch.log_softmax(model(**inputs).logits[:, -1].float(), -1)


def _knn_reference(model, store, inputs, k, temperature):
    from hf_knnlm import FFNInputCapture

    with FFNInputCapture(model) as capture, torch.no_grad():
        model(**inputs)
        query = capture.hidden_states(inputs["input_ids"].shape[0])[:, -1]
    return knn_log_probs(store.search(query, k), store.vocab_size, temperature)


def test_processor_lambda_zero_is_the_base_model(model, store, tokenizer):
    inputs = _inputs(tokenizer, [PROMPT, "My lord"])
    with KNNProcessor(model, store, k=8, lmbda=0.0) as processor, torch.no_grad():
        logits = model(**inputs).logits[:, -1]
        scores = processor(inputs["input_ids"], logits)
    torch.testing.assert_close(scores, _base_last_log_probs(model, inputs), atol=1e-5, rtol=0)
    # Log-probs in, log-probs out: normalising twice changes nothing.
    with KNNProcessor(model, store, k=8, lmbda=0.0) as processor, torch.no_grad():
        model(**inputs)
        again = processor(inputs["input_ids"], torch.log_softmax(logits, -1))
    torch.testing.assert_close(again, scores, atol=1e-5, rtol=0)


def test_processor_lambda_one_is_pknn_and_does_not_mutate(model, store, tokenizer):
    inputs = _inputs(tokenizer)
    with KNNProcessor(model, store, k=8, lmbda=1.0, temperature=3.0) as processor, torch.no_grad():
        logits = model(**inputs).logits[:, -1]
        before = logits.clone()
        scores = processor(inputs["input_ids"], logits)
    assert torch.equal(logits, before)
    expected = _knn_reference(model, store, inputs, 8, 3.0)
    assert torch.equal(scores, expected)


def test_greedy_generate_with_lambda_zero_equals_plain_generate(model, store, tokenizer):
    inputs = _inputs(tokenizer, [PROMPT, "My lord"])
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    plain = model.generate(**inputs, **kwargs)
    with KNNProcessor(model, store, k=16, lmbda=0.0) as processor:
        mixed = model.generate(**inputs, logits_processor=LogitsProcessorList([processor]), **kwargs)
    assert torch.equal(plain, mixed)


def test_greedy_generate_with_lambda_one_follows_the_datastore(model, store, tokenizer, corpus_text):
    # A datastore built on the corpus, with lambda=1 and k=1, continues a corpus prefix verbatim.
    ids = tokenizer(corpus_text, return_tensors="pt")["input_ids"][:, :20]
    with KNNProcessor(model, store, k=1, lmbda=1.0) as processor:
        out = model.generate(
            ids,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            logits_processor=LogitsProcessorList([processor]),
        )
    expected = tokenizer(corpus_text, return_tensors="pt")["input_ids"][:, :26]
    assert torch.equal(out, expected)


@pytest.mark.parametrize("mode", [dict(do_sample=True, top_k=20), dict(num_beams=3, do_sample=False)])
def test_sampling_and_beam_search_run_with_knn(model, store, tokenizer, mode):
    inputs = _inputs(tokenizer, [PROMPT, "My lord"])
    torch.manual_seed(0)
    with KNNProcessor(model, store, k=16, lmbda=0.5) as processor:
        out = model.generate(
            **inputs,
            max_new_tokens=5,
            pad_token_id=tokenizer.pad_token_id,
            logits_processor=LogitsProcessorList([processor]),
            **mode,
        )
    assert out.shape == (2, inputs["input_ids"].shape[1] + 5)


def test_processor_accepts_a_path_and_validates(model, store_dir):
    processor = KNNProcessor(model, store_dir, k=4)
    processor.remove()
    with pytest.raises(ValueError, match="lmbda=2"):
        KNNProcessor(model, store_dir, lmbda=2)


def test_wrapper_lambda_zero_reproduces_base_logprobs_and_loss(model, store, tokenizer):
    inputs = _inputs(tokenizer, [PROMPT, "My lord sees"])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    wrapper = KNNLMForCausalLM.from_pretrained(model, datastore=store, k=8, lmbda=0.0)
    with torch.no_grad():
        out = wrapper(**inputs, labels=labels)
        base = model(**inputs, labels=labels)
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(
        out.logits[mask], torch.log_softmax(base.logits.float(), -1)[mask], atol=1e-5, rtol=0
    )
    torch.testing.assert_close(out.loss, base.loss, atol=1e-5, rtol=0)


def test_wrapper_lambda_one_and_loss_definition(model, store, tokenizer):
    inputs = _inputs(tokenizer)
    wrapper = KNNLMForCausalLM.from_pretrained(model, datastore=store, k=8, lmbda=1.0, temperature=2.0)
    with torch.no_grad():
        out = wrapper(**inputs, labels=inputs["input_ids"])
    assert torch.equal(out.logits[:, -1], _knn_reference(model, store, inputs, 8, 2.0))
    expected_loss = F.nll_loss(out.logits[0, :-1], inputs["input_ids"][0, 1:])
    torch.testing.assert_close(out.loss, expected_loss)


def test_wrapper_generate_mixes_and_passes_attributes_through(model, store, tokenizer):
    inputs = _inputs(tokenizer)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    wrapper = KNNLMForCausalLM.from_pretrained(model, datastore=store, k=16, lmbda=0.0)
    assert torch.equal(wrapper.generate(**inputs, **kwargs), model.generate(**inputs, **kwargs))
    assert wrapper.get_input_embeddings() is model.get_input_embeddings()
    assert wrapper.generation_config is model.generation_config


def test_wrapper_save_load_writes_no_base_weights(model, store, tokenizer, tmp_path):
    model.save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    wrapper = KNNLMForCausalLM.from_pretrained(base, datastore=store, k=8, lmbda=0.4, temperature=2.0)
    wrapper.save_pretrained(tmp_path / "knnlm", save_datastore=True)
    saved = sorted(p.name for p in (tmp_path / "knnlm").iterdir())
    assert saved == ["config.json", "datastore"]
    config = json.loads((tmp_path / "knnlm" / "config.json").read_text())
    assert config["model_type"] == "knnlm" and config["settings"]["lmbda"] == 0.4
    assert config["datastore"] is None and config["datastore_subfolder"] == "datastore"
    loaded = KNNLMForCausalLM.from_pretrained(tmp_path / "knnlm")
    assert loaded.settings == wrapper.settings
    inputs = _inputs(tokenizer)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, wrapper(**inputs).logits)
    overridden = KNNLMForCausalLM.from_pretrained(tmp_path / "knnlm", lmbda=0.1)
    assert overridden.settings.lmbda == 0.1 and overridden.settings.k == 8


def test_wrapper_refuses_bad_settings_and_missing_datastore(model, store):
    with pytest.raises(ValueError, match="k=0"):
        KNNLMForCausalLM.from_pretrained(model, datastore=store, k=0)
    with pytest.raises(ValueError, match="temperature=0"):
        KNNLMForCausalLM.from_pretrained(model, datastore=store, temperature=0.0)
    with pytest.raises(ValueError, match="datastore=None"):
        KNNLMForCausalLM.from_pretrained(model)
