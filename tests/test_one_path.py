"""One p_kNN path: every public way of scoring a text gives the same kNN-LM log-probs, on a plain, a
pruned (merge counts) and a PCA-compressed store.

The reference is computed once per store from the public pieces (the queries of one forward pass,
``Datastore.search``, ``mix_targets``); each entry point must reproduce it to 1e-5: evaluate_perplexity,
the tuning sweep's point, the wrapper's loss and logits, the processor's scores at every step, the
kNN-LM rows of evaluate_retrieval_perplexity (alone and mixed into In-Context RALM) and the attribution.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_knnlm import (
    FFNInputCapture,
    KNNLMForCausalLM,
    KNNProcessor,
    KNNSettings,
    compress_datastore,
    evaluate_perplexity,
    evaluate_retrieval_perplexity,
)
from hf_knnlm.knnlm.attribution import attribute_step
from hf_knnlm.knnlm.mixture import mix_targets
from hf_knnlm.knnlm.scored import collect_queries
from hf_knnlm.knnlm.tuning import build_tuning_cache, sweep
from hf_knnlm.rag.prefix import DocumentTokens

SETTINGS = KNNSettings(k=16, lmbda=0.4, temperature=3.0)
WINDOWS = dict(max_length=64, stride=32, batch_size=4)  # the text below fits one window
PASSAGE = "The old queen remembers the northern road."


class OnePassage:
    """A retriever that always returns passage 0."""

    titles, texts = [""], [PASSAGE]

    def __len__(self) -> int:
        return 1

    def search(self, queries, k):
        return np.ones((len(queries), 1), np.float32), np.zeros((len(queries), 1), np.int64)


@pytest.fixture(scope="module", params=["plain", "pruned", "pca"])
def any_store(request, store_dir, tmp_path_factory):
    from hf_knnlm import Datastore

    plain = Datastore.from_pretrained(store_dir)
    out = tmp_path_factory.mktemp(request.param)
    compressions = {"plain": None, "pruned": dict(prune_to=0.5), "pca": dict(pca_dim=16)}
    if compressions[request.param] is None:
        return plain
    store = compress_datastore(plain, out / "store", **compressions[request.param])
    assert (store.provenance.log_counts(torch.arange(4)) is not None) == (request.param == "pruned")
    return store


@pytest.fixture(scope="module")
def text(tokenizer, other_text) -> str:
    ids = tokenizer(other_text, add_special_tokens=False)["input_ids"][:40]
    return tokenizer.decode(ids)


def _reference(model, tokenizer, text, store) -> torch.Tensor:
    scored = collect_queries(model, tokenizer, [text], store, disable_progress=True, **WINDOWS)
    found = store.search(scored.queries, SETTINGS.k)
    return mix_targets(found, scored.lm_log_probs, scored.targets, SETTINGS)


def _ppl(log_probs: torch.Tensor) -> float:
    return math.exp(-log_probs.double().mean().item())


def test_evaluation_tuning_and_wrapper_score_as_the_reference(model, tokenizer, text, any_store):
    reference = _reference(model, tokenizer, text, any_store)
    result = evaluate_perplexity(
        model, tokenizer, [text], any_store, settings=SETTINGS, disable_progress=True, **WINDOWS
    )
    assert result.knn_ppl == pytest.approx(_ppl(reference), rel=1e-5)
    cache = build_tuning_cache(
        model, tokenizer, [text], any_store, k=SETTINGS.k, disable_progress=True, **WINDOWS
    )
    (point,) = sweep(cache, [SETTINGS.lmbda], [SETTINGS.temperature], [SETTINGS.k])
    assert point.knn_ppl == pytest.approx(_ppl(reference), rel=1e-5)

    wrapper = KNNLMForCausalLM.from_pretrained(model, datastore=any_store, settings=SETTINGS)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = wrapper(input_ids=ids, labels=ids)
    per_token = out.logits[0, :-1].gather(-1, ids[0, 1:, None]).squeeze(-1)
    torch.testing.assert_close(per_token, reference, rtol=1e-5, atol=1e-5)
    assert out.loss.item() == pytest.approx(-reference.double().mean().item(), rel=1e-5)


def test_processor_and_attribution_score_as_the_reference(model, tokenizer, text, any_store):
    reference = _reference(model, tokenizer, text, any_store)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with KNNProcessor(model, any_store, settings=SETTINGS) as knn, torch.no_grad():
        for t in range(1, ids.shape[1]):
            logits = model(input_ids=ids[:, :t]).logits[:, -1]
            scores = knn(ids[:, :t], logits)
            assert scores[0, ids[0, t]].item() == pytest.approx(reference[t - 1].item(), abs=1e-5)
    with FFNInputCapture(model, any_store.config.hook_module) as capture, torch.no_grad():
        lm = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        queries = capture.hidden_states(1)[0]
    for t in (3, 17, ids.shape[1] - 1):
        found = any_store.search(queries[t - 1 : t], SETTINGS.k)
        token = int(ids[0, t])
        step = attribute_step(any_store, tokenizer, found, token, float(lm[t - 1, token]), SETTINGS)
        assert math.log(step.prob) == pytest.approx(reference[t - 1].item(), abs=1e-5)


def test_retrieval_perplexity_mixes_the_knn_lm_as_everywhere(model, tokenizer, text, any_store):
    reference = _reference(model, tokenizer, text, any_store)
    empty = OnePassage()
    empty.search = lambda queries, k: (
        np.zeros((len(queries), 1), np.float32),
        -np.ones((len(queries), 1), np.int64),
    )
    alone = evaluate_retrieval_perplexity(
        model, tokenizer, [text], empty, datastore=any_store, knn=SETTINGS, disable_progress=True, **WINDOWS
    )
    assert alone.knn_ppl == pytest.approx(_ppl(reference), rel=1e-5)
    assert alone.knn_ralm_ppl == alone.knn_ppl  # nothing retrieved: the kNN-LM alone

    # With a passage read before the window: the kNN query is the FFN input of that prefixed pass.
    result = evaluate_retrieval_perplexity(
        model, tokenizer, [text], OnePassage(), datastore=any_store, knn=SETTINGS, retrieval_stride=None,
        disable_progress=True, **WINDOWS,
    )  # fmt: skip
    passage = DocumentTokens(tokenizer, OnePassage())(0)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    row = torch.tensor([passage + ids])
    with FFNInputCapture(model, any_store.config.hook_module) as capture, torch.no_grad():
        lm = torch.log_softmax(model(input_ids=row).logits[0].float(), -1)
        hidden = capture.hidden_states(1)[0]
    at = torch.arange(len(passage), len(passage) + len(ids) - 1)  # positions predicting ids[1:]
    targets = torch.tensor(ids[1:])
    ralm = lm[at].gather(-1, targets[:, None]).squeeze(-1)
    expected = mix_targets(any_store.search(hidden[at], SETTINGS.k), ralm, targets, SETTINGS)
    assert result.ppl == pytest.approx(_ppl(ralm), rel=1e-5)
    assert result.knn_ralm_ppl == pytest.approx(_ppl(expected), rel=1e-5)
