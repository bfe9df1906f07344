"""``hf-knnlm train-gate``: fit the adaptive-retrieval gate on held-out text, saved with the store."""

from __future__ import annotations

import argparse
import json

from ._common import add_scoring_args, load_scoring
from ._options import add_dataclass_options, dataclass_from_args

SEARCH_FIELDS = ("k", "temperature", "recompute_dists")  # those the kNN-LM will use with the gate


def run(args: argparse.Namespace) -> int:
    from ..knnlm.gate_settings import GateTraining
    from ..knnlm.gate_training import train_gate

    training = dataclass_from_args(args, GateTraining)
    inputs, keywords = load_scoring(args)
    gate = train_gate(*inputs, training=training, **keywords)
    store = inputs[3]
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
    add_scoring_args(p, knn_fields=SEARCH_FIELDS)
    add_dataclass_options(p.add_argument_group("gate"), GateTraining)
    p.set_defaults(func=run)
