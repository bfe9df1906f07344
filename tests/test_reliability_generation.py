"""No silent wrong results at generation time: decoding modes, threads, models, tokenizers, settings."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList

from hf_knnlm import KNNLMForCausalLM, KNNProcessor, evaluate_perplexity

try:  # tests/ is a package on main, a plain folder elsewhere
    from tests.reliability_utils import gpt2_with_layers, other_tokenizer
except ImportError:
    from reliability_utils import gpt2_with_layers, other_tokenizer

PROMPTS = ["The king", "A merchant sells the", "My lord fears", "The river crosses our old"]


def _generate(model, tokenizer, prompt, processors, **kwargs):
    inputs = tokenizer(prompt, return_tensors="pt")
    settings = dict(max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return model.generate(
        **inputs, logits_processor=LogitsProcessorList(processors), **{**settings, **kwargs}
    )


class _Interleave:
    """Sleeps (releasing the GIL) between the FFN hook and the LM head, so that threads interleave there."""

    def __init__(self, model):
        self.handle = model.lm_head.register_forward_hook(lambda *_: time.sleep(0.002))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("shared", [True, False], ids=["one-processor", "processor-per-thread"])
def test_four_threads_generate_what_serial_runs_generate(model, store, tokenizer, shared):
    processors = [KNNProcessor(model, store, k=8, lmbda=0.9) for _ in range(1 if shared else len(PROMPTS))]
    pick = (lambda i: processors[0]) if shared else (lambda i: processors[i])
    try:
        serial = [_generate(model, tokenizer, p, [pick(i)]) for i, p in enumerate(PROMPTS)]
        with _Interleave(model), ThreadPoolExecutor(len(PROMPTS)) as pool:
            threaded = list(pool.map(lambda i: _generate(model, tokenizer, PROMPTS[i], [pick(i)]), range(4)))
    finally:
        for processor in processors:
            processor.remove()
    for expected, got in zip(serial, threaded, strict=True):
        assert torch.equal(expected, got)


def test_the_wrapper_from_four_threads_scores_what_serial_runs_score(model, store, tokenizer):
    wrapper = KNNLMForCausalLM.from_pretrained(model, datastore=store, k=8, lmbda=0.5)
    inputs = [tokenizer(p, return_tensors="pt") for p in PROMPTS]
    with torch.no_grad():
        serial = [wrapper(**x).logits for x in inputs]
        with _Interleave(model), ThreadPoolExecutor(len(PROMPTS)) as pool:
            threaded = list(pool.map(lambda x: wrapper(**x).logits, inputs))
    for expected, got in zip(serial, threaded, strict=True):
        assert torch.equal(expected, got)


def test_assisted_and_prompt_lookup_decoding_are_refused(model, store, tokenizer):
    prompt = "the king sees the king sees the king sees the king sees the"
    assistant = gpt2_with_layers(len(tokenizer), 1, seed=3)
    with KNNProcessor(model, store, k=8) as processor:
        with pytest.raises(ValueError, match="decoding"):
            _generate(model, tokenizer, prompt, [processor], prompt_lookup_num_tokens=3)
        with pytest.raises(ValueError, match="decoding"):
            _generate(model, tokenizer, prompt, [processor], assistant_model=assistant)
        # The supported modes still run afterwards with the same processor.
        _generate(model, tokenizer, prompt, [processor])
        _generate(model, tokenizer, prompt, [processor], num_beams=2)


def test_scores_for_other_rows_than_the_forward_pass_are_refused(model, store, tokenizer):
    """Contrastive search scores k candidates per row in one forward pass; a row-count mismatch is refused."""
    tokenizer.padding_side = "left"
    inputs = tokenizer(["The king", "A knight", "My lord", "The fool"], return_tensors="pt", padding=True)
    with KNNProcessor(model, store, k=8) as processor, torch.no_grad():
        logits = model(**inputs).logits[:, -1]
        with pytest.raises(ValueError, match="rows"):
            processor(inputs["input_ids"][:2], logits[:2])


def test_a_deeper_model_of_the_same_width_is_refused(store, tokenizer, corpus_text):
    assert store.config.num_hidden_layers == 2
    deeper = gpt2_with_layers(len(tokenizer), 4)
    with pytest.raises(ValueError, match="2 layers.*4|4 layers.*2"):
        KNNProcessor(deeper, store)
    with pytest.raises(ValueError, match="layers"):
        KNNLMForCausalLM.from_pretrained(deeper, datastore=store)
    with pytest.raises(ValueError, match="layers"):
        evaluate_perplexity(deeper, tokenizer, [corpus_text[:300]], store, max_length=64, stride=32)


def test_another_tokenizer_with_the_same_vocab_size_is_refused(model, store, tokenizer):
    other = other_tokenizer(len(tokenizer))
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        KNNProcessor(model, store, tokenizer=other)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        KNNLMForCausalLM.from_pretrained(model, datastore=store, tokenizer=other)
    KNNProcessor(model, store, k=4, tokenizer=tokenizer).remove()
    KNNLMForCausalLM.from_pretrained(model, datastore=store, tokenizer=tokenizer)


def test_wrapper_honours_settings_changed_after_generate(model, store, tokenizer):
    wrapper = KNNLMForCausalLM.from_pretrained(model, datastore=store, k=8, lmbda=0.0)
    reference = KNNLMForCausalLM.from_pretrained(model, datastore=store, k=8, lmbda=1.0)
    inputs = tokenizer("The king", return_tensors="pt")
    base = _generate(wrapper, tokenizer, "The king", [])
    expected = _generate(reference, tokenizer, "The king", [])
    assert not torch.equal(base, expected)

    wrapper.config.lmbda = 1.0
    assert torch.equal(_generate(wrapper, tokenizer, "The king", []), expected)
    with torch.no_grad():
        assert torch.equal(wrapper(**inputs).logits, reference(**inputs).logits)

    wrapper.settings.lmbda = 0.0
    assert wrapper.config.settings.lmbda == 0.0
    assert torch.equal(_generate(wrapper, tokenizer, "The king", []), base)
    with pytest.raises(ValueError, match=r"\blmbda="):
        wrapper.settings.lmbda = -1.0
    with pytest.raises(ValueError, match=r"\bk="):
        wrapper.config.k = 0  # refused at once, not at the next generate


def test_nprobe_changes_during_searches_are_safe(store, tmp_path):
    ivf = store.rebuild_index("IVF16,Flat", tmp_path / "ivf")
    rows = np.arange(0, len(ivf), 25)
    queries = torch.from_numpy(ivf.keys.take(rows).astype(np.float32))
    queries += 0.5 * torch.randn(queries.shape, generator=torch.Generator().manual_seed(0))
    ivf.nprobe = 1
    narrow = ivf.search(queries, 16).distances
    ivf.nprobe = 16
    wide = ivf.search(queries, 16).distances
    assert not torch.equal(narrow, wide)

    stop = threading.Event()

    def flip() -> None:
        i = 0
        while not stop.is_set():
            ivf.nprobe = 1 if i % 2 else 16
            i += 1
            time.sleep(0)  # let the searching thread run

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        for _ in range(100):
            distances = ivf.search(queries, 16).distances
            assert torch.equal(distances, narrow) or torch.equal(distances, wide)
    finally:
        stop.set()
        flipper.join()
