"""Nothing already written is lost: validate first, write beside, swap when complete, one writer at a time."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from hf_knnlm import Datastore
from hf_knnlm.commands import main as cli_main
from hf_knnlm.utils.files import atomic_write_bytes

try:  # tests/ is a package on main, a plain folder elsewhere
    from tests.conftest import tiny_gpt2
except ImportError:
    from conftest import tiny_gpt2

BUILD = dict(max_length=64, stride=32, disable_progress=True)


def _digests(folder: Path) -> dict[str, str]:
    """sha256 of every file of a store (the hidden work folders of a build are not part of it)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }


def _num_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.fixture()
def old_store(store_dir, tmp_path) -> Path:
    folder = tmp_path / "store"
    shutil.copytree(store_dir, folder)
    return folder


@pytest.mark.parametrize(
    "data,factory", [(["", ""], "Flat"), (None, "NotAnIndex"), (None, "IVF999999,Flat")], ids=str
)
def test_an_overwrite_that_cannot_succeed_keeps_the_old_store(
    old_store, model, tokenizer, other_text, data, factory
):
    before = _digests(old_store)
    with pytest.raises(ValueError):
        Datastore.build(
            model, tokenizer, data or [other_text], old_store, overwrite=True, index_factory=factory, **BUILD
        )
    assert _digests(old_store) == before
    assert len(Datastore.from_pretrained(old_store)) > 0


def test_an_interrupted_overwrite_keeps_the_old_store_and_resumes(old_store, model, tokenizer, other_text):
    before = _digests(old_store)
    kwargs = dict(overwrite=True, batch_size=1, checkpoint_every=40, **BUILD)
    calls = {"n": 0}

    def die(*_):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed")

    handle = model.register_forward_pre_hook(die)
    try:
        with pytest.raises(KeyboardInterrupt):
            Datastore.build(model, tokenizer, [other_text], old_store, **kwargs)
    finally:
        handle.remove()
    assert _digests(old_store) == before
    assert len(Datastore.from_pretrained(old_store)) > 0
    resumed = Datastore.build(model, tokenizer, [other_text], old_store, **kwargs)
    assert len(resumed) == _num_tokens(tokenizer, other_text) - 1
    reference = Datastore.build(model, tokenizer, [other_text], old_store.parent / "ref", **BUILD)
    assert resumed.config.files == reference.config.files  # byte-identical to an uninterrupted build


def test_reindex_overwrite_that_cannot_succeed_keeps_the_old_copy(store, tmp_path):
    target = tmp_path / "copy"
    store.rebuild_index("Flat", target)
    before = _digests(target)
    with pytest.raises(ValueError):
        store.rebuild_index("NotAnIndex", target, overwrite=True)
    with pytest.raises(ValueError):
        store.rebuild_index("IVF999999,Flat", target, overwrite=True)
    assert _digests(target) == before
    assert len(Datastore.from_pretrained(target)) == len(store)


class _DiskFull:
    """Files larger than ``limit`` bytes cannot be written (EFBIG), as on a disk that fills up."""

    def __init__(self, limit: int):
        self.limit = limit

    def __enter__(self):
        self.old_limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        self.old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.old_limits[1]))
        return self

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_FSIZE, self.old_limits)
        signal.signal(signal.SIGXFSZ, self.old_handler)


def test_a_save_that_fails_midway_leaves_the_old_store(store, model, tokenizer, other_text, tmp_path):
    small = Datastore.build(model, tokenizer, [other_text], tmp_path / "small", **BUILD)
    sizes = sorted(p.stat().st_size for p in (tmp_path / "small").iterdir() if p.is_file())
    dest = tmp_path / "dest"
    store.save_pretrained(dest)
    (dest / "notes.txt").write_text("a file of the user's, beside the store")
    before = _digests(dest)
    siblings = sorted(p.name for p in tmp_path.iterdir())
    with _DiskFull(sizes[-1] - 1), pytest.raises((OSError, RuntimeError)):
        small.save_pretrained(dest)  # every file but the largest fits
    assert _digests(dest) == before
    assert len(Datastore.from_pretrained(dest)) == len(store)
    assert sorted(p.name for p in tmp_path.iterdir()) == siblings  # no temporary folder left behind
    small.save_pretrained(dest)
    assert len(Datastore.from_pretrained(dest)) == len(small)
    assert (dest / "notes.txt").exists()  # a save replaces the store's files, not the user's


def test_a_second_build_into_the_same_folder_fails_with_one_line(
    model, tokenizer, corpus_text, other_text, saved_model, tmp_path, capsys
):
    saved = saved_model
    corpus = tmp_path / "other.txt"
    corpus.write_text(other_text, encoding="utf-8")
    out = tmp_path / "store"

    first_model = tiny_gpt2(len(tokenizer))
    entered, release = threading.Event(), threading.Event()

    def block(*_):
        entered.set()
        release.wait(60)

    handle = first_model.register_forward_pre_hook(block)
    result = {}

    def first_build():
        try:
            result["store"] = Datastore.build(first_model, tokenizer, [corpus_text], out, **BUILD)
        except BaseException as err:  # reported by the assertion below
            result["error"] = err

    builder = threading.Thread(target=first_build)
    builder.start()
    try:
        assert entered.wait(60)
        with pytest.raises(RuntimeError, match="being written"):
            Datastore.build(model, tokenizer, [other_text], out, **BUILD)
        capsys.readouterr()
        argv = ["build", "--model", str(saved), "--data", str(corpus), "--output", str(out)]
        assert cli_main([*argv, "--max-length", "64", "--stride", "32"]) != 0
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert [line for line in err.splitlines() if "error" in line] == [
            line for line in err.splitlines() if "being written" in line
        ]
        assert len([line for line in err.splitlines() if "being written" in line]) == 1
    finally:
        release.set()
        builder.join(120)
        handle.remove()
    assert "error" not in result, result.get("error")
    loaded = Datastore.from_pretrained(out)
    assert len(loaded) == _num_tokens(tokenizer, corpus_text) - 1  # only the first build's rows
    np.testing.assert_array_equal(loaded.values.to_numpy(), result["store"].values.to_numpy())


_KILLED_BUILD = """
import json, os, signal, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
from hf_knnlm import Datastore
from hf_knnlm.commands import main as cli_main

model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
calls = [0]

def kill_at_the_sixth_forward(*_):
    calls[0] += 1
    if calls[0] == 6:
        os.kill(os.getpid(), signal.SIGKILL)

model.register_forward_pre_hook(kill_at_the_sixth_forward)
Datastore.build(model, tokenizer, sys.argv[2], sys.argv[3], **json.loads(sys.argv[4]))
"""


def test_a_build_killed_with_sigkill_resumes_to_the_same_bytes(saved_model, other_text, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(other_text, encoding="utf-8")
    out = tmp_path / "store"
    kwargs = dict(max_length=64, stride=32, batch_size=1, checkpoint_every=40, disable_progress=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-c", _KILLED_BUILD, str(saved_model), str(corpus), str(out), json.dumps(kwargs)]
    killed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    progress = json.loads((out / ".partial" / "progress.json").read_text())
    assert progress["chunks"] and not (out / "datastore_config.json").exists()
    assert (tmp_path / ".store.lock").exists()  # left by the killed build; the kernel released its lock

    model = AutoModelForCausalLM.from_pretrained(saved_model)
    tokenizer = AutoTokenizer.from_pretrained(saved_model)
    forwards = {"n": 0}
    handle = model.register_forward_pre_hook(lambda *a: forwards.__setitem__("n", forwards["n"] + 1))
    try:
        resumed = Datastore.build(
            model, tokenizer, corpus, out, **kwargs
        )  # the lock file left is no obstacle
    finally:
        handle.remove()
    reference = Datastore.build(model, tokenizer, corpus, tmp_path / "reference", **kwargs)
    assert forwards["n"] < reference.config.num_entries // 32  # it resumed, it did not start over
    assert resumed.config.files == reference.config.files  # byte-identical files
    assert not (out / ".partial").exists()


def test_reindex_links_the_keys_and_values_instead_of_copying_them(store_dir, tmp_path):
    store = Datastore.from_pretrained(shutil.copytree(store_dir, tmp_path / "store"))
    ivf = store.rebuild_index("IVF4,Flat", tmp_path / "ivf", train_size=len(store))
    for shard in store.config.shards:
        for name in (shard["keys"], shard["values"]):
            assert os.stat(store.folder / name).st_ino == os.stat(ivf.folder / name).st_ino
    assert (
        ivf.config.files[store.config.shards[0]["keys"]] == store.config.files[store.config.shards[0]["keys"]]
    )
    queries = np.asarray(store.keys[:5], dtype=np.float32)
    found = ivf.search(queries, k=1)
    assert found.ids[:, 0].tolist() == list(range(5))  # each stored key is its own nearest
    # every write of the library replaces a file by name, so the linked store keeps its content
    before = _digests(ivf.folder)
    atomic_write_bytes(store.folder / store.config.shards[0]["keys"], b"replaced")
    assert _digests(ivf.folder) == before
    assert len(Datastore.from_pretrained(ivf.folder)) == len(store)
