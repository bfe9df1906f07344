"""``hf-knnlm qa-train-reader``: extractive-QA fine-tuning that warm-starts a REALM reader.

The output folder is a standard question-answering checkpoint (``pipeline("question-answering")`` loads it)
that ``hf-knnlm qa-train --reader`` takes. Training rows come from SQuAD JSON (``--articles`` picks the
articles) or JSON lines with ``question``, ``context`` and ``answers`` (``{"text": [...], "answer_start":
[...]}`` or a list of answer strings, located in the context).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..utils.files import atomic_write_json
from ._common import positive_int
from ._options import add_signature_options, values
from .qa import LOGGING_RATIO, logged_losses, parse_articles, random_subset, read_jsonl, steps_or_ratio


def load_reader_rows(path: str, articles: str | None = None):
    from ..open_qa import load_squad

    if Path(path).suffix == ".json":
        return load_squad(path, articles=parse_articles(articles))
    if articles:
        raise ValueError(
            "--articles only applies to SQuAD JSON files; select rows of a .jsonl file yourself."
        )
    return read_jsonl(Path(path))


def run(args: argparse.Namespace) -> int:
    """Train, save the checkpoint and print a JSON summary (also written to ``reader_training.json``)."""
    from transformers import set_seed

    from ..open_qa import train_reader

    set_seed(args.seed)
    rows = random_subset(load_reader_rows(args.train, args.articles), args.max_questions, args.seed)
    started = time.perf_counter()
    trainer = train_reader(
        args.model,
        rows,
        output_dir=args.output_dir,
        logging_steps=LOGGING_RATIO,
        **values(args, HELPS),
        bf16=args.bf16,
        use_cpu=args.cpu,
    )
    summary = {
        "model": args.model,
        "train_questions": len(rows),
        "steps": trainer.state.global_step,
        "train_seconds": round(time.perf_counter() - started, 1),
        **logged_losses(trainer),
    }
    atomic_write_json(Path(args.output_dir) / "reader_training.json", summary)
    print(json.dumps(summary, indent=2))
    return 0


HELPS = {
    "max_length": "Tokens per window",
    "doc_stride": "Overlap of consecutive windows of a long context",
    "epochs": "Training epochs",
    "max_steps": "Stop after this many steps (-1: the epochs decide)",
    "batch_size": "Windows per step",
    "learning_rate": "Peak learning rate",
    "warmup_ratio": "Warm-up, a ratio of all steps (or a step count when >= 1)",
    "weight_decay": "AdamW weight decay",
    "seed": "Seed of the run (and of a fresh QA head)",
    "save_every_epoch": "Also keep <output-dir>-epoch-N after every epoch",
    "save_steps": "Keep a checkpoint every N steps; a stopped run resumes when rerun with the same options",
}


def register(subparsers: Any) -> None:
    subparsers.add_parser(
        "qa-train-reader",
        help="fine-tune an extractive QA reader (a standard question-answering checkpoint) for qa-train",
        configure=configure,
    )


def configure(parser: argparse.ArgumentParser) -> None:
    """The options, from train_reader's signature (built when the verb runs: it imports transformers)."""
    from ..open_qa import train_reader

    parser.add_argument(
        "--model", required=True, help="encoder or QA checkpoint to start from (folder or id)"
    )
    parser.add_argument(
        "--train", required=True, help="SQuAD JSON, or JSON lines with question/context/answers"
    )
    parser.add_argument("--articles", help="SQuAD articles to train on, START:STOP (e.g. 0:38)")
    parser.add_argument("--output-dir", required=True, help="where the checkpoint and tokenizer are saved")
    parser.add_argument("--max-questions", type=int, help="random subset of the training questions")
    add_signature_options(
        parser.add_argument_group("training (train_reader)"),
        train_reader,
        HELPS,
        types_={"warmup_ratio": steps_or_ratio, "save_steps": positive_int},
    )
    parser.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (default: off)")
    parser.add_argument(
        "--cpu", action="store_true", help="train on the CPU even if a GPU is visible (default: off)"
    )
    parser.set_defaults(func=run)


__all__ = ["load_reader_rows", "register", "run"]
