"""``hf-knnlm``: one module per subcommand, each with ``register(subparsers)`` and ``run(args)``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import (
    build,
    compress,
    demo,
    evaluate,
    explain,
    generate,
    long_evaluate,
    long_generate,
    memorizing_train,
    push,
    qa,
    qa_train_reader,
    rag_evaluate,
    rag_generate,
    rag_index,
    realm_pretrain,
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
    long_evaluate,
    long_generate,
    memorizing_train,
    tune,
    reindex,
    compress,
    train_gate,
    explain,
    push,
    demo,
    qa_train_reader,
    qa,
    realm_pretrain,
    rag_index,
    rag_evaluate,
    rag_generate,
)


class Subparsers:
    """``add_subparsers()`` whose verbs may configure their options lazily: a verb registered with
    ``configure=`` gets its options only when it is the one that runs (or when every verb is built), so
    starting the CLI imports nothing heavy for the verbs it does not run."""

    def __init__(self, subparsers, chosen: str | None) -> None:
        self._subparsers, self.chosen = subparsers, chosen

    def add_parser(self, name: str, *, configure=None, **kwargs) -> argparse.ArgumentParser:
        parser = self._subparsers.add_parser(name, **kwargs)
        if configure is not None and self.chosen in (None, name):
            configure(parser)
        return parser


def _chosen(argv: Sequence[str] | None) -> str | None:
    """The verb ``argv`` runs (the first argument that is not an option); ``""`` when it names none, as in
    ``hf-knnlm --help``, whose list of verbs needs none of their options (building them all imported
    torch, transformers and datasets: 18 s on a loaded 2-core CPU); None (no ``argv``) builds them all."""
    return next((a for a in argv if not a.startswith("-")), "") if argv is not None else None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``hf-knnlm`` parser; with ``argv``, only the verb it runs has its options built."""
    parser = ArgumentParser(
        prog="hf-knnlm", description="kNN-LM, REALM, RAG and retrieval inside attention for transformers."
    )
    subparsers = Subparsers(parser.add_subparsers(dest="command", required=True), _chosen(argv))
    for command in SUBCOMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command(build_parser(argv).parse_args(argv))


__all__ = ["Subparsers", "build_parser", "main"]
