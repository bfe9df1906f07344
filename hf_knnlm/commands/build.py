"""``hf-knnlm build``: a datastore from a corpus (resumes if killed)."""

from __future__ import annotations

import argparse

from ..datastore.shards import DEFAULT_MAX_SHARD_SIZE
from ._common import (
    add_data_args,
    add_index_args,
    add_model_args,
    add_window_args,
    check_data_args,
    load_data,
    load_model,
    size,
    window_settings,
)


def run(args: argparse.Namespace) -> int:
    from ..datastore import Datastore

    windows = window_settings(args).resolve()  # bad windows fail before the model loads
    check_data_args(args)
    model, tokenizer = load_model(args)
    store = Datastore.build(
        model,
        tokenizer,
        load_data(args),
        args.output,
        max_length=windows.max_length,
        stride=windows.stride,
        batch_size=windows.batch_size,
        text_column=args.text_column,
        index_factory=args.index_factory,
        hook_module=args.hook_module,
        max_shard_size=args.max_shard_size,
        train_size=args.train_size,
        overwrite=args.overwrite,
        shard_per_rank=args.shard_per_rank,
    )
    print(store)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("build", help="Build a datastore from a corpus.")
    add_model_args(p)
    add_data_args(p)
    add_window_args(p)
    p.add_argument("--output", required=True, help="Datastore folder to write (resumes if killed).")
    add_index_args(p)
    p.add_argument(
        "--hook-module",
        default=None,
        help="FFN module path, if the model is not in the table (default: the table's).",
    )
    p.add_argument(
        "--max-shard-size",
        type=size,
        default=DEFAULT_MAX_SHARD_SIZE,
        help=f"Largest keys shard (default: {DEFAULT_MAX_SHARD_SIZE}).",
    )
    p.add_argument(
        "--shard-per-rank",
        action="store_true",
        help="Under accelerate launch / torchrun, every process writes the shards and IVF lists of its own "
        "entries (one shared quantizer); open with distributed='shard' on as many processes.",
    )
    p.set_defaults(func=run)
