"""evaluate_perplexity: the exact references the kNN-LM must meet."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_knnlm import evaluate_perplexity


def _direct_base_ppl(model, tokenizer, text):
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    assert ids.shape[1] <= model.config.n_positions
    with torch.no_grad():
        return math.exp(model(input_ids=ids, labels=ids).loss.item()), ids.shape[1] - 1


def test_base_perplexity_matches_a_single_forward(model, tokenizer, other_text):
    expected, n = _direct_base_ppl(model, tokenizer, other_text[:400])
    result = evaluate_perplexity(
        model, tokenizer, [other_text[:400]], max_length=256, stride=128, disable_progress=True
    )
    assert result["num_tokens"] == n and result["knn_ppl"] is None
    assert result["base_ppl"] == pytest.approx(expected, rel=1e-5)


def test_datastore_on_the_evaluation_text_drives_perplexity_towards_one(model, store, tokenizer, corpus_text):
    result = evaluate_perplexity(
        model,
        tokenizer,
        [corpus_text],
        store,
        max_length=64,
        stride=32,
        k=8,
        lmbda=0.9,
        temperature=0.01,
        disable_progress=True,
    )
    assert result["num_tokens"] == len(store)
    assert result["base_ppl"] > 100  # a random model
    # Every target's own key is in the store at distance 0; lmbda=0.9 bounds perplexity below by 1/0.9.
    assert result["knn_ppl"] < 1.3


def test_lambda_zero_knn_perplexity_equals_base(model, store, tokenizer, other_text):
    result = evaluate_perplexity(
        model, tokenizer, [other_text], store, max_length=64, stride=32, k=8, lmbda=0.0, disable_progress=True
    )
    assert result["knn_ppl"] == pytest.approx(result["base_ppl"], rel=1e-9)


def test_batching_does_not_change_the_result(model, store, tokenizer, other_text):
    runs = [
        evaluate_perplexity(
            model,
            tokenizer,
            [other_text],
            store,
            max_length=48,
            stride=16,
            k=8,
            lmbda=0.5,
            batch_size=b,
            disable_progress=True,
        )
        for b in (1, 5)
    ]
    assert runs[0]["num_tokens"] == runs[1]["num_tokens"]
    np.testing.assert_allclose(runs[0]["knn_ppl"], runs[1]["knn_ppl"], rtol=1e-4)
