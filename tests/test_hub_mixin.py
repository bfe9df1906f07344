"""One base for every saved store: Datastore and DocumentIndex save, load, verify and push alike."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from hf_knnlm import DocumentIndex, IntegrityError
from hf_knnlm.utils.hub_mixin import HubMixin

try:  # tests/ is a package on main, a plain folder elsewhere
    from tests.open_qa_utils import make_index, make_model, make_tokenizer
except ImportError:
    from open_qa_utils import make_index, make_model, make_tokenizer


@pytest.fixture(scope="module")
def document_index(tmp_path_factory) -> DocumentIndex:
    tokenizer = make_tokenizer(tmp_path_factory.mktemp("bert"))
    return make_index(make_model(tokenizer), tokenizer)


@pytest.fixture(params=["datastore", "document_index"])
def saved(request, tmp_path) -> tuple[type[HubMixin], HubMixin, Path]:
    """Each store type, saved by ``save_pretrained`` into a fresh folder."""
    obj = request.getfixturevalue("store" if request.param == "datastore" else "document_index")
    folder = tmp_path / request.param
    obj.save_pretrained(folder)
    return type(obj), obj, folder


def _config_path(cls: type[HubMixin], folder: Path) -> Path:
    return folder / cls.config_class.CONFIG_NAME


def _edit_config(cls, folder: Path, **changes) -> None:
    path = _config_path(cls, folder)
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_config_records_format_version_library_version_and_every_file(saved):
    cls, _, folder = saved
    text = _config_path(cls, folder).read_text()
    config = json.loads(text)
    assert list(config) == sorted(config)  # sorted JSON, as peft writes its configs
    expected = cls.config_class.from_dict(config).written_format_version()
    assert config["format_version"] == expected <= cls.config_class.FORMAT_VERSION
    assert config["hf_knnlm_version"]
    on_disk = {p.name for p in folder.iterdir()} - {cls.config_class.CONFIG_NAME, "README.md"}
    assert set(config["files"]) == on_disk and all(len(h) == 64 for h in config["files"].values())


def test_card_is_a_model_card_of_the_library(saved):
    _, _, folder = saved
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "hf_knnlm" and "hf_knnlm" in card.data.tags


def test_a_newer_format_is_refused_with_the_upgrade_command(saved):
    cls, _, folder = saved
    _edit_config(cls, folder, format_version=cls.config_class.FORMAT_VERSION + 1)
    with pytest.raises(ValueError, match=r"format_version \d+ .*newer.*pip install -U hf-knnlm"):
        cls.from_pretrained(folder)


def test_unknown_keys_are_tolerated_with_a_warning(saved, caplog):
    cls, obj, folder = saved
    _edit_config(cls, folder, from_the_future=1)
    with caplog.at_level(logging.WARNING):
        assert len(cls.from_pretrained(folder)) == len(obj)
    assert "from_the_future" in caplog.text


def test_a_tampered_file_is_named_and_verify_false_skips_the_check(saved):
    cls, obj, folder = saved
    name = sorted(json.loads(_config_path(cls, folder).read_text())["files"])[0]
    data = bytearray((folder / name).read_bytes())
    data[-1] ^= 1  # the last byte: headers still parse, content differs
    (folder / name).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=name):
        cls.from_pretrained(folder)
    (folder / name).unlink()
    with pytest.raises(IntegrityError, match=f"'{name}' is missing"):
        cls.from_pretrained(folder)


def test_a_store_loads_from_a_subfolder(saved, tmp_path):
    cls, obj, folder = saved
    repo = tmp_path / "repo"
    shutil.copytree(folder, repo / "nested" / "store")
    assert len(cls.from_pretrained(repo, subfolder="nested/store")) == len(obj)
    with pytest.raises(ValueError, match="subfolder"):
        cls.from_pretrained(repo, subfolder="../repo")


def test_push_is_one_commit_of_what_save_writes(saved, hf_api, tmp_path):
    cls, obj, folder = saved
    obj.push_to_hub("org/some-store", commit_message="first")
    (upload,) = [kwargs for name, kwargs in hf_api.calls if name == "upload_folder"]
    assert upload["commit_message"] == "first"
    assert set(upload["files"]) == {p.name for p in folder.iterdir()}
    assert "org/some-store" in upload["files"]["README.md"].decode()
    pushed = tmp_path / "pushed"
    pushed.mkdir()
    for name, data in upload["files"].items():
        (pushed / name).write_bytes(data)
    assert len(cls.from_pretrained(pushed)) == len(obj)


def test_a_document_index_saved_before_the_shared_base_loads(document_index, tmp_path):
    folder = tmp_path / "old"
    document_index.save_pretrained(folder)
    config = json.loads((folder / "document_index.json").read_text())
    del config["hf_knnlm_version"]  # what the first release wrote: no library version
    (folder / "document_index.json").write_text(json.dumps(config))
    loaded = DocumentIndex.from_pretrained(folder)
    assert loaded.ids == document_index.ids
