"""``hf-knnlm build``: a datastore from a corpus (resumes if killed)."""

from __future__ import annotations

import argparse

from ._common import (
    add_data_args,
    add_index_args,
    add_model_args,
    add_window_args,
    load_data,
    load_model,
    size,
)


def run(args: argparse.Namespace) -> int:
    from ..datastore import Datastore

    model, tokenizer = load_model(args)
    store = Datastore.build(
        model,
        tokenizer,
        load_data(args),
        args.output,
        max_length=args.max_length,
        stride=args.stride,
        batch_size=args.batch_size,
        text_column=args.text_column,
        index_factory=args.index_factory,
        hook_module=args.hook_module,
        max_shard_size=args.max_shard_size,
        train_size=args.train_size,
        overwrite=args.overwrite,
    )
    print(store)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("build", help="Build a datastore from a corpus.")
    add_model_args(p)
    add_data_args(p)
    add_window_args(p)
    p.add_argument("--output", required=True, help="Datastore folder to write (resumes if killed).")
    add_index_args(p, default_factory="Flat")
    p.add_argument("--hook-module", default=None, help="FFN module path, if the model is not in the table.")
    p.add_argument("--max-shard-size", type=size, default="5GB", help="Largest keys shard (default 5GB).")
    p.set_defaults(func=run)
