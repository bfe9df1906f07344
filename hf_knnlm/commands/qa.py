"""``hf-knnlm qa-train`` and ``hf-knnlm qa-eval``: register with ``register`` on the main parser.

Data files are either SQuAD v1.1 JSON (every paragraph is a document; ``--articles`` picks the questions) or
JSON lines: documents with ``title``/``text`` (and optionally ``id``), questions with ``question`` and
``answers`` (and optionally ``gold_doc_id`` for retrieval recall).
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..utils.checks import check_positive_int
from ..utils.files import atomic_write_json, save_pretrained_atomically
from ._options import add_dataclass_options, add_signature_options, values

if TYPE_CHECKING:
    import datasets


def parse_articles(text: str | None) -> slice | None:
    if not text:
        return None
    try:
        start, _, stop = text.partition(":")
        return slice(int(start) if start else None, int(stop) if stop else None)
    except ValueError:
        raise ValueError(f"--articles must look like START:STOP (e.g. 0:38 or 38:), got {text!r}.") from None


def read_jsonl(path: Path) -> datasets.Dataset:
    import datasets

    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.Dataset.from_list(rows)


def load_documents(path: str) -> datasets.Dataset:
    from ..open_qa import load_squad_open

    path = Path(path)
    return load_squad_open(path)[0] if path.suffix == ".json" else read_jsonl(path)


def load_questions(path: str, articles: str | None = None) -> datasets.Dataset:
    from ..open_qa import load_squad_open

    path = Path(path)
    if path.suffix == ".json":
        return load_squad_open(path, articles=parse_articles(articles))[1]
    if articles:
        raise ValueError(
            "--articles only applies to SQuAD JSON files; select rows of a .jsonl file yourself."
        )
    return read_jsonl(path)


def random_subset(dataset: datasets.Dataset, limit: int | None, seed: int) -> datasets.Dataset:
    if limit and limit < len(dataset):
        return dataset.shuffle(seed=seed).select(range(limit))
    return dataset


# The CLI's training verbs log the loss ~50 times per run (a ratio of the steps: at least every step of a
# short run), so that the summary's "losses" is never empty after a run that trained.
LOGGING_RATIO = 0.02


def logged_losses(trainer: Any) -> dict[str, Any]:
    """``losses`` (every logged step's, in order) and ``train_loss`` (the run's mean) of a Trainer."""
    history = trainer.state.log_history
    losses = [round(e["loss"], 4) for e in history if "loss" in e]
    train_loss = next((e["train_loss"] for e in reversed(history) if "train_loss" in e), None)
    return {"losses": losses, "train_loss": None if train_loss is None else round(train_loss, 4)}


def steps_or_ratio(text: str) -> int | float:
    """``--warmup-steps 50`` (steps) or ``--warmup-steps 0.1`` (a ratio of all steps)."""
    value = float(text)
    return value if 0 <= value < 1 else int(value)


# The REALM model options of qa-train: RealmConfig fields (their help is the RealmConfig docstring).
REALM_FIELDS = (
    "reader_stride",
    "retriever_pooling",
    "retriever_proj_size",
    "retriever_normalize",
    "retriever_score_scale",
    "top_k",
    "max_reader_length",
    "max_doc_embed_length",
    "max_question_length",
    "max_span_width",
)
# The training options of qa-train: parameters of train_realm (defaults read from its signature).
TRAINING_HELPS = {
    "epochs": "Training epochs",
    "max_steps": "Stop after this many steps (-1: the epochs decide)",
    "batch_size": "Questions per step",
    "learning_rate": "Learning rate of the encoders (the query encoder's too, unless the next two change it)",
    "head_learning_rate": "Learning rate of the span head",
    "retriever_learning_rate": "Learning rate of the query encoder (none: --learning-rate)",
    "retriever_frozen_steps": "Freeze the query encoder for the first N steps",
    "warmup_steps": "Warm-up steps, or a ratio of all steps when below 1",
    "refresh_index_every": "Re-embed the documents every N steps in the background (0: never, as REALM does)",
    "seed": "Seed of the run",
}


def _check_files(*paths: str | None) -> None:
    """Question and document files that do not exist are named before any model is loaded."""
    for path in paths:
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file.")


def qa_train(args: argparse.Namespace) -> int:
    """``hf-knnlm qa-train``: returns exit status 0; the summary goes to stdout and train_summary.json."""
    from transformers import AutoTokenizer, set_seed

    from ..open_qa import DocumentIndex, RealmConfig, RealmForOpenQA, RealmTokenizerPair, train_realm

    # Every setting is checked before a tokenizer or encoder loads: the model's through its config.
    RealmConfig(**values(args, REALM_FIELDS))  # reader_head "auto" is resolved from the reader later
    check_positive_int("batch_size", args.batch_size, "questions per step")
    if args.max_steps != -1:
        check_positive_int("max_steps", args.max_steps, "or -1: the epochs decide")
    _check_files(args.train, args.documents)
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.encoder)
    reader = args.reader or args.encoder
    if reader != args.encoder:
        tokenizer = RealmTokenizerPair(tokenizer, AutoTokenizer.from_pretrained(reader))
    model = RealmForOpenQA.from_retriever_and_reader(
        args.encoder, reader, reader_head=args.reader_head, **values(args, REALM_FIELDS)
    )
    output = Path(args.output_dir)
    started = time.perf_counter()
    if args.index:
        index = DocumentIndex.from_pretrained(args.index)
    else:
        index = DocumentIndex.build(load_documents(args.documents), model, tokenizer)
        index.save_pretrained(output / "index")
    index_seconds = time.perf_counter() - started
    train = random_subset(load_questions(args.train, args.articles), args.max_questions, args.seed)
    started = time.perf_counter()
    trainer = train_realm(
        model,
        tokenizer,
        index,
        train,
        output_dir=output / "trainer",
        logging_steps=LOGGING_RATIO,
        **values(args, TRAINING_HELPS),
    )
    save_pretrained_atomically(output / "model", model, tokenizer)  # an old model there stays until then
    if args.refresh_index_every:
        index.save_pretrained(output / "index")  # the refreshed vectors belong with the trained model
    summary = {
        "train_questions": len(train),
        "index_seconds": index_seconds,
        "train_seconds": time.perf_counter() - started,
        **logged_losses(trainer),
    }
    atomic_write_json(output / "train_summary.json", summary)
    if args.push_to_hub:
        model.push_to_hub(args.push_to_hub)
        tokenizer.push_to_hub(args.push_to_hub)
        index.push_to_hub(args.push_to_hub + "-index")
    print(json.dumps(summary, indent=2))
    return 0


def qa_eval(args: argparse.Namespace) -> int:
    """``hf-knnlm qa-eval``: returns the exit status 0 (the results go to stdout and ``--results``)."""
    from ..open_qa import (
        DocumentIndex,
        RealmForOpenQA,
        RealmTokenizerPair,
        evaluate_gold,
        evaluate_open,
        retrieval_recall,
    )

    check_positive_int("top_k", args.top_k, "documents read per question")  # before any model loads
    _check_files(args.data)
    model = RealmForOpenQA.from_pretrained(args.model).eval()
    tokenizer = RealmTokenizerPair.from_pretrained(args.tokenizer or args.model)
    index = DocumentIndex.from_pretrained(args.index)
    data = random_subset(load_questions(args.data, args.articles), args.max_questions, args.seed)
    # datasets 4 returns lazy Column objects; the evaluation wants plain lists.
    questions, answers = list(data["question"]), list(data["answers"])
    results: dict[str, Any] = {"questions": len(data)}
    if "gold_doc_id" in data.column_names:
        results.update(
            retrieval_recall(
                model, tokenizer, index, questions, list(data["gold_doc_id"]), ks=(1, args.top_k)
            )
        )
    scores, predictions = evaluate_open(model, tokenizer, index, questions, answers, top_k=args.top_k)
    results["open"] = scores
    if args.gold and "gold_doc_id" in data.column_names:
        results["gold_paragraph"] = evaluate_gold(
            model, tokenizer, index, questions, answers, list(data["gold_doc_id"])
        )[0]
    if args.predictions:
        atomic_write_json(
            args.predictions, [{"question": q, **p} for q, p in zip(questions, predictions, strict=True)]
        )
    if args.results:
        atomic_write_json(args.results, results)
    print(json.dumps(results, indent=2))
    return 0


def register(subparsers: Any) -> None:
    """Add ``qa-train`` and ``qa-eval`` to the ``hf-knnlm`` parser (options built when the verb runs: they
    come from RealmConfig and train_realm, which import transformers)."""
    subparsers.add_parser(
        "qa-train", help="fine-tune a REALM open-QA model (retriever + reader)", configure=configure_train
    )
    subparsers.add_parser(
        "qa-eval", help="evaluate a REALM open-QA model: recall, EM, F1", configure=configure_eval
    )


def configure_train(train: argparse.ArgumentParser) -> None:
    from ..open_qa import RealmConfig, RealmForOpenQA, train_realm

    train.add_argument("--encoder", required=True, help="BERT-style checkpoint (folder or Hub id)")
    train.add_argument("--tokenizer", help="retriever tokenizer folder or id (default: --encoder)")
    train.add_argument(
        "--reader",
        help="reader checkpoint (default: --encoder): a question-answering checkpoint such as one saved by "
        "qa-train-reader, or a plain encoder",
    )
    reader_head = (
        inspect.signature(RealmForOpenQA.from_retriever_and_reader).parameters["reader_head"].default
    )
    train.add_argument(
        "--reader-head",
        choices=["auto", "start_end", "mlp"],
        default=reader_head,
        help="auto: start+end logits of a question-answering checkpoint, REALM's span MLP on an encoder "
        f"(default: {reader_head})",
    )
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--documents", help="SQuAD JSON or JSON lines with title/text to build the index from"
    )
    source.add_argument("--index", help="a saved document index (folder or Hub id) built by this encoder")
    train.add_argument("--train", required=True, help="SQuAD JSON or JSON lines with question/answers")
    train.add_argument("--articles", help="SQuAD articles to take questions from, START:STOP (e.g. 0:38)")
    train.add_argument("--output-dir", required=True)
    train.add_argument(
        "--max-questions", type=int, help="random subset of the training questions (default: all)"
    )
    add_dataclass_options(
        train.add_argument_group("REALM model (RealmConfig)"), RealmConfig, only=REALM_FIELDS
    )
    add_signature_options(
        train.add_argument_group("training (train_realm)"),
        train_realm,
        TRAINING_HELPS,
        types_={"warmup_steps": steps_or_ratio},
    )
    train.add_argument("--push-to-hub", help="repo id for the model; the index goes to <repo id>-index")
    train.set_defaults(func=qa_train)


def configure_eval(evaluate: argparse.ArgumentParser) -> None:
    from ..open_qa import RealmConfig

    evaluate.add_argument("--model", required=True, help="folder or Hub id saved by qa-train")
    evaluate.add_argument("--tokenizer", help="default: --model")
    evaluate.add_argument("--index", required=True, help="document index folder or Hub id")
    evaluate.add_argument("--data", required=True, help="SQuAD JSON or JSON lines with question/answers")
    evaluate.add_argument("--articles", help="SQuAD articles to evaluate on, START:STOP (e.g. 38:)")
    evaluate.add_argument("--max-questions", type=int, help="random subset of the questions (default: all)")
    top_k = RealmConfig.top_k
    evaluate.add_argument(
        "--top-k", type=int, default=top_k, help=f"documents read per question (default: {top_k})"
    )
    evaluate.add_argument("--gold", action="store_true", help="also score the reader on the gold paragraph")
    evaluate.add_argument("--predictions", help="write the predictions to this JSON file")
    evaluate.add_argument("--results", help="write the scores to this JSON file")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the random subset (default: 0)")
    evaluate.set_defaults(func=qa_eval)


__all__ = ["parse_articles", "qa_eval", "qa_train", "random_subset", "read_jsonl", "register"]
