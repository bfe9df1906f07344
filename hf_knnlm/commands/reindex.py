"""``hf-knnlm reindex``: copy a datastore with a new faiss index over the same keys (no model run)."""

from __future__ import annotations

import argparse

from ._common import add_index_args


def run(args: argparse.Namespace) -> int:
    from ..datastore import Datastore

    store = Datastore.from_pretrained(args.datastore)
    print(
        store.rebuild_index(
            args.index_factory, args.output, train_size=args.train_size, overwrite=args.overwrite
        )
    )
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("reindex", help="Copy a datastore with a new faiss index over the same keys.")
    p.add_argument("--datastore", required=True, help="Datastore folder or Hub repo id.")
    p.add_argument("--output", required=True, help="New datastore folder.")
    add_index_args(p, required=True)
    p.set_defaults(func=run)
