"""Bad input gets one clear error naming the argument (or file, row, field) and the fix."""

from __future__ import annotations

import json
import math
import shutil

import datasets
import pytest
import torch

from hf_knnlm import Datastore, KNNLMForCausalLM, KNNProcessor, evaluate_perplexity

try:  # tests/ is a package on main, a plain folder elsewhere
    from tests.reliability_utils import drop_file_hashes
except ImportError:
    from reliability_utils import drop_file_hashes

BUILD = dict(max_length=64, stride=32, disable_progress=True)

BAD_KNN_ARGS = [
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"k": True}, "k"),
    ({"k": 2.5}, "k"),
    ({"lmbda": "0.5"}, "lmbda"),
    ({"lmbda": math.nan}, "lmbda"),
    ({"recompute_dists": "no"}, "recompute_dists"),
]


@pytest.mark.parametrize("kwargs,name", BAD_KNN_ARGS)
def test_knn_settings_are_refused_by_name(model, tokenizer, store, corpus_text, kwargs, name):
    pattern = rf"\b{name}="
    with pytest.raises(ValueError, match=pattern):
        KNNProcessor(model, store, **kwargs)
    with pytest.raises(ValueError, match=pattern):
        KNNLMForCausalLM.from_pretrained(model, datastore=store, **kwargs)
    with pytest.raises(ValueError, match=pattern):
        evaluate_perplexity(model, tokenizer, [corpus_text[:200]], store, **BUILD, **kwargs)


def test_a_settings_change_is_validated_too(model, store):
    processor = KNNProcessor(model, store, k=4)
    with pytest.raises(ValueError, match=r"\blmbda="):
        processor.settings.lmbda = 2.0
    processor.remove()


def test_search_refuses_queries_of_the_wrong_width(store):
    with pytest.raises(ValueError, match="64.*32|32.*64"):
        store.search(torch.randn(2, 64), k=3)
    with pytest.raises(ValueError, match="32"):
        store.search(torch.randn(3, 16), k=3)
    with pytest.raises(ValueError, match=r"\bk="):
        store.search(torch.randn(2, 32), k=True)


@pytest.mark.parametrize("data", [["", "", ""], [" ", "\n\n"]], ids=["empty", "blank"])
def test_a_corpus_without_text_is_refused(model, tokenizer, tmp_path, data):
    with pytest.raises(ValueError, match="empty"):
        Datastore.build(model, tokenizer, data, tmp_path / "store", **BUILD)
    assert not (tmp_path / "store").exists()


def test_none_rows_and_non_utf8_files_are_named(model, tokenizer, tmp_path):
    rows = datasets.Dataset.from_dict({"text": ["The king sees.", None, "A knight."]})
    with pytest.raises(ValueError, match=r"row 1.*'text'|'text'.*row 1"):
        Datastore.build(model, tokenizer, rows, tmp_path / "a", **BUILD)
    with pytest.raises(ValueError, match=r"data\[1\]"):
        Datastore.build(model, tokenizer, ["The king sees.", None], tmp_path / "b", **BUILD)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("The king sees the river caf\u00e9.".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt.*UTF-8"):
        Datastore.build(model, tokenizer, bad, tmp_path / "c", **BUILD)


@pytest.mark.parametrize(
    "edit,field",
    [
        (lambda c: c.update(hidden_size="abc"), "hidden_size"),
        (lambda c: c.pop("vocab_size"), "vocab_size"),
        (lambda c: c.update(shards="keys.safetensors"), "shards"),
    ],
    ids=["wrong-type", "missing", "not-a-list"],
)
def test_malformed_config_names_the_file_and_field(store_dir, tmp_path, edit, field):
    folder = tmp_path / "store"
    shutil.copytree(store_dir, folder)
    path = folder / "datastore_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"datastore_config\.json.*\b{field}\b"):
        Datastore.from_pretrained(folder)


def test_a_config_without_file_hashes_needs_verify_false(store_dir, tmp_path):
    folder = tmp_path / "store"
    shutil.copytree(store_dir, folder)
    path = folder / "datastore_config.json"
    config = drop_file_hashes(path)
    with pytest.raises(ValueError, match="verify=False"):
        Datastore.from_pretrained(folder)
    assert len(Datastore.from_pretrained(folder, verify=False)) > 0
    # A hash list that leaves out a file the loader reads is no check either.
    files = {name: digest for name, digest in config["files"].items() if not name.startswith("keys")}
    path.write_text(json.dumps({**config, "files": files}))
    with pytest.raises(ValueError, match="verify=False"):
        Datastore.from_pretrained(folder)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1}, "max_tokens"),
        ({"max_length": 1000, "stride": 32}, "max_length"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_evaluate_edge_cases_are_refused_by_name(model, tokenizer, store, corpus_text, kwargs, name):
    settings = {**BUILD, **kwargs}
    with pytest.raises(ValueError, match=rf"\b{name}="):
        evaluate_perplexity(model, tokenizer, [corpus_text[:2000]], store, k=4, **settings)


def test_build_edge_cases_are_refused_by_name(model, tokenizer, corpus_text, tmp_path):
    with pytest.raises(ValueError, match=r"\bmax_length=.*256"):
        Datastore.build(model, tokenizer, [corpus_text], tmp_path / "a", max_length=512, stride=256)
    with pytest.raises(ValueError, match=r"\bbatch_size="):
        Datastore.build(model, tokenizer, [corpus_text], tmp_path / "b", **BUILD, batch_size=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"max_shard_size": 0}, "max_shard_size"),
        ({"max_shard_size": "0"}, "max_shard_size"),
        ({"max_shard_size": True}, "max_shard_size"),
        ({"overwrite": 1}, "overwrite"),
    ],
)
def test_build_sizes_and_flags_are_refused_before_the_model_runs(
    model, tokenizer, corpus_text, tmp_path, kwargs, name
):
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ValueError, match=rf"\b{name}="):
            Datastore.build(model, tokenizer, [corpus_text], tmp_path / "s", **BUILD, **kwargs)
    finally:
        handle.remove()
    assert calls == [] and not (tmp_path / "s").exists()


def test_nprobe_must_be_positive(store_dir, store):
    with pytest.raises(ValueError, match=r"\bnprobe="):
        Datastore.from_pretrained(store_dir, nprobe=0)
    with pytest.raises(ValueError, match=r"\bnprobe="):
        store.nprobe = -1


@pytest.mark.parametrize("hook_module", ["transformer.wte", "transformer.h.1.mlp.c_proj"])
def test_a_hook_module_that_is_not_an_ffn_input_is_refused(
    model, tokenizer, corpus_text, tmp_path, hook_module
):
    with pytest.raises(ValueError, match=rf"hook_module='{hook_module}'"):
        Datastore.build(model, tokenizer, [corpus_text], tmp_path / "s", **BUILD, hook_module=hook_module)


def test_a_text_passed_where_a_path_goes_is_named_short(model, tokenizer, tmp_path):
    text = "The cat sat on the mat.\n" * 400  # a str is a path: the text itself is far too long a file name
    with pytest.raises(ValueError, match=r"is not a file.*\[text\]") as caught:
        Datastore.build(model, tokenizer, text, tmp_path / "store", **BUILD)
    assert len(str(caught.value)) < 300
