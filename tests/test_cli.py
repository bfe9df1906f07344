"""hf-knnlm build | evaluate | generate on a tiny saved model."""

from __future__ import annotations

import json

from hf_knnlm import Datastore
from hf_knnlm.commands import main


def test_build_evaluate_generate(saved_model, corpus_text, other_text, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text, encoding="utf-8")
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(other_text, encoding="utf-8")
    store_dir = tmp_path / "store"
    assert (
        main(
            [
                "build",
                "--model",
                str(saved_model),
                "--data",
                str(corpus),
                "--output",
                str(store_dir),
                "--max-length",
                "64",
                "--stride",
                "32",
            ]
        )
        == 0
    )
    assert len(Datastore.from_pretrained(store_dir)) > 0

    out_json = tmp_path / "ppl.json"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(saved_model),
                "--data",
                str(corpus),
                "--datastore",
                str(store_dir),
                "--max-length",
                "64",
                "--stride",
                "32",
                "--k",
                "8",
                "--lmbda",
                "0.9",
                "--output-json",
                str(out_json),
            ]
        )
        == 0
    )
    result = json.loads(out_json.read_text())
    assert result["knn_ppl"] < result["base_ppl"]

    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--model",
                str(saved_model),
                "--datastore",
                str(store_dir),
                "--prompt",
                "The king",
                "--max-new-tokens",
                "5",
                "--k",
                "8",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("The king")


def test_errors_are_reported_not_raised(saved_model, tmp_path, capsys):
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(saved_model),
                "--data",
                str(tmp_path / "missing.txt"),
                "--datastore",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "error" in capsys.readouterr().err
