"""``hf-knnlm train-gate``: fit the adaptive-retrieval gate on held-out text, saved with the store."""

from __future__ import annotations

import argparse
import json

from ._common import add_data_args, add_knn_args, add_model_args, add_window_args, load_data, load_model


def run(args: argparse.Namespace) -> int:
    from ..datastore import Datastore
    from ..knnlm.gate_training import train_gate

    model, tokenizer = load_model(args)
    store = Datastore.from_pretrained(args.datastore, nprobe=args.nprobe, gpu=args.gpu)
    gate = train_gate(
        model,
        tokenizer,
        load_data(args),
        store,
        k=args.k,
        temperature=args.temperature,
        recompute_dists=args.recompute_dists,
        use_queries=args.with_queries,
        skip_fraction=args.skip_fraction,
        calibration_fraction=args.calibration_fraction,
        width=args.gate_width,
        weight_decay=args.weight_decay,
        max_length=args.max_length,
        stride=args.stride,
        batch_size=args.batch_size,
        text_column=args.text_column,
        max_tokens=args.max_tokens,
    )
    print(
        json.dumps(
            {"saved_to": str(store.folder / "gate.safetensors"), "skip_below": gate.skip_below, **gate.info}
        )
    )
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train-gate",
        help="Train the adaptive-retrieval gate on held-out text and save it with the datastore.",
    )
    add_model_args(p)
    add_data_args(p)
    add_window_args(p)
    add_knn_args(p)
    p.add_argument(
        "--skip-fraction", type=float, default=0.5, help="Share of tokens not searched (default 0.5)."
    )
    p.add_argument(
        "--calibration-fraction",
        type=float,
        default=0.2,
        help="Share of the text kept out of fitting to set the skip threshold (default 0.2).",
    )
    p.add_argument("--gate-width", type=int, default=16, help="Hidden units of the gate's MLP (default 16).")
    p.add_argument("--weight-decay", type=float, default=1e-2, help="Adam weight decay (default 1e-2).")
    p.add_argument(
        "--with-queries",
        action="store_true",
        help="Also feed the query vector to the gate (needs more text).",
    )
    p.add_argument("--max-tokens", type=int, default=None, help="Use only the first N tokens.")
    p.set_defaults(func=run)
