"""On-disk format 2: an exact store keeps its keys once, values are memory-mapped, window settings
are recorded and used by evaluation, and stores written by format 1 still load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from hf_knnlm import Datastore, evaluate_perplexity
from hf_knnlm.datastore.config import FORMAT_VERSION, SINGLE_INDEX_FORMAT_VERSION
from hf_knnlm.utils.files import sha256_file


def _search(store: Datastore, queries: np.ndarray, k: int = 8):
    distances, ids = store.search_ids(queries, k)
    return distances.tolist(), ids.tolist()


def test_an_exact_store_keeps_one_copy_of_its_keys(store_dir, store):
    files = sorted(p.name for p in store_dir.iterdir() if p.is_file())
    assert "index.faiss" not in files and "index.faiss" not in store.config.files
    # Only a per-rank IVF build writes format 3; this store stays readable by a version-2 reader.
    assert store.config.format_version == SINGLE_INDEX_FORMAT_VERSION == 2 and FORMAT_VERSION == 3
    assert json.loads((store_dir / "datastore_config.json").read_text())["format_version"] == 2
    keys = store.keys.to_numpy()
    on_disk = sum(p.stat().st_size for p in store_dir.iterdir() if p.is_file())
    assert on_disk < 1.2 * keys.nbytes + 4 * len(store) + 64 * 1024  # keys, values, config and card
    # Exact all the same: a stored key is its own nearest neighbour at distance 0.
    rows = np.arange(0, len(store), 97)
    distances, ids = store.search_ids(keys[rows].astype(np.float32), 1)
    assert (distances[:, 0] == 0).all()
    np.testing.assert_array_equal(keys[ids[:, 0]], keys[rows])  # the row itself or an identical key


def test_a_format_1_store_with_its_fp32_index_still_loads(store_dir, store, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(store_dir, old)
    index = faiss.IndexFlatL2(store.key_dim)
    index.add(store.keys.to_numpy().astype(np.float32))
    faiss.write_index(index, str(old / "index.faiss"))
    path = old / "datastore_config.json"
    config = json.loads(path.read_text())
    config["format_version"] = 1
    config["files"]["index.faiss"] = sha256_file(old / "index.faiss")
    path.write_text(json.dumps(config))
    loaded = Datastore.from_pretrained(old)
    queries = store.keys.to_numpy()[::50].astype(np.float32) + 0.01
    assert _search(loaded, queries) == _search(store, queries)
    loaded.save_pretrained(tmp_path / "resaved")  # saving writes format 2: the fp32 copy is gone
    assert not (tmp_path / "resaved" / "index.faiss").exists()
    assert _search(Datastore.from_pretrained(tmp_path / "resaved"), queries) == _search(store, queries)


def test_a_newer_format_names_the_fix(store_dir, tmp_path):
    folder = tmp_path / "new"
    shutil.copytree(store_dir, folder)
    path = folder / "datastore_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": FORMAT_VERSION + 1}))
    newer = FORMAT_VERSION + 1
    with pytest.raises(
        ValueError,
        match=rf"format_version {newer} in datastore_config.json, newer than the {FORMAT_VERSION} .*"
        r"upgrade with `pip install -U hf-knnlm`",
    ):
        Datastore.from_pretrained(folder)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process memory map (Linux)")
def test_values_are_memory_mapped_int32(store_dir, store):
    assert all(isinstance(s, np.memmap) and s.dtype == np.int32 for s in store.values.shards)
    maps = Path("/proc/self/maps").read_text()
    assert str((store_dir / "values.safetensors").resolve()) in maps
    ids = np.array([[0, 5, -1]])
    token_ids = store.token_ids(ids)
    assert token_ids.dtype == torch.int64
    assert token_ids.tolist() == [[int(store.values[0]), int(store.values[5]), int(store.values[0])]]


@pytest.mark.slow
def test_evaluation_defaults_to_the_stores_windows(model, tokenizer, store, other_text):
    assert (store.config.max_length, store.config.stride) == (64, 32)
    default = evaluate_perplexity(model, tokenizer, [other_text], store, k=8, disable_progress=True)
    explicit = evaluate_perplexity(
        model, tokenizer, [other_text], store, k=8, max_length=64, stride=32, disable_progress=True
    )
    assert default == explicit
    other = evaluate_perplexity(
        model, tokenizer, [other_text], store, k=8, max_length=48, stride=16, disable_progress=True
    )
    assert other["base_ppl"] != default["base_ppl"]
