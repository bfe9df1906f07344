"""``hf-knnlm rag-evaluate``: base vs In-Context RALM / REPLUG perplexity (optionally + kNN-LM)."""

from __future__ import annotations

import argparse

from ._common import add_data_args, add_model_args, add_window_args, load_data, load_model
from ._rag import add_retriever_args, load_retriever, print_result, retrieval_settings

WINDOW_ARGS = ("max_length", "stride", "batch_size", "text_column", "max_tokens")


def run(args: argparse.Namespace) -> int:
    from ..rag import evaluate_retrieval_perplexity

    retriever = load_retriever(args)  # before the model: a wrong folder fails at once
    model, tokenizer = load_model(args)
    knn = {}
    if args.datastore:
        from ..datastore import Datastore

        knn = dict(
            datastore=Datastore.from_pretrained(args.datastore),
            k=args.k,
            lmbda=args.lmbda,
            temperature=args.temperature,
        )
    windows = {name: getattr(args, name) for name in WINDOW_ARGS}
    settings = retrieval_settings(args)
    result = evaluate_retrieval_perplexity(
        model, tokenizer, load_data(args), retriever, **settings, **windows, **knn
    )
    return print_result(result, args.output_json)


def register(subparsers) -> None:
    p = subparsers.add_parser("rag-evaluate", help="Base vs In-Context RALM / REPLUG perplexity on a text.")
    p.add_argument("--method", choices=["ralm", "replug"], default="ralm")
    add_retriever_args(p)
    add_model_args(p)
    add_data_args(p)
    add_window_args(p)
    p.add_argument("--datastore", default=None, help="Also mix this kNN-LM datastore into In-Context RALM.")
    p.add_argument("--k", type=int, default=1024, help="kNN-LM neighbours (default 1024).")
    p.add_argument("--lmbda", type=float, default=0.25, help="kNN-LM weight in [0, 1] (default 0.25).")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="kNN-LM distance temperature (default: the datastore's calibrated temperature).",
    )
    p.add_argument("--max-tokens", type=int, default=None, help="Score only the first N tokens.")
    p.add_argument("--output-json", default=None, help="Also write the result to this JSON file.")
    p.set_defaults(func=run)
