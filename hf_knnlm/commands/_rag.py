"""Arguments the ``rag-*`` subcommands share: which retriever, and how it is used."""

from __future__ import annotations

import argparse
import json


def add_retriever_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--retriever", required=True, help="Folder of a BM25 or dense index (rag-index).")
    parser.add_argument(
        "--encoder", default=None, help="Sentence encoder of a dense index (default: recorded)."
    )
    parser.add_argument(
        "--num-documents", type=int, default=None, help="Passages per retrieval (ralm 1, replug 4)."
    )
    parser.add_argument(
        "--retrieval-stride", type=int, default=4, help="Tokens between retrievals (default 4)."
    )
    parser.add_argument(
        "--query-length", type=int, default=32, help="Query = the last N tokens (default 32)."
    )
    parser.add_argument(
        "--replug-temperature", type=float, default=1.0, help="REPLUG weights softmax(score/T)."
    )
    parser.add_argument(
        "--max-document-tokens", type=int, default=256, help="Passage length cap (default 256)."
    )


def num_documents(args: argparse.Namespace) -> int:
    if args.num_documents is not None:
        return args.num_documents
    return 4 if args.method == "replug" else 1


def retrieval_settings(args: argparse.Namespace) -> dict:
    """Keyword arguments of :class:`~hf_knnlm.rag.RetrievalSettings` from the command line."""
    return {
        "num_documents": num_documents(args),
        "retrieval_stride": args.retrieval_stride,
        "query_length": args.query_length,
        "document_temperature": args.replug_temperature,
        "max_document_tokens": args.max_document_tokens,
    }


def print_result(result: dict, output_json: str | None) -> int:
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
