"""``hf-knnlm train-gate``: fit the adaptive-retrieval gate on held-out text, saved with the store."""

from __future__ import annotations

import argparse
import json

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
from ._options import add_dataclass_options, dataclass_from_args

SEARCH_FIELDS = ("k", "temperature", "recompute_dists")  # those the kNN-LM will use with the gate


def run(args: argparse.Namespace) -> int:
    from ..knnlm.gate_settings import GateTraining
    from ..knnlm.gate_training import train_gate

    settings, windows = knn_settings(args), window_settings(args)
    training = dataclass_from_args(args, GateTraining)
    check_data_args(args)
    store = load_datastore(args)
    model, tokenizer = load_model(args)
    gate = train_gate(
        model,
        tokenizer,
        load_data(args),
        store,
        settings=settings,
        windows=windows,
        training=training,
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
    from ..knnlm.gate_settings import GateTraining

    p = subparsers.add_parser(
        "train-gate",
        help="Train the adaptive-retrieval gate on held-out text and save it with the datastore.",
    )
    add_model_args(p)
    add_data_args(p)
    add_window_args(p)
    add_knn_args(p, only=SEARCH_FIELDS)
    add_dataclass_options(p.add_argument_group("gate"), GateTraining)
    p.add_argument("--max-tokens", type=int, default=None, help="Use only the first N tokens (default: all).")
    p.set_defaults(func=run)
