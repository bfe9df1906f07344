"""LM log-probs from the LM head's input, never the whole [windows x positions x vocab] logits.

The head path must equal the model's own forward (log_softmax of its logits) at every scored position;
a model whose logits are more than its head's output (Gemma-2's final soft-cap) is detected on its first
window and scored with the full forward, still exactly.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config

from hf_knnlm.lm import log_probs as head_module
from hf_knnlm.lm.forward import iter_window_batches
from hf_knnlm.lm.windows import sliding_windows


def _reference(model, tokens, windows):
    """log p(target) of every scored target from the model's full logits, one window at a time."""
    out = []
    with torch.no_grad():
        for w in windows:
            ids = torch.from_numpy(tokens[w.begin : w.end].astype(np.int64))[None]
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            t = np.arange(w.first_target, w.end)
            out.append(log_probs[t - 1 - w.begin, torch.from_numpy(tokens[t].astype(np.int64))])
    return torch.cat(out)


def _scored(model, tokens, windows, **kwargs):
    batches = list(iter_window_batches(model, tokens, windows, batch_size=3, with_log_probs=True, **kwargs))
    return batches, torch.cat([b.lm_log_probs for b in batches])


def _tokens(n: int, vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(2, vocab, n).astype(np.int32)


def test_head_path_equals_the_full_forward(model):
    model = copy.deepcopy(model)
    tokens = _tokens(300, model.config.vocab_size)
    windows = list(sliding_windows(len(tokens), 64, 32))
    _, ours = _scored(model, tokens, windows)
    torch.testing.assert_close(ours, _reference(model, tokens, windows), atol=1e-5, rtol=1e-5)
    assert head_module._CHECKED[model] is True  # the head path was used


def test_features_see_the_whole_distribution(model):
    tokens = _tokens(200, model.config.vocab_size)
    windows = list(sliding_windows(len(tokens), 64, 32))
    entropy = lambda lp: -(lp.exp() * lp).sum(-1, keepdim=True)  # noqa: E731
    batches, _ = _scored(model, tokens, windows, lm_features=entropy)
    features = torch.cat([b.lm_features for b in batches])
    with torch.no_grad():
        w = windows[0]
        ids = torch.from_numpy(tokens[w.begin : w.end].astype(np.int64))[None]
        full = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)[: w.end - w.begin - 1]
    torch.testing.assert_close(features[: len(full)], entropy(full), atol=1e-4, rtol=1e-4)


def test_no_batch_holds_the_logits_of_every_position(model, monkeypatch):
    """The forward stops before the head: at most one chunk of [rows x vocab] logits at a time."""
    model = copy.deepcopy(model)
    monkeypatch.setattr(head_module, "_ROWS_PER_CHUNK", 16)
    shapes = []
    head = model.get_output_embeddings()
    original = head.forward
    head.forward = lambda x: shapes.append(tuple(x.shape)) or original(x)
    tokens = _tokens(300, model.config.vocab_size)
    windows = list(sliding_windows(len(tokens), 64, 32))
    _scored(model, tokens, windows[:1])  # the once-per-model check runs the full forward on 32 tokens
    assert (1, 32, model.config.n_embd) in shapes
    shapes.clear()
    _scored(model, tokens, windows)
    assert shapes and all(len(s) == 2 and s[0] <= 16 for s in shapes)  # [rows, hidden] chunks only


def test_a_soft_capped_model_is_detected_and_scored_exactly(caplog):
    torch.manual_seed(0)
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    heads = {"num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 128}
    config = Gemma2Config(vocab_size=97, final_logit_softcapping=0.5, **sizes, **heads)  # logits tanh-capped
    capped = AutoModelForCausalLM.from_config(config).eval()
    tokens = _tokens(200, 97)
    windows = list(sliding_windows(len(tokens), 64, 32))
    with caplog.at_level(logging.WARNING, logger=head_module.__name__):
        _, ours = _scored(capped, tokens, windows)
    assert head_module._CHECKED[capped] is False
    assert "soft-cap" in caplog.text
    torch.testing.assert_close(ours, _reference(capped, tokens, windows), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [0, 1, 600])
def test_scored_log_probs_in_chunks_equal_one_log_softmax(rows):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden, targets = torch.randn(rows, 8), torch.randint(0, 50, (rows,))
    picked, _ = head_module.scored_log_probs(head, hidden, targets)
    expected = torch.log_softmax(head(hidden), -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(picked, expected)


def test_a_model_without_output_embeddings_is_scored_by_its_full_forward(model):
    headless = copy.deepcopy(model)
    headless.get_output_embeddings = lambda: None  # e.g. a model whose logits come from elsewhere
    tokens = _tokens(200, model.config.vocab_size)
    windows = list(sliding_windows(len(tokens), 64, 32))
    _, ours = _scored(headless, tokens, windows)
    torch.testing.assert_close(ours, _reference(model, tokens, windows), atol=1e-5, rtol=1e-5)
