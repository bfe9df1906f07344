"""Arguments the ``rag-*`` subcommands share: which retriever, and how it is used.

The retrieval options are generated from [`RetrievalSettings`][hf_knnlm.rag.RetrievalSettings], with one
exception: ``--num-documents`` defaults to the method's own (1 for In-Context RALM, ``REPLUGProcessor``'s
``k`` for REPLUG).
"""

from __future__ import annotations

import argparse
import inspect
import json

from ..rag.settings import RetrievalSettings
from ._options import add_dataclass_options, dataclass_from_args


def replug_documents() -> int:
    """REPLUG's default number of passages: ``REPLUGProcessor``'s ``k``."""
    from ..rag import REPLUGProcessor

    return inspect.signature(REPLUGProcessor.__init__).parameters["k"].default


def add_retriever_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--retriever", required=True, help="Folder of a BM25 or dense index (rag-index).")
    parser.add_argument(
        "--encoder", default=None, help="Sentence encoder of a dense index (default: the one it recorded)."
    )
    helps = {"num_documents": "Passages per retrieval (default: 1 for ralm, REPLUGProcessor's k for replug)."}
    add_dataclass_options(parser.add_argument_group("retrieval"), RetrievalSettings, helps=helps)
    parser.set_defaults(num_documents=None)


def num_documents(args: argparse.Namespace) -> int:
    if args.num_documents is not None:
        return args.num_documents
    return replug_documents() if args.method == "replug" else RetrievalSettings.num_documents


def retrieval_settings(args: argparse.Namespace) -> RetrievalSettings:
    """The [`RetrievalSettings`][hf_knnlm.rag.RetrievalSettings] of the command line (validated)."""
    settings = dataclass_from_args(
        args, RetrievalSettings, [n for n in RetrievalSettings.__dataclass_fields__ if n != "num_documents"]
    )
    return settings.replace(num_documents=num_documents(args))


def print_result(result, output_json: str | None) -> int:
    """Print the result as JSON (and write it to ``output_json``); the command's exit status."""
    from ..utils.files import atomic_write_json

    result = result.to_dict() if hasattr(result, "to_dict") else result
    print(json.dumps(result, indent=2))
    if output_json:
        atomic_write_json(output_json, result)
    return 0


def load_retriever(args: argparse.Namespace):
    from ..retrieval.loading import load_retriever as load

    return load(args.retriever, encoder=args.encoder)
