"""``hf-knnlm qa-train`` / ``qa-eval`` end to end on the toy collection with a tiny saved encoder."""

from __future__ import annotations

import argparse
import json

import torch
from transformers import BertConfig, BertModel

from hf_knnlm.commands.qa import register
from hf_knnlm.open_qa import DocumentIndex, RealmForOpenQA

GOLD = ["paris", "berlin", "rome", "vienna"]

try:  # tests/ is a package on main, a plain folder elsewhere
    from tests.open_qa_utils import DOCUMENTS, QUESTIONS, make_tokenizer
except ImportError:
    from open_qa_utils import DOCUMENTS, QUESTIONS, make_tokenizer


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-knnlm")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def test_qa_train_then_qa_eval(tmp_path, capsys):
    tokenizer = make_tokenizer(tmp_path / "encoder")
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    ).save_pretrained(tmp_path / "encoder")
    _write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)
    questions = [
        {
            "question": q["question"],
            "answers": q["answers"]["text"] if isinstance(q["answers"], dict) else q["answers"],
            "gold_doc_id": gold,
        }
        for q, gold in zip(QUESTIONS, GOLD, strict=True)
    ]
    _write_jsonl(tmp_path / "questions.jsonl", questions)
    out = tmp_path / "run"
    common = ["--top-k", "2"]
    args = _parser().parse_args(
        [
            "qa-train",
            "--encoder",
            str(tmp_path / "encoder"),
            "--documents",
            str(tmp_path / "docs.jsonl"),
            "--train",
            str(tmp_path / "questions.jsonl"),
            "--output-dir",
            str(out),
            "--max-steps",
            "3",
            "--max-reader-length",
            "48",
            "--max-doc-length",
            "48",
            "--max-question-length",
            "16",
            "--max-span-width",
            "4",
            *common,
        ]
    )
    assert args.func(args) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["train_questions"] == 4
    assert json.loads((out / "train_summary.json").read_text())["train_questions"] == 4
    assert (out / "model" / "config.json").is_file() and (out / "index" / "index.faiss").is_file()
    assert isinstance(RealmForOpenQA.from_pretrained(out / "model"), RealmForOpenQA)
    assert len(DocumentIndex.from_pretrained(out / "index")) == len(DOCUMENTS)

    args = _parser().parse_args(
        [
            "qa-eval",
            "--model",
            str(out / "model"),
            "--index",
            str(out / "index"),
            "--data",
            str(tmp_path / "questions.jsonl"),
            "--gold",
            "--predictions",
            str(tmp_path / "pred.json"),
            "--results",
            str(tmp_path / "results.json"),
            *common,
        ]
    )
    assert args.func(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["questions"] == 4
    assert set(results) >= {"recall@1", "recall@2", "open", "gold_paragraph"}
    assert 0.0 <= results["recall@1"] <= results["recall@2"] <= 1.0
    assert 0.0 <= results["open"]["exact_match"] <= results["open"]["f1"] <= 100.0
    predictions = json.loads((tmp_path / "pred.json").read_text())
    assert [p["question"] for p in predictions] == [q["question"] for q in questions]
    assert all(p["doc_id"] in p["doc_ids"] for p in predictions)
