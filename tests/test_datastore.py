"""Building, searching, saving and resuming datastores."""

from __future__ import annotations

import json
import logging

import datasets
import numpy as np
import pytest
import torch

from hf_knnlm import Datastore, FFNInputCapture, IntegrityError
from hf_knnlm.datastore.progress import Progress

from .conftest import tiny_gpt2


def _tokens(tokenizer, text):
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_every_target_is_stored_once_with_its_next_token(store, tokenizer, corpus_text):
    tokens = _tokens(tokenizer, corpus_text)
    assert len(store) == len(tokens) - 1
    np.testing.assert_array_equal(store.values.to_numpy(), tokens[1:])
    assert store.keys.shape == (len(tokens) - 1, 32)
    assert store.config.num_entries == len(store)


def test_keys_are_the_ffn_inputs_of_the_first_window(store, model, tokenizer, corpus_text):
    tokens = torch.from_numpy(_tokens(tokenizer, corpus_text)[:64])[None]
    with FFNInputCapture(model) as capture, torch.no_grad():
        model(input_ids=tokens)
        hidden = capture.hidden_states(1)[0, :-1]
    expected = hidden.to(torch.float16).numpy()
    np.testing.assert_array_equal(store.keys.take(np.arange(63)), expected)


def test_stored_key_is_its_own_nearest_neighbour(store):
    ids = np.arange(0, len(store), 97)
    queries = torch.from_numpy(store.keys.take(ids).astype(np.float32))
    found = store.search(queries, k=3)
    distances, token_ids = found.distances, found.token_ids
    assert distances.dtype == torch.float32 and token_ids.dtype == torch.int64
    assert torch.all(distances[:, 0] == 0)
    _, nearest = store.search_ids(queries, k=1)
    np.testing.assert_array_equal(store.keys.take(nearest[:, 0]), store.keys.take(ids))


def test_large_indexes_take_faiss_blas_path_from_a_few_queries():
    import faiss

    from hf_knnlm.utils.faiss_support import BLAS_MIN_INDEX_SIZE, BLAS_MIN_QUERIES, use_blas_from

    use_blas_from(576, BLAS_MIN_INDEX_SIZE // 576 + 1)
    # Not faiss's own (1.15: 128,000, compared with queries x dimensions; before: 20 queries).
    assert faiss.cvar.distance_compute_blas_threshold in (BLAS_MIN_QUERIES * 576, BLAS_MIN_QUERIES)
    use_blas_from(576, 100)  # a small index: faiss's own choice, the same distances in any batch
    assert faiss.cvar.distance_compute_blas_threshold in (128_000, 20)


def test_save_load_round_trip_gives_identical_search(store, tmp_path):
    queries = torch.randn(7, store.hidden_size)
    expected = store.search(queries, k=5)
    store.save_pretrained(tmp_path / "copy", max_shard_size=32 * 2 * 500)
    loaded = Datastore.from_pretrained(tmp_path / "copy")
    assert len(loaded.config.shards) > 1
    assert (tmp_path / "copy" / f"keys-00001-of-{len(loaded.config.shards):05d}.safetensors").exists()
    got = loaded.search(queries, k=5)
    assert torch.equal(got.distances, expected.distances) and torch.equal(got.ids, expected.ids)


@pytest.mark.parametrize("mmap", [True, False])
def test_saved_ivf_store_searches_as_the_original(store, tmp_path, mmap):
    """A memory-mapped IVF index is saved from an in-RAM copy (faiss writes mapped lists as a dangling
    file reference, which crashed the next search)."""
    ivf = Datastore.from_pretrained(store.rebuild_index("IVF4,Flat", tmp_path / "ivf").folder, mmap=mmap)
    queries = torch.from_numpy(ivf.keys.take(np.arange(0, len(ivf), 41)).astype(np.float32)) + 0.05
    copy = Datastore.from_pretrained(ivf.save_pretrained(tmp_path / "copy"), nprobe=ivf.nprobe)
    a, b = ivf.search(queries, 8), copy.search(queries, 8)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.distances, b.distances)


def test_killed_build_resumes_to_the_same_store(model, tokenizer, corpus_text, tmp_path, monkeypatch):
    kwargs = dict(max_length=64, stride=32, batch_size=2, checkpoint_every=100, disable_progress=True)
    reference = Datastore.build(model, tokenizer, [corpus_text], tmp_path / "ref", **kwargs)

    original = Progress.add_chunk
    calls = {"n": 0}

    def dying_add_chunk(self, *args, **kw):
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        calls["n"] += 1
        return original(self, *args, **kw)

    monkeypatch.setattr(Progress, "add_chunk", dying_add_chunk)
    with pytest.raises(KeyboardInterrupt):
        Datastore.build(model, tokenizer, [corpus_text], tmp_path / "resumed", **kwargs)
    progress = json.loads((tmp_path / "resumed" / ".partial" / "progress.json").read_text())
    assert len(progress["chunks"]) == 3 and 0 < progress["windows_done"]
    monkeypatch.setattr(Progress, "add_chunk", original)

    forwards = {"n": 0}
    handle = model.register_forward_pre_hook(lambda *a: forwards.__setitem__("n", forwards["n"] + 1))
    try:
        resumed = Datastore.build(model, tokenizer, [corpus_text], tmp_path / "resumed", **kwargs)
    finally:
        handle.remove()
    total_batches = -(-len(list(_windows(tokenizer, corpus_text))) // 2)
    assert forwards["n"] < total_batches  # it did not start over
    np.testing.assert_array_equal(resumed.keys.to_numpy(), reference.keys.to_numpy())
    assert np.array_equal(resumed.values.to_numpy(), reference.values.to_numpy())
    q = torch.randn(4, 32)
    assert torch.equal(resumed.search(q, 8).token_ids, reference.search(q, 8).token_ids)
    assert not (tmp_path / "resumed" / ".partial").exists()


def _windows(tokenizer, text):
    from hf_knnlm.lm.windows import sliding_windows

    return sliding_windows(len(_tokens(tokenizer, text)), 64, 32)


def test_text_file_list_and_dataset_inputs_agree(model, tokenizer, other_text, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(other_text, encoding="utf-8")
    kwargs = dict(max_length=32, stride=16, disable_progress=True)
    from_file = Datastore.build(model, tokenizer, str(path), tmp_path / "a", **kwargs)
    from_list = Datastore.build(model, tokenizer, [other_text], tmp_path / "b", **kwargs)
    dataset = datasets.Dataset.from_dict({"body": [other_text]})
    from_ds = Datastore.build(model, tokenizer, dataset, tmp_path / "c", text_column="body", **kwargs)
    for other in (from_list, from_ds):
        assert np.array_equal(other.values.to_numpy(), from_file.values.to_numpy())
        np.testing.assert_array_equal(other.keys.to_numpy(), from_file.keys.to_numpy())


def test_ivfpq_with_exact_recompute(model, tokenizer, corpus_text, tmp_path):
    store = Datastore.build(
        model,
        tokenizer,
        [corpus_text],
        tmp_path / "ivf",
        max_length=64,
        stride=32,
        index_factory="IVF8,PQ4",
        disable_progress=True,
    )
    store.nprobe = 8
    keys = store.keys.to_numpy().astype(np.float32)
    queries = keys[:5] + 0.01
    distances, ids = store.search_ids(queries, k=4, recompute_dists=True)
    exact = ((keys[ids] - queries[:, None]) ** 2).sum(-1)
    np.testing.assert_allclose(distances, exact, rtol=1e-5)
    assert np.all(np.diff(distances, axis=1) >= 0)


def test_k_larger_than_store_is_clamped_with_warning(store, caplog):
    with caplog.at_level(logging.WARNING):
        distances = store.search(torch.randn(2, 32), k=len(store) + 10).distances
    assert distances.shape == (2, len(store))
    assert "larger than the datastore" in caplog.text


def test_empty_corpus_is_refused(model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        Datastore.build(
            model, tokenizer, [""], tmp_path / "empty", max_length=64, stride=32, disable_progress=True
        )


def test_existing_store_is_not_overwritten(store_dir, model, tokenizer, corpus_text):
    with pytest.raises(FileExistsError, match="overwrite=True"):
        Datastore.build(model, tokenizer, [corpus_text], store_dir, disable_progress=True)


def test_bad_window_settings_are_refused(model, tokenizer, corpus_text, tmp_path):
    with pytest.raises(ValueError, match="stride=64"):
        Datastore.build(model, tokenizer, [corpus_text], tmp_path / "x", max_length=64, stride=64)


def test_tampered_and_missing_files_are_refused_by_name(store, tmp_path):
    store.save_pretrained(tmp_path / "s")
    with open(tmp_path / "s" / "values.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(IntegrityError, match="values.safetensors"):
        Datastore.from_pretrained(tmp_path / "s")
    (tmp_path / "s" / "keys.safetensors").unlink()
    with pytest.raises(IntegrityError, match="keys.safetensors"):
        Datastore.from_pretrained(tmp_path / "s")


def test_model_mismatches_are_explained(store, tokenizer):
    import transformers
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    wider = tiny_gpt2(len(tokenizer), n_embd=48)
    with pytest.raises(ValueError, match="hidden size mismatch.*32.*48"):
        store.check_compatible(wider)
    other_vocab = tiny_gpt2(len(tokenizer) + 5)
    with pytest.raises(ValueError, match=f"vocab size mismatch.*{len(tokenizer)}.*{len(tokenizer) + 5}"):
        store.check_compatible(other_vocab)
    llama = transformers.AutoModelForCausalLM.from_config(
        LlamaConfig(
            num_hidden_layers=1,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
        )
    )
    with pytest.raises(ValueError, match="model_type mismatch.*'gpt2'.*'llama'"):
        store.check_compatible(llama)
    other_tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, "<unk>"))
    )
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        store.check_compatible(tiny_gpt2(len(tokenizer)), other_tok)
