"""``hf-knnlm qa-train`` / ``qa-eval`` end to end on the toy collection with a tiny saved encoder."""

from __future__ import annotations

import argparse
import json

from hf_knnlm.commands import Subparsers
from hf_knnlm.commands.qa import register
from hf_knnlm.open_qa import DocumentIndex, RealmForOpenQA

GOLD = ["paris", "berlin", "rome", "vienna"]

try:  # tests/ is a package on main, a plain folder elsewhere
    from tests.open_qa_utils import DOCUMENTS, QUESTIONS, make_tokenizer, save_encoder
except ImportError:
    from open_qa_utils import DOCUMENTS, QUESTIONS, make_tokenizer, save_encoder


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-knnlm")
    register(Subparsers(parser.add_subparsers(dest="command", required=True), None))
    return parser


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def test_qa_train_then_qa_eval(tmp_path, capsys):
    save_encoder(make_tokenizer(tmp_path / "encoder"), tmp_path / "encoder")
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
            "--max-doc-embed-length",
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


def _write_squad(path):
    """The toy collection as a SQuAD v1.1 file: one article per document, its questions where it answers."""
    articles = []
    for document in DOCUMENTS:
        qas = []
        for i, q in enumerate(QUESTIONS):
            texts = q["answers"]["text"] if isinstance(q["answers"], dict) else q["answers"]
            found = [t for t in texts if t in document["text"]]
            if found:
                answers = [{"text": t, "answer_start": document["text"].index(t)} for t in found]
                qas.append({"id": f"{document['id']}-{i}", "question": q["question"], "answers": answers})
        paragraph = {"context": document["text"], "qas": qas}
        articles.append({"title": document["title"], "paragraphs": [paragraph]})
    path.write_text(json.dumps({"data": articles, "version": "1.1"}), encoding="utf-8")


def test_qa_train_reader_then_qa_train_with_it(tmp_path, capsys):
    from transformers import AutoModelForQuestionAnswering

    from hf_knnlm.commands import build_parser

    tokenizer = make_tokenizer(tmp_path / "tok")
    save_encoder(tokenizer, tmp_path / "encoder")
    _write_squad(tmp_path / "squad.json")
    reader = tmp_path / "reader"
    args = build_parser().parse_args(
        ["qa-train-reader", "--model", str(tmp_path / "encoder"), "--train", str(tmp_path / "squad.json")]
        + ["--articles", "0:3", "--output-dir", str(reader), "--max-steps", "2", "--max-length", "48"]
        + ["--doc-stride", "8", "--batch-size", "2", "--cpu"]
    )
    assert args.func(args) == 0
    summary = json.loads((reader / "reader_training.json").read_text())
    assert summary["train_questions"] == 3 and summary["steps"] == 2  # paris, berlin, rome (x2 answers)
    assert AutoModelForQuestionAnswering.from_pretrained(reader).config.architectures == [
        "BertForQuestionAnswering"
    ]

    out = tmp_path / "run"
    args = build_parser().parse_args(
        ["qa-train", "--encoder", str(tmp_path / "encoder"), "--reader", str(reader)]
        + ["--documents", str(tmp_path / "squad.json"), "--train", str(tmp_path / "squad.json")]
        + [
            "--output-dir",
            str(out),
            "--max-steps",
            "2",
            "--max-reader-length",
            "48",
            "--max-doc-embed-length",
            "48",
        ]
        + ["--max-question-length", "16", "--max-span-width", "4", "--top-k", "2"]
        + ["--retriever-frozen-steps", "1", "--warmup-steps", "0.5"]
    )
    assert args.func(args) == 0
    model = RealmForOpenQA.from_pretrained(out / "model")
    assert model.config.reader_head == "start_end"
    args = build_parser().parse_args(
        ["qa-eval", "--model", str(out / "model"), "--index", str(out / "index")]
        + ["--data", str(tmp_path / "squad.json"), "--top-k", "2", "--results", str(tmp_path / "r.json")]
    )
    assert args.func(args) == 0
    assert json.loads((tmp_path / "r.json").read_text())["questions"] == 4


def test_qa_train_reader_user_errors_are_one_line(tmp_path, capsys):
    from hf_knnlm.commands import main

    code = main(
        ["qa-train-reader", "--model", "x", "--train", str(tmp_path / "missing.json")] + ["--output-dir", "o"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.json" in err
