"""In-Context RALM / REPLUG perplexity with the passage KV cache against the same rows recomputed whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_knnlm.lm.windows import Window, WindowSettings, sliding_windows
from hf_knnlm.rag import RetrievalSettings, evaluate_retrieval_perplexity
from hf_knnlm.rag.passage_cache import supports
from hf_knnlm.rag.perplexity import _plan, _retrieve
from hf_knnlm.rag.prefixed_rows import Row, blocks_of, extends, plan_rows, run_rows
from hf_knnlm.retrieval.retriever import document_text

WINDOWS = dict(max_length=48, stride=16, batch_size=4, disable_progress=True)
PASSAGES = [f"Passage {i}: the {w} of the north sells {i} crowns." for i, w in enumerate("abcdefghij" * 5)]


class CountingRetriever:
    """Query ``j`` of a search gets passages ``(j + s) % len`` for slot ``s``: neighbours differ."""

    def __init__(self, repeat: int = 1, texts=PASSAGES) -> None:
        self.titles, self.texts = [""] * len(texts), list(texts)
        self.repeat = repeat  # consecutive queries that get the same passages

    def __len__(self) -> int:
        return len(self.texts)

    def search(self, queries, k):
        j = np.arange(len(queries))[:, None] // self.repeat + np.arange(k)[None]
        return np.ones((len(queries), k), np.float32) * np.arange(k, 0, -1), j % len(self.texts)


class SameRetriever(CountingRetriever):
    def search(self, queries, k):
        return np.ones((len(queries), k), np.float32), np.tile(np.arange(k), (len(queries), 1))


def tiny_decoder(config_class, vocab_size: int, **extra):
    """A 2-layer random decoder with rotary positions and grouped KV heads (Llama, Mistral)."""
    torch.manual_seed(0)
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
    config = config_class(
        num_hidden_layers=2, vocab_size=vocab_size, max_position_embeddings=256, **sizes, **extra
    )
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_llama(vocab_size: int):
    return tiny_decoder(LlamaConfig, vocab_size, pad_token_id=1)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm(request, model, tokenizer):
    return model if request.param == "gpt2" else tiny_llama(len(tokenizer))


def _log_probs(lm, tokenizer, text, retriever, reuse_cache: bool, row_batch_size=3, **settings):
    retrieval = RetrievalSettings(reuse_cache=reuse_cache, query_length=8, **settings)
    windows = WindowSettings(max_length=WINDOWS["max_length"], stride=WINDOWS["stride"])
    plan = _plan(lm, tokenizer, [text], None, retrieval, None, windows, "text", None)
    doc_ids, _ = _retrieve(tokenizer, retriever, plan, {})
    return run_rows(lm, tokenizer, retriever, plan, doc_ids, None, row_batch_size, True)


@pytest.mark.parametrize("stride", [1, 3, 4, None])
@pytest.mark.parametrize("num_documents, repeat", [(1, 1), (1, 3), (2, 2)])
def test_cache_on_equals_cache_off(lm, tokenizer, other_text, stride, num_documents, repeat):
    assert supports(lm)
    retriever = CountingRetriever(repeat)
    run = dict(retrieval_stride=stride, num_documents=num_documents)
    on = _log_probs(lm, tokenizer, other_text[:400], retriever, True, **run)
    off = _log_probs(lm, tokenizer, other_text[:400], retriever, False, **run)
    assert on.reused_cache and not off.reused_cache
    scored = torch.isfinite(off.log_probs)
    assert scored.sum() > 50 and torch.equal(scored, torch.isfinite(on.log_probs))
    torch.testing.assert_close(on.log_probs[scored], off.log_probs[scored], rtol=0, atol=1e-5)
    assert on.stride_hit_rate == off.stride_hit_rate and off.passage_hit_rate == 0.0


def test_batching_does_not_change_cached_log_probs(lm, tokenizer, other_text):
    one = _log_probs(lm, tokenizer, other_text[:400], CountingRetriever(2), True, 1, retrieval_stride=3)
    many = _log_probs(lm, tokenizer, other_text[:400], CountingRetriever(2), True, 5, retrieval_stride=3)
    scored = torch.isfinite(one.log_probs)
    torch.testing.assert_close(one.log_probs[scored], many.log_probs[scored], rtol=0, atol=1e-5)


def test_hit_rates(model, tokenizer, other_text):
    text = other_text[:400]
    every_new = evaluate_retrieval_perplexity(model, tokenizer, [text], CountingRetriever(), **WINDOWS)
    assert every_new["stride_hit_rate"] == 0.0
    same = evaluate_retrieval_perplexity(model, tokenizer, [text], SameRetriever(), **WINDOWS)
    # One row per window: every stride but a window's first extends it; every window but the first
    # reads the passage's KV from the cache.
    windows = list(sliding_windows(same["num_tokens"] + 1, WINDOWS["max_length"], WINDOWS["stride"]))
    strides = len(blocks_of(windows, 4))
    assert same["stride_hit_rate"] == pytest.approx((strides - len(windows)) / strides)
    assert same["passage_hit_rate"] == pytest.approx((len(windows) - 1) / len(windows))
    passage = tokenizer(document_text("", PASSAGES[0]), add_special_tokens=False)["input_ids"]
    assert same["forward_tokens"] == same["context_tokens"] + len(passage)  # the passage ran once
    off = evaluate_retrieval_perplexity(
        model, tokenizer, [text], SameRetriever(), reuse_cache=False, **WINDOWS
    )
    assert off["passage_hit_rate"] == 0.0 and off["stride_hit_rate"] == same["stride_hit_rate"]
    assert off["ppl"] == pytest.approx(same["ppl"], rel=1e-5)
    assert off["forward_tokens"] > same["forward_tokens"]  # each window recomputed the passage


def test_knn_ralm_cache_on_equals_off(model, tokenizer, other_text, store):
    run = dict(datastore=store, k=8, lmbda=0.3, retrieval_stride=3, **WINDOWS)
    on = evaluate_retrieval_perplexity(model, tokenizer, [other_text[:300]], CountingRetriever(2), **run)
    off = evaluate_retrieval_perplexity(
        model, tokenizer, [other_text[:300]], CountingRetriever(2), reuse_cache=False, **run
    )
    assert on["passage_hit_rate"] >= 0.0 and off["passage_hit_rate"] == 0.0
    for key in ("ppl", "knn_ppl", "knn_ralm_ppl"):
        assert on[key] == pytest.approx(off[key], rel=1e-5), key


def test_a_stride_extends_a_row_only_with_its_exact_prefix():
    window, later = Window(0, 48, 1), Window(16, 64, 48)
    row = Row(window, doc=3, end=9, first_target=5, uses=[])
    assert extends(row, window, 3)
    assert not extends(row, window, 4)  # another passage
    assert not extends(row, later, 3)  # the next window's context starts later: no prefix
    blocks = [(0, 1, 5), (0, 5, 9), (0, 9, 13), (1, 48, 52)]
    rows = plan_rows([window, later], blocks, np.array([[3], [4], [3], [3]]))
    assert [(r.window.begin, r.doc, r.end, r.uses) for r in rows] == [
        (0, 3, 13, [(0, 0), (2, 0)]),  # the third stride extends the first's row past the second's
        (0, 4, 9, [(1, 0)]),
        (16, 3, 52, [(3, 0)]),
    ]


def test_reuse_cache_setting_is_validated():
    assert RetrievalSettings().reuse_cache is True
    assert RetrievalSettings.__dataclass_fields__["reuse_cache"].metadata["help"]
    with pytest.raises(ValueError, match="reuse_cache='no' must be True or False"):
        RetrievalSettings(reuse_cache="no")


def test_a_sliding_window_model_is_recomputed_whole(tokenizer, other_text):
    from transformers import MistralConfig

    mistral = tiny_decoder(MistralConfig, len(tokenizer), sliding_window=16)
    assert not supports(mistral)  # a left-padded prefix would shift its windows
    out = _log_probs(mistral, tokenizer, other_text[:200], CountingRetriever(2), True, retrieval_stride=4)
    assert not out.reused_cache and out.passage_hit_rate == 0.0
    assert torch.isfinite(out.log_probs).sum() > 20
