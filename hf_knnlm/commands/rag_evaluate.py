"""``hf-knnlm rag-evaluate``: base vs In-Context RALM / REPLUG perplexity (optionally + kNN-LM)."""

from __future__ import annotations

import argparse
import json

from ..files import atomic_write_json
from ._common import add_data_args, add_model_args, add_window_args, load_data, load_model
from ._rag import add_retriever_args, load_retriever, num_documents


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
            knn_temperature=args.temperature,
        )
    result = evaluate_retrieval_perplexity(
        model,
        tokenizer,
        load_data(args),
        retriever,
        num_documents=num_documents(args),
        retrieval_stride=args.retrieval_stride,
        query_length=args.query_length,
        temperature=args.replug_temperature,
        max_document_tokens=args.max_document_tokens,
        max_length=args.max_length,
        stride=args.stride,
        batch_size=args.batch_size,
        text_column=args.text_column,
        max_tokens=args.max_tokens,
        **knn,
    )
    print(json.dumps(result, indent=2))
    if args.output_json:
        atomic_write_json(args.output_json, result)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("rag-evaluate", help="Base vs In-Context RALM / REPLUG perplexity on a text.")
    add_model_args(p)
    add_data_args(p)
    add_window_args(p)
    p.add_argument("--method", choices=["ralm", "replug"], default="ralm")
    add_retriever_args(p)
    p.add_argument("--datastore", default=None, help="Also mix this kNN-LM datastore into In-Context RALM.")
    p.add_argument("--k", type=int, default=1024, help="kNN-LM neighbours (default 1024).")
    p.add_argument("--lmbda", type=float, default=0.25, help="kNN-LM weight in [0, 1] (default 0.25).")
    p.add_argument("--temperature", type=float, default=1.0, help="kNN-LM distance temperature (default 1).")
    p.add_argument("--max-tokens", type=int, default=None, help="Score only the first N tokens.")
    p.add_argument("--output-json", default=None, help="Also write the result to this JSON file.")
    p.set_defaults(func=run)
