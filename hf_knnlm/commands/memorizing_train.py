"""``hf-knnlm memorizing-train``: fine-tune the gate of a Memorizing Transformer on long documents."""

from __future__ import annotations

import argparse
import json

from ._common import add_data_args, add_model_args, check_data_args, load_model
from ._options import add_signature_options, values
from .long_evaluate import (
    add_document_args,
    add_memorizing_args,
    add_unlimiformer_args,
    documents,
    memorizing_settings,
)

TRAINING_HELPS = {
    "learning_rate": "Adam's step on the gate biases",
    "epochs": "Passes over the documents",
    "seed": "The Trainer's seed",
}


def run(args: argparse.Namespace) -> int:
    from ..attention import MemorizingTransformer, train_memorizing_gate

    settings = memorizing_settings(args)
    check_data_args(args)
    model, tokenizer = load_model(args)
    memorizing = MemorizingTransformer(model, settings)
    result = train_memorizing_gate(
        memorizing, documents(args, tokenizer), args.output_dir, **values(args, TRAINING_HELPS)
    )
    print(json.dumps({**result, "settings": settings.to_dict()}, indent=2))
    return 0


def configure(p: argparse.ArgumentParser) -> None:
    from ..attention import train_memorizing_gate

    add_model_args(p)
    add_data_args(p)
    add_document_args(p)
    add_unlimiformer_args(p, unlimiformer=False)
    p.add_argument("--output-dir", required=True, help="Where memorizing_gate.safetensors is written.")
    add_memorizing_args(p, gate=False)
    add_signature_options(p.add_argument_group("training"), train_memorizing_gate, TRAINING_HELPS)
    p.set_defaults(func=run)


HELP = "Fine-tune the gate of a Memorizing Transformer (with Trainer) on long documents."


def register(subparsers) -> None:
    subparsers.add_parser("memorizing-train", configure=configure, help=HELP)
