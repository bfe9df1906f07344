"""``hf-knnlm rag-evaluate``: base vs In-Context RALM / REPLUG perplexity (optionally + kNN-LM)."""

from __future__ import annotations

import argparse

from ._common import (
    add_data_args,
    add_max_tokens_arg,
    add_model_args,
    add_window_args,
    check_data_args,
    knn_settings,
    load_data,
    load_model,
    window_settings,
)
from ._options import add_dataclass_options
from ._rag import add_retriever_args, load_retriever, print_result, retrieval_settings

KNN_FIELDS = ("k", "lmbda", "temperature", "recompute_dists")


def run(args: argparse.Namespace) -> int:
    from ..rag import evaluate_retrieval_perplexity

    retrieval, knn, windows = retrieval_settings(args), knn_settings(args), window_settings(args)
    check_data_args(args)
    retriever = load_retriever(args)  # before the model: a wrong folder fails at once
    store = None
    if args.datastore:
        from ..datastore import Datastore

        store = Datastore.from_pretrained(args.datastore)
    model, tokenizer = load_model(args)
    result = evaluate_retrieval_perplexity(
        model,
        tokenizer,
        load_data(args),
        retriever,
        retrieval=retrieval,
        datastore=store,
        knn=knn,
        windows=windows,
        text_column=args.text_column,
        max_tokens=args.max_tokens,
    )
    return print_result(result, args.output_json)


def register(subparsers) -> None:
    from ..knnlm.settings import KNNSettings

    p = subparsers.add_parser("rag-evaluate", help="Base vs In-Context RALM / REPLUG perplexity on a text.")
    p.add_argument("--method", choices=["ralm", "replug"], default="ralm", help="(default: ralm).")
    add_retriever_args(p)
    add_model_args(p)
    add_data_args(p)
    add_window_args(p)
    p.add_argument(
        "--datastore",
        default=None,
        help="Also mix this kNN-LM datastore into In-Context RALM (default: none).",
    )
    add_dataclass_options(p.add_argument_group("kNN-LM (with --datastore)"), KNNSettings, only=KNN_FIELDS)
    add_max_tokens_arg(p)
    p.add_argument("--output-json", default=None, help="Also write the result to this JSON file.")
    p.set_defaults(func=run)
