"""RetoMaton: pointers follow the corpus; a threshold above k is plain kNN-LM exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList

from hf_knnlm import Datastore, KNNLMForCausalLM, KNNProcessor, evaluate_perplexity
from hf_knnlm.retomaton import RetoMaton, stream_neighbours

WINDOWS = dict(max_length=64, stride=32, batch_size=4, disable_progress=True)


def test_pointers_are_the_next_corpus_entry(store):
    automaton = RetoMaton(store, threshold=1, k=8)
    values = store.values.to_numpy()
    ids = np.array([0, 10, len(store) - 1])
    # Every entry predicted its own value; its successor is the entry built at that token.
    for i in ids:
        expected = [] if i == len(store) - 1 else [i + 1]
        assert automaton.pointers(np.array([i]), int(values[i])).tolist() == expected
        assert automaton.pointers(np.array([i]), int(values[i]) + 1).tolist() == []


def test_threshold_above_k_is_plain_knnlm_exactly(model, tokenizer, store, other_text):
    settings = dict(k=8, lmbda=0.3, temperature=5.0, **WINDOWS)
    plain = evaluate_perplexity(model, tokenizer, [other_text], store, **settings)
    reto = evaluate_perplexity(model, tokenizer, [other_text], store, retomaton=9, **settings)
    assert reto["knn_ppl"] == plain["knn_ppl"]
    assert reto["searches"] == reto["steps"] == plain["num_tokens"] and reto["searches_saved"] == 0.0


def test_on_its_own_corpus_pointers_replace_most_searches(model, tokenizer, store, corpus_text):
    settings = dict(k=8, lmbda=0.5, temperature=1.0, max_tokens=400, **WINDOWS)
    plain = evaluate_perplexity(model, tokenizer, [corpus_text], store, **settings)
    reto = evaluate_perplexity(model, tokenizer, [corpus_text], store, retomaton=1, **settings)
    # The text is the store: the nearest entry is the position itself and its pointer is never wrong.
    assert reto["searches_saved"] > 0.9
    # ...and following the text itself is at least as good as searching for it.
    assert reto["knn_ppl"] <= plain["knn_ppl"] < plain["base_ppl"]


def test_precomputed_search_gives_the_online_result(store):
    torch.manual_seed(0)
    queries = torch.from_numpy(store.keys.take(np.arange(40, 70)).astype(np.float32))
    prev = [None] + store.values[39:69].tolist()
    online = stream_neighbours(RetoMaton(store, 2, 8), queries, prev)
    cached = store.search_entries(queries, 8)
    offline = stream_neighbours(RetoMaton(store, 2, 8), queries, prev, precomputed=cached)
    assert torch.equal(online.ids, offline.ids) and torch.equal(online.distances, offline.distances)


def test_processor_with_threshold_above_k_generates_like_plain(model, tokenizer, store):
    inputs = tokenizer("The king sees", return_tensors="pt")
    kwargs = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    outs = []
    for extra in ({}, {"retomaton": 9}):
        with KNNProcessor(model, store, k=8, lmbda=0.5, temperature=5.0, **extra) as knn:
            outs.append(model.generate(**inputs, logits_processor=LogitsProcessorList([knn]), **kwargs))
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for a, b in zip(outs[0].scores, outs[1].scores, strict=True):
        assert torch.equal(a, b)


def test_processor_follows_pointers_in_beam_search(model, tokenizer, store, corpus_text):
    prompt = corpus_text[:60]
    inputs = tokenizer(prompt, return_tensors="pt")
    with KNNProcessor(model, store, k=8, lmbda=0.9, temperature=1.0, retomaton=1) as knn:
        model.generate(
            **inputs,
            max_new_tokens=10,
            num_beams=3,
            do_sample=False,
            logits_processor=LogitsProcessorList([knn]),
        )
        stats = knn.retrieval.stats()
    assert stats["steps"] == 30 and 0 < stats["searches"] < stats["steps"]


def test_wrapper_threshold_above_k_equals_plain(model, tokenizer, store):
    ids = tokenizer(["the old queen fears the market"], return_tensors="pt")
    plain = KNNLMForCausalLM.from_pretrained(model, datastore=store, k=8, lmbda=0.4, temperature=5.0)
    reto = KNNLMForCausalLM.from_pretrained(
        model, datastore=store, k=8, lmbda=0.4, temperature=5.0, retomaton=9
    )
    a = plain(**ids, labels=ids["input_ids"])
    b = reto(**ids, labels=ids["input_ids"])
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    assert reto.retrieval_stats["searches_saved"] == 0.0


def test_bad_threshold_is_refused(store):
    with pytest.raises(ValueError, match="threshold=0"):
        RetoMaton(store, threshold=0, k=8)


def test_old_store_without_entries_file_still_follows_pointers(store_dir, tmp_path):
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(store_dir, old)
    config = json.loads((old / "datastore_config.json").read_text())
    for name in ("entries.safetensors", "documents.safetensors"):
        config["files"].pop(name)
        (old / name).unlink()
    (old / "datastore_config.json").write_text(json.dumps(config))
    store = Datastore.from_pretrained(old)
    assert store.provenance.positions is None and store.provenance.documents is None
    assert RetoMaton(store, 1, 4).pointers(np.array([3]), int(store.values[3])).tolist() == [4]
