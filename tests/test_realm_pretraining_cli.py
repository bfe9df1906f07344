"""``hf-knnlm realm-pretrain`` on a tiny random BERT and the six toy documents."""

from __future__ import annotations

import json

import pytest

from hf_knnlm.commands import main
from hf_knnlm.open_qa.pretraining import open_qa_from_pretraining

try:  # tests/ is a package on main, a plain folder elsewhere
    from tests.open_qa_utils import DOCUMENTS, make_tokenizer, save_encoder
except ImportError:
    from open_qa_utils import DOCUMENTS, make_tokenizer, save_encoder

SMALL = ["--max-question-length", "24", "--max-reader-length", "64", "--max-doc-embed-length", "32"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    encoder = save_encoder(make_tokenizer(root / "tokenizer"), root / "encoder")
    documents = root / "documents.jsonl"
    # two sentences per document, so that ICT has a sentence to query the rest with
    rows = [
        {**d, "text": f"{d['text'].capitalize()}. {DOCUMENTS[i - 1]['text'].capitalize()}."}
        for i, d in enumerate(DOCUMENTS)
    ]
    documents.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return encoder, documents


def _argv(inputs, output, *extra):
    encoder, documents = inputs
    return [
        "realm-pretrain", "--retriever", str(encoder), "--documents", str(documents), "--output-dir",
        str(output), "--top-k", "2", *SMALL, "--max-steps", "2", "--batch-size", "2", "--logging-steps", "1",
        "--min-sentence-words", "3", "--cpu", *extra,
    ]  # fmt: skip


def test_realm_pretrain_writes_the_open_qa_checkpoint(inputs, tmp_path, capsys):
    argv = _argv(inputs, tmp_path / "out", "--refresh-index-every", "1", "--ict-steps", "2")
    assert main([*argv, "--head-warmup-steps", "3"]) == 0
    printed = capsys.readouterr().out
    assert '"ict_losses"' in printed and '"index_staleness"' in printed
    assert len(json.loads(printed[printed.index("{\n") :])["head_warmup_losses"]) == 3  # the summary
    summary = json.loads((tmp_path / "out" / "pretraining.json").read_text())
    assert summary["steps"] == 2 and len(summary["losses"]) == 2
    assert summary["index_staleness"][0] == 1 and summary["settings"]["masking"] == "salient"
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"retriever", "reader", "open_qa.json"}
    model = open_qa_from_pretraining(tmp_path / "out", max_reader_length=48, span_hidden_size=16)
    assert model.config.top_k == 5 and model.config.max_doc_embed_length == 32


def test_realm_pretrain_bad_input_is_one_line(inputs, tmp_path, capsys):
    assert main(_argv(inputs, tmp_path / "out", "--random-span-words", "0")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "random_span_words=0 must be a positive integer" in err
    encoder, _ = inputs
    argv = _argv((encoder, tmp_path / "missing.jsonl"), tmp_path / "out")
    assert main(argv) == 2
    assert "missing.jsonl" in capsys.readouterr().err
