"""Datastore files without a server: shards + index json, integrity, model card, recorded pushes."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

from hf_knnlm import Datastore, DatastoreConfig, IntegrityError
from hf_knnlm.commands import main as cli_main
from hf_knnlm.datastore.card import datastore_card
from hf_knnlm.datastore.shards import read_shard_index

ROW_BYTES = 32 * 2  # tiny_gpt2 keys: 32 float16 values


def _queries(store: Datastore, n: int = 6) -> torch.Tensor:
    # Real keys plus noise: neighbours are then unambiguous, so results must match exactly.
    rows = np.linspace(0, len(store) - 1, n).astype(np.int64)
    return torch.from_numpy(store.keys.take(rows).astype(np.float32)) + 0.01 * torch.randn(
        n, store.hidden_size, generator=torch.Generator().manual_seed(0)
    )


def _assert_same_search(a: Datastore, b: Datastore, k: int = 8) -> None:
    q = _queries(a)
    na, nb = a.search(q, k), b.search(q, k)
    assert torch.equal(na.token_ids, nb.token_ids) and torch.equal(na.distances, nb.distances)
    ia, ib = a.search_ids(q, k)[1], b.search_ids(q, k)[1]
    np.testing.assert_array_equal(ia, ib)


@pytest.fixture()
def sharded_dir(store, tmp_path) -> Path:
    out = tmp_path / "sharded"
    store.save_pretrained(out, max_shard_size=300 * ROW_BYTES)
    return out


# ------------------------------------------------------------------------------------------ shards
def test_tiny_shards_have_transformers_style_index(store, sharded_dir):
    n_shards = -(-len(store) // 300)
    assert n_shards > 3
    keys = sorted(p.name for p in sharded_dir.glob("keys-*.safetensors"))
    assert keys == [f"keys-{i:05d}-of-{n_shards:05d}.safetensors" for i in range(1, n_shards + 1)]
    assert not (sharded_dir / "keys.safetensors").exists()
    index = json.loads((sharded_dir / "keys.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == len(store) * ROW_BYTES
    assert index["metadata"]["num_rows"] == len(store)
    assert list(index["weight_map"].items())[:2] == [("keys[0:300]", keys[0]), ("keys[300:600]", keys[1])]
    values = read_shard_index(sharded_dir, "values", "values")
    last = f"values-{n_shards:05d}-of-{n_shards:05d}.safetensors"
    assert values[-1] == (last, (n_shards - 1) * 300, len(store))

    config = DatastoreConfig.load(sharded_dir / "datastore_config.json")
    assert "keys.safetensors.index.json" in config.files and "values.safetensors.index.json" in config.files
    assert "README.md" not in config.files and (sharded_dir / "README.md").is_file()
    # + entries.safetensors and documents.safetensors (provenance), copied with the store
    # (no index.faiss: an exact store rebuilds its index from the keys)
    assert len(config.files) == 2 * n_shards + 2 + 2


def test_sharded_store_reassembles_exactly(store, sharded_dir):
    sharded = Datastore.from_pretrained(sharded_dir)
    assert len(sharded.keys.shards) > 3
    np.testing.assert_array_equal(sharded.keys.to_numpy(), store.keys.to_numpy())
    assert np.array_equal(sharded.values.to_numpy(), store.values.to_numpy())
    rows = np.array([0, 299, 300, 301, len(store) - 1])
    np.testing.assert_array_equal(sharded.keys.take(rows), store.keys.to_numpy()[rows])
    _assert_same_search(store, sharded)
    q = _queries(store)
    exact = sharded.search(q, 8, recompute_dists=True)  # gathers keys across shard boundaries
    assert torch.equal(exact.distances, store.search(q, 8, recompute_dists=True).distances)


def test_store_without_index_json_loads_from_config_shards(store, sharded_dir):
    # Stores written before the index jsons existed list their shards in datastore_config.json only.
    config = DatastoreConfig.load(sharded_dir / "datastore_config.json")
    for name in ("keys.safetensors.index.json", "values.safetensors.index.json"):
        (sharded_dir / name).unlink()
        del config.files[name]
    config.save(sharded_dir / "datastore_config.json")
    old = Datastore.from_pretrained(sharded_dir)
    assert len(old.keys.shards) > 3
    _assert_same_search(store, old)


def test_loading_unpickles_nothing(sharded_dir, store, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    _assert_same_search(store, Datastore.from_pretrained(sharded_dir))


def test_resave_to_one_shard_drops_index_json(sharded_dir, store, tmp_path):
    one = tmp_path / "one"
    shutil.copytree(sharded_dir, one)
    Datastore.from_pretrained(one).save_pretrained(one, max_shard_size="5GB")
    assert not list(one.glob("*.index.json"))
    reloaded = Datastore.from_pretrained(one)
    assert len(reloaded.keys.shards) == 1 and "keys.safetensors" in reloaded.config.files
    _assert_same_search(store, reloaded)


def test_build_with_tiny_shards(model, tokenizer, corpus_text, store, tmp_path):
    built = Datastore.build(
        model,
        tokenizer,
        [corpus_text],
        tmp_path / "b",
        max_length=64,
        stride=32,
        batch_size=4,
        max_shard_size=1000 * ROW_BYTES,
        disable_progress=True,
    )
    assert (tmp_path / "b" / "keys.safetensors.index.json").is_file()
    assert len(Datastore.from_pretrained(tmp_path / "b").keys.shards) == -(-len(store) // 1000)
    _assert_same_search(store, built)


def _mapped_files() -> set[str]:
    return {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "/" in line}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process memory map (Linux)")
@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat", "IVF8,PQ8x4", "HNSW8"])
def test_index_and_keys_are_memory_mapped(model, tokenizer, corpus_text, tmp_path, factory):
    folder = tmp_path / factory.replace(",", "_")
    Datastore.build(
        model,
        tokenizer,
        [corpus_text[:6000]],
        folder,
        max_length=64,
        stride=32,
        batch_size=4,
        index_factory=factory,
        max_shard_size=400 * ROW_BYTES,
        disable_progress=True,
    )
    store = Datastore.from_pretrained(folder)
    mapped = _mapped_files()
    # An exact store keeps no index file (its index is rebuilt in RAM from the mapped keys).
    assert (str((folder / "index.faiss").resolve()) in mapped) == (factory != "Flat")
    assert {str((folder / s["keys"]).resolve()) for s in store.config.shards} <= mapped
    in_ram = Datastore.from_pretrained(folder, mmap=False)
    _assert_same_search(in_ram, store)


@pytest.mark.parametrize(
    "weight_map, why",
    [
        ({"keys[0:300]": "a.safetensors", "keys[301:600]": "b.safetensors"}, "where row 300 should start"),
        ({"keys[0:300]": "a.safetensors", "values[300:600]": "b.safetensors"}, "expected 'keys[start:end]'"),
        ({"keys[0:300]": "../a.safetensors", "keys[300:600]": "b.safetensors"}, "inside the datastore"),
        ({"keys[0:300]": "a.safetensors"}, "metadata.num_rows is 600"),
    ],
)
def test_bad_shard_index_is_refused_by_name(tmp_path, weight_map, why):
    (tmp_path / "keys.safetensors.index.json").write_text(
        json.dumps({"metadata": {"num_rows": 600, "total_size": 0}, "weight_map": weight_map})
    )
    with pytest.raises(IntegrityError, match="keys.safetensors.index.json") as err:
        read_shard_index(tmp_path, "keys", "keys")
    assert why in str(err.value)


# ------------------------------------------------------------------------------------------ integrity
def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "name",
    [
        "keys-00002-of-{n}.safetensors",
        "values-00001-of-{n}.safetensors",
        "values.safetensors.index.json",
        "keys.safetensors.index.json",
    ],
)
def test_modified_file_is_refused_by_name(sharded_dir, name, monkeypatch):
    n = len(list(sharded_dir.glob("keys-*.safetensors")))
    name = name.format(n=f"{n:05d}")
    _corrupt(sharded_dir / name)
    # Nothing may be read before the check: faiss and safetensors would fail on their own otherwise.
    monkeypatch.setattr(
        "hf_knnlm.datastore.rank_index.read_index", lambda *a, **k: pytest.fail("faiss read first")
    )
    monkeypatch.setattr(
        "hf_knnlm.datastore.datastore.open_memmap", lambda *a, **k: pytest.fail("tensors read first")
    )
    with pytest.raises(IntegrityError, match=f"'{name}'.*sha256"):
        Datastore.from_pretrained(sharded_dir)


def test_missing_file_is_refused_by_name(sharded_dir):
    (sharded_dir / "values.safetensors.index.json").unlink()
    with pytest.raises(IntegrityError, match="'values.safetensors.index.json' is missing"):
        Datastore.from_pretrained(sharded_dir)


def test_edited_readme_is_not_an_integrity_error(sharded_dir, store):
    (sharded_dir / "README.md").write_text("---\nlibrary_name: hf_knnlm\n---\nMy own card.\n")
    _assert_same_search(store, Datastore.from_pretrained(sharded_dir))


# ------------------------------------------------------------------------------------------ model card
def test_model_card_of_a_built_store(store_dir, store):
    card = ModelCard.load(store_dir / "README.md")
    assert card.data.library_name == "hf_knnlm"
    assert card.data.tags == ["knn-lm", "retrieval", "hf_knnlm"]
    # The tiny test model has no Hub id and the corpus is a list of strings: no Hub metadata for them.
    assert card.data.base_model is None and card.data.datasets is None
    assert f"| Entries | {len(store)} |" in card.text
    assert "| Key dimension | 32 (float16) |" in card.text
    assert "| faiss index | `Flat` (squared L2) |" in card.text
    assert "No evaluation was recorded" in card.text


def test_model_card_metadata_and_perplexities(store):
    config = DatastoreConfig.from_dict(
        {
            **store.config.to_dict(),
            "base_model": "openai-community/gpt2",
            "datasets": ["Salesforce/wikitext"],
            "evaluation": {"base_ppl": 29.417, "knn_ppl": 25.0312, "num_tokens": 4096, "k": 1024},
        }
    )
    card = datastore_card(config, repo_id="org/wikitext-gpt2-knn")
    assert card.data.base_model == "openai-community/gpt2"
    assert card.data.datasets == ["Salesforce/wikitext"]
    assert "| Perplexity, base model | 29.42 |" in card.text
    assert "| Perplexity, kNN-LM | 25.03 |" in card.text
    assert "| Tokens scored | 4096 |" in card.text
    assert 'Datastore.from_pretrained("org/wikitext-gpt2-knn")' in card.text
    assert 'KNNLMForCausalLM.from_pretrained("openai-community/gpt2", datastore=datastore' in card.text


@pytest.mark.parametrize("name", ["/tmp/models/gpt2", "../gpt2", "wiki.train.tokens", ""])
def test_paths_and_file_names_stay_out_of_card_metadata(store, name):
    fields = {"base_model": name, "datasets": [name, "texts"]}
    config = DatastoreConfig.from_dict({**store.config.to_dict(), **fields})
    card = datastore_card(config)
    assert card.data.base_model is None and card.data.datasets is None


# ------------------------------------------------------------------------------------------ push
def _uploads(api) -> list[dict]:
    return [kwargs for name, kwargs in api.calls if name == "upload_folder"]


def test_push_to_hub_is_one_commit_of_the_saved_files(store, hf_api, tmp_path):
    store.push_to_hub("org/wikitext-gpt2-knn", private=True, token="hf_x", max_shard_size=2000 * ROW_BYTES)
    names = [name for name, _ in hf_api.calls]
    assert names == ["__init__", "create_repo", "file_exists", "upload_folder"]
    assert hf_api.calls[0][1] == {"token": "hf_x"}
    assert hf_api.calls[1][1] == {
        "repo_id": "org/wikitext-gpt2-knn",
        "private": True,
        "exist_ok": True,
        "repo_type": "model",
    }
    (upload,) = _uploads(hf_api)
    assert upload["repo_id"] == "org/wikitext-gpt2-knn"
    assert upload["commit_message"] == "Upload kNN-LM datastore"
    assert upload["revision"] is None and upload["create_pr"] is False
    assert set(upload["delete_patterns"]) >= {"keys*.safetensors", "values*.safetensors"}
    files = upload["files"]
    n = -(-len(store) // 2000)
    config = json.loads(files["datastore_config.json"])
    assert set(files) == {*config["files"], "datastore_config.json", "README.md"}
    assert f"keys-00001-of-{n:05d}.safetensors" in files and "keys.safetensors.index.json" in files
    assert 'Datastore.from_pretrained("org/wikitext-gpt2-knn")' in files["README.md"].decode()

    # What was uploaded is a complete store that searches like the original.
    uploaded = tmp_path / "uploaded"
    uploaded.mkdir()
    for name, data in files.items():
        (uploaded / name).write_bytes(data)
    _assert_same_search(store, Datastore.from_pretrained(uploaded))


def test_pushed_card_reports_a_recorded_evaluation(store, hf_api):
    store.config.evaluation = {"base_ppl": 61.25, "knn_ppl": 48.5, "num_tokens": 2048}
    store.push_to_hub("org/name")
    readme = _uploads(hf_api)[0]["files"]["README.md"].decode()
    assert "| Perplexity, base model | 61.25 |" in readme and "| Perplexity, kNN-LM | 48.5 |" in readme


def test_push_keeps_the_remote_readme_and_creates_the_branch(store, hf_api):
    hf_api.remote_files = {"README.md"}
    store.push_to_hub("org/name", revision="v2", commit_message="New store")
    names = [name for name, _ in hf_api.calls]
    assert names == ["__init__", "create_repo", "create_branch", "file_exists", "upload_folder"]
    assert hf_api.calls[2][1] == {"repo_id": "org/name", "branch": "v2", "exist_ok": True}
    assert hf_api.calls[3][1]["revision"] == "v2"
    (upload,) = _uploads(hf_api)
    assert "README.md" not in upload["files"] and "datastore_config.json" in upload["files"]
    assert upload["revision"] == "v2" and upload["commit_message"] == "New store"


def test_cli_push(store_dir, store, hf_api, capsys):
    args = ["--revision", "dev", "--private", "--commit-message", "from cli", "--token", "hf_y"]
    code = cli_main(["push", str(store_dir), "org/cli-knn", *args, "--max-shard-size", str(3000 * ROW_BYTES)])
    assert code == 0
    assert "commit/0123" in capsys.readouterr().out
    (upload,) = _uploads(hf_api)
    assert upload["repo_id"] == "org/cli-knn" and upload["revision"] == "dev"
    assert upload["commit_message"] == "from cli"
    assert hf_api.calls[0][1] == {"token": "hf_y"}
    assert hf_api.calls[1][1]["private"] is True
    n = -(-len(store) // 3000)
    assert f"values-{n:05d}-of-{n:05d}.safetensors" in upload["files"]


def test_cli_push_of_a_folder_without_a_store_fails_cleanly(tmp_path, hf_api, capsys):
    assert cli_main(["push", str(tmp_path), "org/name"]) == 2
    assert "has no datastore_config.json" in capsys.readouterr().err
    assert cli_main(["push", "no-such-folder", "org/name"]) == 2
    assert "no-such-folder is not a folder" in capsys.readouterr().err
    assert not _uploads(hf_api)


def test_cli_push_refuses_a_corrupted_store(sharded_dir, hf_api, capsys):
    shard = sorted(sharded_dir.glob("keys-*.safetensors"))[0]
    _corrupt(shard)
    assert cli_main(["push", str(sharded_dir), "org/name"]) == 2
    assert f"'{shard.name}'" in capsys.readouterr().err
    assert not _uploads(hf_api)
