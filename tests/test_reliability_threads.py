"""What is documented as safe from several threads is safe under stress: 8 threads on one model, a
switch interval of a microsecond, each call adding and removing its own FFN-input hook."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from hf_knnlm import FFNInputCapture, KNNLMForCausalLM, explain_generation

PROMPTS = ["The king", "A merchant sells the", "My lord fears", "The river crosses our old"] * 2
ROUNDS = 6


@pytest.fixture()
def stress():
    """Switch threads as often as the interpreter allows while the test runs."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def _in_threads(call, items):
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(call, items))


def test_explain_generation_from_8_threads_on_one_model(model, tokenizer, store, stress):
    def explain(p):
        return [a.token for a in explain_generation(model, tokenizer, store, p, k=8, max_new_tokens=4)[0]]

    serial = [explain(p) for p in PROMPTS]
    for _ in range(ROUNDS):
        assert _in_threads(explain, PROMPTS) == serial


def test_the_wrapper_forward_from_8_threads_on_one_model(model, tokenizer, store, stress):
    wrapper = KNNLMForCausalLM.from_pretrained(model, datastore=store, k=8, lmbda=0.5)
    inputs = [tokenizer(p, return_tensors="pt") for p in PROMPTS]
    with torch.no_grad():
        serial = [wrapper(**x).logits for x in inputs]
        for _ in range(ROUNDS):
            for expected, got in zip(serial, _in_threads(lambda x: wrapper(**x).logits, inputs), strict=True):
                assert torch.equal(expected, got)


def test_a_capture_added_or_removed_while_other_threads_run_the_model(model, stress):
    """The window torch leaves between adding a hook and marking it ``with_kwargs`` (and between removing
    it and unmarking it): a forward pass in another thread may call the hook without ``kwargs``."""
    capture = FFNInputCapture(model)
    try:
        capture._hook(model.transformer.h[-1].mlp, (torch.zeros(1, 2, model.config.n_embd),))
        assert capture.captured.shape == (1, 2, model.config.n_embd)
    finally:
        capture.remove()
