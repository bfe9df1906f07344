"""``hf-knnlm realm-pretrain``: REALM pre-training of a retriever and an encoder on your own corpus.

The documents are SQuAD JSON (every paragraph is one) or JSON lines with ``title``/``text`` (and optionally
``id``). The output folder holds the pre-trained model and the ``retriever/`` and ``reader/`` checkpoints
that ``hf-knnlm qa-train --encoder <output>/retriever --reader <output>/reader`` (or
``open_qa_from_pretraining``) fine-tunes for open-domain QA. With ``--save-steps`` a stopped run resumes
when rerun with the same command.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ._common import positive_int
from ._options import (
    add_dataclass_options,
    add_signature_options,
    dataclass_from_args,
    docstring_args,
    values,
)
from .qa import load_documents, random_subset, steps_or_ratio

# The model options: RealmMaskedLMConfig fields (help: the RealmConfig / RealmMaskedLMConfig docstrings).
MODEL_FIELDS = (
    "retriever_pooling",
    "retriever_proj_size",
    "retriever_normalize",
    "retriever_score_scale",
    "share_retriever_encoders",
    "null_document",
    "top_k",
    "max_question_length",
    "max_reader_length",
    "max_doc_embed_length",
)
# The training options: parameters of pretrain_realm (defaults read from its signature).
HELPS = {
    "epochs": "Training epochs over the masked sentences",
    "max_steps": "Stop after this many steps (-1: the epochs decide)",
    "batch_size": "Masked sentences per step",
    "learning_rate": "Peak learning rate",
    "retriever_learning_rate": "Learning rate of the query and document encoders (none: --learning-rate; "
    "0 keeps them)",
    "warmup_steps": "Warm-up steps, or a ratio of all steps when below 1",
    "weight_decay": "AdamW weight decay",
    "seed": "Seed of the run",
    "logging_steps": "Log the loss and the index staleness every N steps",
    "save_steps": "Keep a checkpoint every N steps; a stopped run resumes when rerun with the same options",
    "index_batch_size": "Documents per batch when the corpus is embedded",
}


def run(args: argparse.Namespace) -> int:
    """Pre-train, save the checkpoint folder and print the summary (also in ``pretraining.json``)."""
    from transformers import AutoTokenizer, set_seed

    from ..open_qa.pretraining import (
        RealmForMaskedLM,
        RealmPretrainingSettings,
        head_warm_start,
        ict_warm_start,
        masked_examples,
        pretrain_realm,
    )

    # Bad values fail before anything loads; --seed seeds the span choices too.
    settings = dataclass_from_args(args, RealmPretrainingSettings)
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.retriever)
    documents = random_subset(load_documents(args.documents), args.max_documents, args.seed)
    model = RealmForMaskedLM.from_encoders(args.retriever, args.encoder, **values(args, MODEL_FIELDS))
    started = time.perf_counter()
    ict = (
        ict_warm_start(model, tokenizer, documents, steps=args.ict_steps, seed=args.seed)
        if args.ict_steps
        else []
    )
    ict_seconds = time.perf_counter() - started
    rows = masked_examples(documents, tokenizer, settings, max_length=model.config.max_question_length)
    head = (
        head_warm_start(
            model,
            tokenizer,
            rows,
            steps=args.head_warmup_steps,
            learning_rate=args.learning_rate,
            head_learning_rate=args.head_learning_rate,
            seed=args.seed,
        )  # fmt: skip
        if args.head_warmup_steps
        else []
    )
    head_seconds = time.perf_counter() - started - ict_seconds
    pretrain_realm(
        model, tokenizer, documents, output_dir=args.output_dir, settings=settings, examples=rows,
        bf16=args.bf16, use_cpu=args.cpu, **values(args, HELPS),
    )  # fmt: skip
    summary = json.loads((Path(args.output_dir) / "pretraining.json").read_text(encoding="utf-8"))
    summary |= {
        "retriever": args.retriever,
        "documents": len(documents),
        "ict_losses": [round(loss, 4) for loss in ict],
        "ict_seconds": round(ict_seconds, 1),
        "head_warmup_losses": [round(loss, 4) for loss in head],
        "head_warmup_seconds": round(head_seconds, 1),
        "train_seconds": round(time.perf_counter() - started - ict_seconds - head_seconds, 1),
    }
    print(json.dumps(summary, indent=2))
    return 0


def register(subparsers: Any) -> None:
    subparsers.add_parser(
        "realm-pretrain",
        help="REALM pre-training: a retrieval-augmented masked LM on your documents, for qa-train",
        configure=configure,
    )


def configure(parser: argparse.ArgumentParser) -> None:
    """The options, from RealmMaskedLMConfig, RealmPretrainingSettings and pretrain_realm's signature."""
    from ..open_qa import RealmConfig
    from ..open_qa.pretraining import RealmMaskedLMConfig, RealmPretrainingSettings, pretrain_realm

    parser.add_argument(
        "--retriever",
        required=True,
        help="encoder checkpoint of the query and document embedders (folder or id)",
    )
    parser.add_argument(
        "--encoder", help="checkpoint of the knowledge-augmented encoder (default: --retriever)"
    )
    parser.add_argument("--tokenizer", help="tokenizer folder or id (default: --retriever)")
    parser.add_argument("--documents", required=True, help="SQuAD JSON or JSON lines with title/text")
    parser.add_argument(
        "--max-documents", type=positive_int, help="random subset of the documents (default: all)"
    )
    parser.add_argument("--output-dir", required=True, help="where the pre-trained checkpoints are saved")
    add_dataclass_options(
        parser.add_argument_group("model (RealmMaskedLMConfig)"),
        RealmMaskedLMConfig,
        only=MODEL_FIELDS,
        helps=docstring_args(RealmConfig),
    )
    add_dataclass_options(
        parser.add_argument_group("masking, retrieval, refresh (RealmPretrainingSettings)"),
        RealmPretrainingSettings,
        exclude=("format_version", "seed"),
    )
    add_signature_options(
        parser.add_argument_group("training (pretrain_realm)"),
        pretrain_realm,
        HELPS,
        types_={"warmup_steps": steps_or_ratio, "save_steps": positive_int},
    )
    parser.add_argument(
        "--ict-steps",
        type=int,
        default=0,
        help="warm-start the retriever with N ICT steps first (default: 0)",
    )
    parser.add_argument(
        "--head-warmup-steps",
        type=int,
        default=0,
        help="train a fresh masked-LM head with N plain masked-LM steps first, the null document only "
        "(for an encoder checkpoint without one, e.g. all-MiniLM-L6-v2; default: 0)",
    )
    parser.add_argument(
        "--head-learning-rate",
        type=float,
        default=1e-3,
        help="learning rate of the head's own parameters in that warm start (default: 1e-3)",
    )
    parser.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (default: off)")
    parser.add_argument(
        "--cpu", action="store_true", help="train on the CPU even if a GPU is visible (default: off)"
    )
    parser.set_defaults(func=run)


__all__ = ["register", "run"]
