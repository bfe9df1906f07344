"""The de-quantized copy of a local GGUF checkpoint: written once, then loaded instead of the GGUF file.

transformers' GGUF loader is replaced by one that counts its calls and returns the tiny model (a real
GGUF file needs the ``gguf`` package and real weights); everything after it is the real path.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from hf_knnlm.lm import gguf_cache, loading


class _CountingAuto:
    """``from_pretrained`` that answers GGUF loads itself and passes every other load to transformers."""

    def __init__(self, real, answer):
        self.real, self.answer, self.gguf_loads = real, answer, 0

    def from_pretrained(self, name_or_path, **kwargs):
        if kwargs.pop("gguf_file", None):
            self.gguf_loads += 1
            return self.answer()
        kwargs.pop("revision", None)
        return self.real.from_pretrained(name_or_path, **kwargs)


@pytest.fixture
def gguf_folder(tmp_path, monkeypatch, model, tokenizer):
    folder = tmp_path / "gguf-model"
    folder.mkdir()
    (folder / "tiny.Q4_1.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 8)

    def quantized_model():
        m = copy.deepcopy(model)
        m.config.quantization_config = {"quant_method": "gguf"}  # what transformers' GGUF loader sets
        return m

    models = _CountingAuto(transformers.AutoModelForCausalLM, quantized_model)
    tokenizers = _CountingAuto(transformers.AutoTokenizer, lambda: tokenizer)
    monkeypatch.setattr(loading, "AutoModelForCausalLM", models)
    monkeypatch.setattr(loading, "AutoTokenizer", tokenizers)
    monkeypatch.setenv("HF_KNNLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_KNNLM_GGUF_CACHE", raising=False)
    return folder, models, tokenizers


def _logits(m, ids):
    with torch.no_grad():
        return m(ids).logits


def test_second_load_reads_the_copy_and_gives_the_same_logits(gguf_folder, model, tokenizer):
    folder, models, tokenizers = gguf_folder
    first, first_tok = loading.load_model_and_tokenizer(folder, gguf_file="tiny.Q4_1.gguf")
    second, second_tok = loading.load_model_and_tokenizer(folder, gguf_file="tiny.Q4_1.gguf")
    assert (models.gguf_loads, tokenizers.gguf_loads) == (1, 1)  # the second load never opened the GGUF file
    ids = torch.tensor([tokenizer("The king sees the bridge.").input_ids])
    assert torch.equal(_logits(first, ids), _logits(second, ids))
    assert second_tok("The king sees the bridge.").input_ids == ids[0].tolist()
    assert second.config._name_or_path == str(folder)  # what a store records as its base model
    assert not hasattr(second.config, "quantization_config")
    assert first.config.quantization_config == {"quant_method": "gguf"}  # the caller's model is untouched


def test_the_copy_is_keyed_by_the_gguf_content(gguf_folder):
    folder, models, _ = gguf_folder
    loading.load_model_and_tokenizer(folder, gguf_file="tiny.Q4_1.gguf")
    with open(folder / "tiny.Q4_1.gguf", "ab") as f:  # a new file under the old name
        f.write(b"more")
    loading.load_model_and_tokenizer(folder, gguf_file="tiny.Q4_1.gguf")
    assert models.gguf_loads == 2


def test_a_failed_write_leaves_no_copy_and_the_load_still_succeeds(gguf_folder, monkeypatch):
    folder, models, _ = gguf_folder

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf_cache, "save_model", disk_full)
    loaded, _ = loading.load_model_and_tokenizer(folder, gguf_file="tiny.Q4_1.gguf")
    assert loaded is not None
    path = gguf_cache.local_gguf_path(folder, "tiny.Q4_1.gguf")
    cache = gguf_cache.cache_folder(path, "auto")
    assert gguf_cache.cached_copy(cache) is None and not cache.exists()
    assert [p.name for p in cache.parent.iterdir()] == []  # no temporary folder or lock left behind


@pytest.mark.parametrize("switch", ["0", "off"])
def test_the_cache_can_be_turned_off(gguf_folder, monkeypatch, switch):
    folder, models, _ = gguf_folder
    monkeypatch.setenv("HF_KNNLM_GGUF_CACHE", switch)
    for _ in range(2):
        loading.load_model_and_tokenizer(folder, gguf_file="tiny.Q4_1.gguf")
    assert models.gguf_loads == 2
    assert gguf_cache.gguf_cache_root() is None


def test_a_separate_tokenizer_is_not_cached_and_still_used(gguf_folder, saved_model):
    folder, models, tokenizers = gguf_folder
    for _ in range(2):
        loading.load_model_and_tokenizer(folder, gguf_file="tiny.Q4_1.gguf", tokenizer=str(saved_model))
    assert (models.gguf_loads, tokenizers.gguf_loads) == (1, 0)
    path = gguf_cache.local_gguf_path(folder, "tiny.Q4_1.gguf")
    assert not gguf_cache.has_tokenizer(gguf_cache.cache_folder(path, "auto"))
