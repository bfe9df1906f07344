"""The adaptive-retrieval gate written into a finished store: a failed re-train leaves the store as it
was (old gate, loadable), and a writer holding the store's lock keeps the gate out."""

from __future__ import annotations

import errno
import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from hf_knnlm import Datastore, FolderInUseError
from hf_knnlm.datastore.config import DatastoreConfig
from hf_knnlm.knnlm.gate import RetrievalGate
from hf_knnlm.knnlm.gate_training import train_gate
from hf_knnlm.utils.files import folder_lock

WINDOWS = dict(k=8, max_length=64, stride=32, disable_progress=True)


def _digests(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture()
def gated(store_dir, tmp_path, model, tokenizer, other_text) -> Path:
    folder = tmp_path / "gated"
    shutil.copytree(store_dir, folder)
    train_gate(model, tokenizer, [other_text], Datastore.from_pretrained(folder), epochs=2, **WINDOWS)
    return folder


def test_a_gate_retrain_that_fails_writing_the_config_keeps_the_old_store(
    gated, model, tokenizer, corpus_text, monkeypatch
):
    before = _digests(gated)
    old_gate = RetrievalGate.from_datastore(Datastore.from_pretrained(gated))

    def disk_full(self, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(DatastoreConfig, "save", disk_full)
    store = Datastore.from_pretrained(gated)
    with pytest.raises(OSError, match="No space left"):
        train_gate(model, tokenizer, [corpus_text[:4000]], store, epochs=2, seed=1, **WINDOWS)
    monkeypatch.undo()
    assert _digests(gated) == before  # neither the gate nor the config changed
    reloaded = Datastore.from_pretrained(gated)  # sha256-checked: loads
    assert reloaded.config.files == store.config.files  # the open store still records the old gate
    for name, tensor in old_gate.state_dict().items():
        assert torch.equal(RetrievalGate.from_datastore(reloaded).state_dict()[name], tensor)
    assert sorted(p.name for p in gated.parent.iterdir()) == ["gated"]  # no temporary folder left


def test_a_gate_save_goes_through_the_folder_swap_and_lock(gated, model, tokenizer, other_text):
    store = Datastore.from_pretrained(gated)
    gate = RetrievalGate.from_datastore(store)
    with folder_lock(gated), pytest.raises(FolderInUseError, match="another writer"):
        gate.save_to_datastore(store)
    (gated / "notes.txt").write_text("a file of the user's")
    gate.save_to_datastore(store)
    assert (gated / "notes.txt").read_text() == "a file of the user's"
    assert len(Datastore.from_pretrained(gated)) == len(store)


def test_train_gate_refuses_a_number_for_save(model, tokenizer, store, other_text):
    with pytest.raises(ValueError, match="save=1"):
        train_gate(model, tokenizer, [other_text], store, save=1, epochs=2, **WINDOWS)
    assert "gate.safetensors" not in store.config.files
