"""hf-knnlm rag-index | rag-evaluate | rag-generate on a tiny saved model."""

from __future__ import annotations

import json

import pytest

from hf_knnlm.commands import main
from hf_knnlm.rag import BM25Retriever


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, model, tokenizer):
    """The tiny model and its tokenizer in one folder, as the CLI loads them."""
    folder = tmp_path_factory.mktemp("rag-model")
    for part in (model, tokenizer):
        part.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_rag_index_evaluate_generate(saved_model, corpus_text, other_text, tmp_path, capsys):
    corpus, held_out = tmp_path / "corpus.txt", tmp_path / "held_out.txt"
    corpus.write_text(corpus_text, encoding="utf-8")
    held_out.write_text(other_text, encoding="utf-8")
    index = tmp_path / "bm25"
    args = ["--tokenizer", str(saved_model), "--data", str(corpus), "--chunk-tokens", "32", "--overlap", "8"]
    assert main(["rag-index", *args, "--output", str(index)]) == 0
    assert len(BM25Retriever.from_pretrained(index)) > 10

    model = ["--model", str(saved_model), "--retriever", str(index)]
    out_json = tmp_path / "ppl.json"
    window = ["--max-length", "64", "--stride", "32", "--max-tokens", "120"]
    evaluate = ["rag-evaluate", *model, "--data", str(held_out), *window, "--output-json", str(out_json)]
    for method in ("ralm", "replug"):
        assert main([*evaluate, "--method", method]) == 0
        result = json.loads(out_json.read_text())
        assert result["num_tokens"] == 119 and result["retrieved_fraction"] > 0.5
        assert result["retrieval"]["num_documents"] == (1 if method == "ralm" else 4)

    for method in ("ralm", "replug", "flare"):
        capsys.readouterr()
        assert (
            main(
                ["rag-generate", *model, "--method", method, "--prompt", "The king", "--max-new-tokens", "6"]
            )
            == 0
        )
        assert "retrievals]" in capsys.readouterr().out


def test_rag_cli_user_errors_are_one_line(saved_model, tmp_path, capsys):
    missing = ["--model", str(saved_model), "--retriever", str(tmp_path / "nope"), "--prompt", "x"]
    assert main(["rag-generate", *missing]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines() == [err.strip()]
    assert err.startswith("hf-knnlm rag-generate: error:") and "rag-index" in err
