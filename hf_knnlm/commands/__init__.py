"""``hf-knnlm``: one module per subcommand, each with ``register(subparsers)`` and ``run(args)``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..faiss_support import MissingDependencyError
from . import build, demo, evaluate, generate, push, qa, rag_evaluate, rag_generate, rag_index, reindex, tune

# The order of ``hf-knnlm --help``.
SUBCOMMANDS = (
    build,
    evaluate,
    generate,
    tune,
    reindex,
    push,
    demo,
    qa,
    rag_index,
    rag_evaluate,
    rag_generate,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-knnlm", description="kNN-LM and REALM for transformers.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileExistsError, FileNotFoundError, MissingDependencyError) as err:
        print(f"hf-knnlm {args.command}: error: {err}", file=sys.stderr)
        return 2


__all__ = ["build_parser", "main"]
