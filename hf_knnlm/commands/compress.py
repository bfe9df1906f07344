"""``hf-knnlm compress``: a smaller copy of a datastore (PCA of the keys, pruning by merging)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..datastore.index import DEFAULT_NPROBE, DEFAULT_TRAIN_SIZE


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file() and not f.name.startswith("."))


def run(args: argparse.Namespace) -> int:
    from ..datastore import Datastore
    from ..datastore.compress import compress_datastore

    store = Datastore.from_pretrained(args.datastore, nprobe=args.nprobe)
    small = compress_datastore(
        store,
        args.output,
        pca_dim=args.pca_dim,
        prune_to=args.prune_to,
        merge_k=args.merge_k,
        index_factory=args.index_factory,
        train_size=args.train_size,
        overwrite=args.overwrite,
    )
    report = {
        "entries": [len(store), len(small)],
        "key_dim": [store.key_dim, small.key_dim],
        "bytes": [folder_bytes(store.folder), folder_bytes(small.folder)],
        "output": str(small.folder),
    }
    report["size_ratio"] = round(report["bytes"][1] / report["bytes"][0], 4)
    print(json.dumps(report, indent=2))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compress", help="Write a smaller datastore: PCA of the keys and/or pruning by merging entries."
    )
    p.add_argument("--datastore", required=True, help="Datastore folder or Hub repo id.")
    p.add_argument("--output", required=True, help="Folder of the new, smaller datastore.")
    p.add_argument(
        "--pca-dim", type=int, default=None, help="Keep this many PCA dimensions of the keys (default: all)."
    )
    p.add_argument(
        "--prune-to",
        type=float,
        default=None,
        help="Keep this fraction of the entries, by greedy merging (default: all).",
    )
    p.add_argument(
        "--merge-k", type=int, default=8, help="Neighbours searched per entry to merge (default: 8)."
    )
    p.add_argument(
        "--index-factory", default=None, help="faiss index of the new store (default: the source's, shrunk)."
    )
    p.add_argument(
        "--train-size",
        type=int,
        default=DEFAULT_TRAIN_SIZE,
        help=f"Keys sampled to train PCA and index (default: {DEFAULT_TRAIN_SIZE}).",
    )
    p.add_argument(
        "--nprobe",
        type=int,
        default=DEFAULT_NPROBE,
        help=f"IVF lists probed when searching merge candidates (default: {DEFAULT_NPROBE}).",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="Replace a finished datastore in --output (default: off)."
    )
    p.set_defaults(func=run)
