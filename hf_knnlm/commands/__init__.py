"""``hf-knnlm``: one module per subcommand, each with ``register(subparsers)`` and ``run(args)``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from . import (
    build,
    compress,
    demo,
    evaluate,
    explain,
    generate,
    push,
    qa,
    qa_train_reader,
    rag_evaluate,
    rag_generate,
    rag_index,
    reindex,
    train_gate,
    tune,
)
from ._common import ArgumentParser, run_command

# The order of ``hf-knnlm --help``.
SUBCOMMANDS = (
    build,
    evaluate,
    generate,
    tune,
    reindex,
    compress,
    train_gate,
    explain,
    push,
    demo,
    qa_train_reader,
    qa,
    rag_index,
    rag_evaluate,
    rag_generate,
)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="hf-knnlm", description="kNN-LM and REALM for transformers.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    return run_command(parser.parse_args(argv))


__all__ = ["build_parser", "main"]
