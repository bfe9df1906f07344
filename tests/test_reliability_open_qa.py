"""REALM: explicit top_k is honoured or refused; an index from another encoder or tokenizer is refused."""

from __future__ import annotations

import pytest
from transformers import BertTokenizerFast

from hf_knnlm import DocumentIndex

try:  # tests/ is a package on main, a plain folder elsewhere
    from tests.open_qa_utils import make_index, make_model, make_tokenizer
    from tests.reliability_utils import drop_file_hashes
except ImportError:
    from open_qa_utils import make_index, make_model, make_tokenizer
    from reliability_utils import drop_file_hashes

QUESTION = "what is the capital of france"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model(tokenizer)


@pytest.fixture(scope="module")
def index(model, tokenizer):
    return make_index(model, tokenizer)


@pytest.mark.parametrize("top_k", [0, -1, 2.5, True])
def test_answer_refuses_a_bad_top_k(model, index, tokenizer, top_k):
    with pytest.raises(ValueError, match=rf"\btop_k={top_k!r}"):
        model.answer(QUESTION, index, tokenizer, top_k=top_k)


def test_answer_honours_an_explicit_top_k(model, index, tokenizer):
    assert len(model.answer(QUESTION, index, tokenizer, top_k=1)[0]["doc_ids"]) == 1
    assert len(model.answer(QUESTION, index, tokenizer, top_k=len(index))[0]["doc_ids"]) == len(index)


def test_an_index_embedded_by_another_encoder_is_refused(model, index, tokenizer, tmp_path):
    other = make_model(tokenizer, seed=1)  # same widths, other weights
    with pytest.raises(ValueError, match="encoder"):
        other.answer(QUESTION, index, tokenizer)
    index.save_pretrained(tmp_path / "index")
    loaded = DocumentIndex.from_pretrained(tmp_path / "index")
    with pytest.raises(ValueError, match="encoder"):
        other.answer(QUESTION, loaded, tokenizer)
    assert model.answer(QUESTION, loaded, tokenizer)[0]["answer"]


def test_an_index_read_with_another_tokenizer_is_refused(model, index, tokenizer, tmp_path):
    vocab = tokenizer.get_vocab()
    words = sorted(v for v in vocab if not v.startswith("["))
    swapped = {**vocab, words[0]: vocab[words[1]], words[1]: vocab[words[0]]}  # same size, other ids
    other = BertTokenizerFast(vocab=swapped, do_lower_case=True)
    assert len(other) == len(tokenizer)
    with pytest.raises(ValueError, match="tokenizer"):
        model.answer(QUESTION, index, other)


def test_a_document_index_without_file_hashes_needs_verify_false(index, tmp_path):
    folder = tmp_path / "index"
    index.save_pretrained(folder)
    drop_file_hashes(folder / "document_index.json")
    with pytest.raises(ValueError, match="verify=False"):
        DocumentIndex.from_pretrained(folder)
    assert len(DocumentIndex.from_pretrained(folder, verify=False)) == len(index)


def _reader_rows(**override):
    row = {
        "question": "capital of france?",
        "context": "paris is the capital of france.",
        "answers": ["paris"],
    }
    return [row, {**row, **override}]


@pytest.mark.parametrize("field", ["question", "context", "answers"])
def test_reader_training_rows_with_none_fields_are_named(tokenizer, tmp_path, field):
    import datasets

    from hf_knnlm.open_qa import train_reader

    try:
        from tests.open_qa_utils import save_encoder
    except ImportError:
        from open_qa_utils import save_encoder
    encoder = save_encoder(tokenizer, tmp_path / "encoder")
    rows = datasets.Dataset.from_list(_reader_rows(**{field: None}))
    with pytest.raises(ValueError, match=rf"row 1.*{field}.*None"):
        train_reader(str(encoder), rows, output_dir=tmp_path / "reader", max_steps=1, use_cpu=True)
    assert not (tmp_path / "reader").exists()


def test_qa_train_reader_reports_the_losses_it_logged(tokenizer, tmp_path, capsys):
    import json

    from hf_knnlm.commands import main

    try:
        from tests.open_qa_utils import save_encoder
    except ImportError:
        from open_qa_utils import save_encoder
    encoder = save_encoder(tokenizer, tmp_path / "encoder")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in _reader_rows()))
    argv = ["qa-train-reader", "--model", str(encoder), "--train", str(train), "--output-dir"]
    options = ["--max-steps", "3", "--max-length", "32", "--doc-stride", "8", "--cpu"]
    assert main([*argv, str(tmp_path / "reader"), *options]) == 0
    summary = json.loads((tmp_path / "reader" / "reader_training.json").read_text())
    assert summary["steps"] == 3 and len(summary["losses"]) == 3, summary
    assert summary["train_loss"] == pytest.approx(sum(summary["losses"]) / 3, abs=1e-3)


def test_a_checkpoint_save_that_fails_midway_keeps_the_old_checkpoint(tokenizer, tmp_path):
    """Reader checkpoints and qa-train's model folder: written beside, swapped in whole, under the lock."""
    from hf_knnlm import FolderInUseError
    from hf_knnlm.utils.files import folder_lock, save_pretrained_atomically

    try:
        from tests.open_qa_utils import save_encoder
    except ImportError:
        from open_qa_utils import save_encoder
    from transformers import AutoModel

    folder = save_encoder(tokenizer, tmp_path / "checkpoint")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    model = AutoModel.from_pretrained(folder)

    class DiskFull:
        def save_pretrained(self, path):
            (path / "tokenizer.json").write_text("{")  # half written
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        save_pretrained_atomically(folder, model, DiskFull())
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    with folder_lock(folder), pytest.raises(FolderInUseError):
        save_pretrained_atomically(folder, model, tokenizer)


def test_a_realm_model_or_tokenizer_save_that_fails_midway_keeps_the_old_one(
    model, tokenizer, tmp_path, monkeypatch
):
    """RealmForOpenQA and RealmTokenizerPair save beside the folder and swap it in whole, under the lock;
    each keeps what else the folder holds (the model its tokenizers, the tokenizers the model)."""
    import transformers.modeling_utils

    from hf_knnlm import FolderInUseError
    from hf_knnlm.open_qa import RealmForOpenQA, RealmTokenizerPair
    from hf_knnlm.open_qa.tokenization import RETRIEVER_FOLDER
    from hf_knnlm.utils.files import folder_lock

    folder = tmp_path / "realm"
    RealmTokenizerPair(tokenizer, tokenizer).save_pretrained(folder)
    model.save_pretrained(folder)
    RealmTokenizerPair(tokenizer, tokenizer).save_pretrained(folder)
    assert (folder / RETRIEVER_FOLDER).is_dir() and (folder / "config.json").is_file()  # both kept
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", disk_full)
    monkeypatch.setattr(model.config, "top_k", model.config.top_k + 1)  # a new config.json is written first
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(folder)
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["realm"]
    monkeypatch.undo()
    assert isinstance(RealmForOpenQA.from_pretrained(folder), RealmForOpenQA)
    with folder_lock(folder), pytest.raises(FolderInUseError):
        RealmTokenizerPair(tokenizer, tokenizer).save_pretrained(folder)
