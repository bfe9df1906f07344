"""``hf-knnlm long-evaluate``: perplexity of long documents, each scored from its start, with a
sliding window alone, Unlimiformer, Memorizing Transformers or full attention."""

from __future__ import annotations

import argparse
import json

from ..utils.files import atomic_write_json
from ._common import add_data_args, add_model_args, check_data_args, load_model, positive_int
from ._options import add_dataclass_options, add_signature_options, dataclass_from_args

WINDOW_FIELDS = ("max_length", "stride")
UNLIMIFORMER_FIELDS = ("k", "layer_begin", "max_memory", "sink_tokens")
MEMORIZING_FIELDS = ("layer", "k", "max_memory", "gate_init")
MEMORIZING_PREFIX = "memorizing_"


def attention_settings(args: argparse.Namespace):
    """The settings of ``--method`` (validated: before the model loads)."""
    from ..attention import UnlimiformerSettings

    if getattr(args, "method", "unlimiformer") == "memorizing":
        return memorizing_settings(args)
    windows = {name: getattr(args, name) for name in WINDOW_FIELDS}
    return dataclass_from_args(args, UnlimiformerSettings, UNLIMIFORMER_FIELDS, **windows)


def memorizing_settings(args: argparse.Namespace):
    """The MemorizingSettings of ``--memorizing-*`` and the windows."""
    from ..attention import MemorizingSettings

    windows = {name: getattr(args, name) for name in WINDOW_FIELDS}
    return dataclass_from_args(
        args, MemorizingSettings, MEMORIZING_FIELDS, prefix=MEMORIZING_PREFIX, **windows
    )


def add_unlimiformer_args(parser: argparse.ArgumentParser, *, unlimiformer: bool = True) -> None:
    """The window options (``--max-length``, ``--stride``) and the Unlimiformer ones (``--k``, ...)."""
    from ..attention import UnlimiformerSettings

    add_dataclass_options(parser.add_argument_group("windows"), UnlimiformerSettings, only=WINDOW_FIELDS)
    if unlimiformer:
        add_dataclass_options(
            parser.add_argument_group("unlimiformer"), UnlimiformerSettings, only=UNLIMIFORMER_FIELDS
        )


def add_memorizing_args(parser: argparse.ArgumentParser, *, gate: bool = True) -> None:
    """``--memorizing-layer``, ``--memorizing-k``, ... and, with ``gate``, ``--gate FOLDER``."""
    from ..attention import MemorizingSettings

    group = parser.add_argument_group("memorizing (options prefixed --memorizing-)")
    add_dataclass_options(group, MemorizingSettings, only=MEMORIZING_FIELDS, prefix=MEMORIZING_PREFIX)
    if gate:
        group.add_argument(
            "--gate",
            default=None,
            help="Folder with a trained gate (memorizing_gate.safetensors) (default: none).",
        )


def add_document_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-tokens",
        type=positive_int,
        default=None,
        help="Keep the first N tokens of each document (default: all).",
    )


def documents(args: argparse.Namespace, tokenizer) -> list:
    """Token ids of every document (one per --data file, one per dataset row), the first --max-tokens."""
    import torch

    from ..lm.corpus import iter_documents, read_text_file

    texts = (
        [read_text_file(p) for p in args.data]
        if args.data
        else iter_documents(load_rows(args), args.text_column)
    )
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][: args.max_tokens]
        if len(ids) > 1:
            out.append(torch.tensor(ids))
    if not out:
        raise ValueError("no document has 2 tokens or more; pass longer documents (--data or --dataset).")
    return out


def load_rows(args: argparse.Namespace):
    from datasets import load_dataset

    return load_dataset(args.dataset, args.dataset_config, split=args.split)


def run(args: argparse.Namespace) -> int:
    from ..attention import long_context_perplexity

    settings = attention_settings(args)
    if args.gate is not None and args.method != "memorizing":
        raise ValueError(f"--gate {args.gate} is a Memorizing Transformers gate; add --method memorizing.")
    check_data_args(args)
    model, tokenizer = load_model(args)
    result = long_context_perplexity(
        model,
        documents(args, tokenizer),
        method=args.method,
        settings=settings,
        score_from=args.score_from,
        gate=args.gate,
    )
    result["settings"] = settings.to_dict() if args.method != "full" else {}
    print(json.dumps(result, indent=2))
    if args.output_json:
        atomic_write_json(args.output_json, result)
    return 0


def configure(p: argparse.ArgumentParser) -> None:
    from ..attention import long_context_perplexity
    from ..attention.settings import METHODS

    p.add_argument(
        "--method",
        choices=METHODS,
        default="unlimiformer",
        help="window: sliding windows alone; unlimiformer: + the top-k keys of the whole preceding "
        "document; memorizing: + one layer's gated kNN memory; full: one pass over the whole document "
        "(default: unlimiformer).",
    )
    add_model_args(p)
    add_data_args(p)
    add_document_args(p)
    add_signature_options(
        p, long_context_perplexity, {"score_from": "First scored position of each document"}
    )
    add_unlimiformer_args(p)
    add_memorizing_args(p)
    p.add_argument("--output-json", default=None, help="Also write the result to this JSON file.")
    p.set_defaults(func=run)


def register(subparsers) -> None:
    subparsers.add_parser(
        "long-evaluate",
        configure=configure,
        help="Perplexity of long documents: window, Unlimiformer, Memorizing Transformers or full attention.",
    )
