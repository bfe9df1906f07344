"""``hf-knnlm evaluate``: base vs kNN-LM perplexity on a text."""

from __future__ import annotations

import argparse
import json

from ..utils.files import atomic_write_json
from ._common import (
    add_data_args,
    add_knn_args,
    add_model_args,
    add_window_args,
    check_data_args,
    knn_settings,
    load_data,
    load_datastore,
    load_model,
    window_settings,
)


def run(args: argparse.Namespace) -> int:
    from ..knnlm import evaluate_perplexity

    settings, windows = knn_settings(args), window_settings(args)  # bad values fail before any loading
    check_data_args(args)
    store = load_datastore(args)
    model, tokenizer = load_model(args)
    result = evaluate_perplexity(
        model,
        tokenizer,
        load_data(args),
        store,
        settings=settings,
        windows=windows,
        text_column=args.text_column,
        max_tokens=args.max_tokens,
    ).to_dict()
    print(json.dumps(result, indent=2))
    if args.output_json:
        atomic_write_json(args.output_json, result)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="Base vs kNN-LM perplexity on a text.")
    add_model_args(p)
    add_data_args(p)
    add_window_args(p)
    add_knn_args(p)
    p.add_argument(
        "--max-tokens", type=int, default=None, help="Score only the first N tokens (default: all)."
    )
    p.add_argument("--output-json", default=None, help="Also write the result to this JSON file.")
    p.set_defaults(func=run)
