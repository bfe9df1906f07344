"""``hf-knnlm evaluate``: base vs kNN-LM perplexity on a text."""

from __future__ import annotations

import argparse
import json

from ..utils.files import atomic_write_json
from ._common import add_scoring_args, load_scoring


def run(args: argparse.Namespace) -> int:
    from ..knnlm import evaluate_perplexity

    inputs, keywords = load_scoring(args)
    result = evaluate_perplexity(*inputs, **keywords).to_dict()
    print(json.dumps(result, indent=2))
    if args.output_json:
        atomic_write_json(args.output_json, result)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="Base vs kNN-LM perplexity on a text.")
    add_scoring_args(p)
    p.add_argument("--output-json", default=None, help="Also write the result to this JSON file.")
    p.set_defaults(func=run)
