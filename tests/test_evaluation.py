"""Perplexity evaluation: exact references, one score per token, Flat / IVF / IVF + recompute."""

from __future__ import annotations

import math

import pytest
import torch

from hf_knnlm import Datastore, Neighbours, evaluate_perplexity
from hf_knnlm.knnlm.mixture import interpolate, knn_target_log_probs
from hf_knnlm.knnlm.scored import collect_queries

WINDOWS = {"max_length": 64, "stride": 32, "batch_size": 4, "disable_progress": True}


def _tokens(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def ivf_stores(store_dir, tmp_path_factory):
    flat = Datastore.from_pretrained(store_dir)
    out = tmp_path_factory.mktemp("ivf")
    return {
        "ivf_flat": flat.rebuild_index("IVF4,Flat", out / "ivf_flat"),
        "ivf_pq": flat.rebuild_index("IVF4,PQ4", out / "ivf_pq"),
    }


def test_every_token_scored_once(model, tokenizer, other_text, store):
    n = len(_tokens(tokenizer, other_text))
    assert n > 3 * WINDOWS["max_length"]  # several windows
    result = evaluate_perplexity(model, tokenizer, [other_text], store, k=8, **WINDOWS)
    assert result["num_tokens"] == n - 1
    assert evaluate_perplexity(model, tokenizer, [other_text], None, **WINDOWS)["num_tokens"] == n - 1


def test_base_ppl_equals_one_forward_when_text_fits_a_window(model, tokenizer, other_text):
    ids = torch.tensor(_tokens(tokenizer, other_text)[:60])
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[1:]).item()
    text = tokenizer.decode(ids)
    assert _tokens(tokenizer, text) == ids.tolist()
    result = evaluate_perplexity(model, tokenizer, [text], None, **WINDOWS)
    assert result["num_tokens"] == 59 and result["knn_ppl"] is None
    assert result["base_ppl"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_knn_ppl_equals_direct_reference(model, tokenizer, other_text, store):
    """kNN-LM perplexity against a reference that searches the raw faiss index itself."""
    k, lmbda, temperature = 8, 0.3, 5.0
    queries = collect_queries(model, tokenizer, [other_text], store, **WINDOWS)
    distances, ids = store.index.search(queries.queries.numpy(), k)
    found = Neighbours(torch.from_numpy(distances), None, store.token_ids(ids))
    knn = knn_target_log_probs(found, queries.targets, temperature)
    mixed = interpolate(queries.lm_log_probs, knn, lmbda)
    expected = math.exp(-mixed.double().mean().item())
    result = evaluate_perplexity(
        model, tokenizer, [other_text], store, k=k, lmbda=lmbda, temperature=temperature, **WINDOWS
    )
    assert result["knn_ppl"] == pytest.approx(expected, rel=1e-5)
    assert result["base_ppl"] == pytest.approx(
        math.exp(-queries.lm_log_probs.double().mean().item()), rel=1e-6
    )


@pytest.mark.slow
def test_flat_ivf_and_recompute_are_selectable(model, tokenizer, other_text, store, ivf_stores):
    kwargs = dict(lmbda=0.4, temperature=3.0, **WINDOWS)
    full = len(store)  # every entry: the exact neighbour set whatever the index
    flat = evaluate_perplexity(model, tokenizer, [other_text], store, k=16, **kwargs)["knn_ppl"]
    ivf = ivf_stores["ivf_flat"]
    ivf.nprobe = 4  # all lists: exact
    assert evaluate_perplexity(model, tokenizer, [other_text], ivf, k=16, **kwargs)[
        "knn_ppl"
    ] == pytest.approx(flat, rel=1e-5)

    pq = ivf_stores["ivf_pq"]
    pq.nprobe = 4
    flat_all = evaluate_perplexity(model, tokenizer, [other_text], store, k=full, **kwargs)["knn_ppl"]
    approx = evaluate_perplexity(model, tokenizer, [other_text], pq, k=full, **kwargs)["knn_ppl"]
    exact = evaluate_perplexity(model, tokenizer, [other_text], pq, k=full, recompute_dists=True, **kwargs)[
        "knn_ppl"
    ]
    assert exact == pytest.approx(flat_all, rel=1e-5)
    assert abs(approx - flat_all) > 1e-4 * flat_all  # PQ distances really are approximate


def test_blocked_exact_recompute_equals_one_search(store, monkeypatch):
    from hf_knnlm.datastore import storage

    queries = torch.from_numpy(store.keys.take(list(range(0, 200, 3))).astype("float32")) + 0.01
    for recompute in (False, True):
        one = store.search(queries, 8, recompute)
        monkeypatch.setattr(storage, "_RECOMPUTE_ROWS", 8 * 5)  # blocks of 5 queries
        blocked = store.search(queries, 8, recompute)
        monkeypatch.undo()
        assert torch.equal(one.distances, blocked.distances) and torch.equal(one.token_ids, blocked.token_ids)


def test_bad_settings_raise(model, tokenizer, other_text, store):
    with pytest.raises(ValueError, match="lmbda"):
        evaluate_perplexity(model, tokenizer, [other_text], store, lmbda=1.5, **WINDOWS)
    with pytest.raises(ValueError, match="stride"):
        evaluate_perplexity(model, tokenizer, [other_text], store, max_length=64, stride=64, batch_size=4)
