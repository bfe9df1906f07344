"""What the ``hf-knnlm`` subcommands share: the parser, error handling, argument groups, loaders.

Every error reaches the user as one line, ``hf-knnlm <command>: error: <what and the fix>``, and a
non-zero exit status (2 for bad input, 1 for anything unexpected); ``--debug`` re-raises it with
its traceback instead.
"""

from __future__ import annotations

import argparse
import sys

# Errors that mean "the input is wrong" (files, values, ids, network): the message is the report.
USER_ERRORS = (ValueError, OSError, ImportError, LookupError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors and ``--debug`` on the program and every subcommand."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,  # a subcommand's default must not undo `hf-knnlm --debug <cmd>`
            help="Show the traceback of an error instead of its one-line summary.",
        )

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line; unexpected error types also say how to see more."""
    text = " ".join(str(err).split()) or type(err).__name__
    if not isinstance(err, USER_ERRORS):
        text = f"{type(err).__name__}: {text} (run with --debug for the traceback)"
    return text


def run_command(args: argparse.Namespace) -> int:
    """Run the chosen subcommand; report an error in one line unless ``--debug`` was given."""
    debug = getattr(args, "debug", False)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"hf-knnlm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        print(f"hf-knnlm {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2 if isinstance(err, USER_ERRORS) else 1


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hub id or local path of the causal LM.")
    parser.add_argument(
        "--gguf-file", default=None, help="GGUF file name inside --model (e.g. SmolLM2...gguf)."
    )
    parser.add_argument("--tokenizer", default=None, help="Tokenizer id/path if it differs from --model.")
    parser.add_argument("--revision", default=None, help="Model revision on the Hub.")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--device", default=None, help="e.g. cuda:0; default: where the model loads.")


def add_data_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--data", nargs="+", help="UTF-8 text file(s); each file is one document.")
    group.add_argument("--dataset", help="A `datasets` dataset name or local data folder/file.")
    parser.add_argument("--dataset-config", default=None, help="Dataset configuration name.")
    parser.add_argument("--split", default="train", help="Dataset split (default: train).")
    parser.add_argument("--text-column", default="text", help="Column holding the text (default: text).")


def add_window_args(parser: argparse.ArgumentParser, *, from_datastore: bool = False) -> None:
    """``--max-length``, ``--stride``, ``--batch-size``; scoring defaults to the datastore's windows."""
    if from_datastore:
        recorded = "default: those the datastore was built with, else"
        parser.add_argument("--max-length", type=int, default=None, help=f"Window length ({recorded} 1024).")
        parser.add_argument(
            "--stride", type=int, default=None, help=f"New targets per window ({recorded} 512)."
        )
    else:
        parser.add_argument("--max-length", type=int, default=1024, help="Window length (default 1024).")
        parser.add_argument("--stride", type=int, default=512, help="New targets per window (default 512).")
    parser.add_argument(
        "--batch-size", type=positive_int, default=8, help="Windows per forward pass (default 8)."
    )


def add_knn_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--datastore", required=True, help="Datastore folder or Hub repo id.")
    parser.add_argument("--k", type=positive_int, default=1024, help="Neighbours per query (default 1024).")
    parser.add_argument("--lmbda", type=float, default=0.25, help="Weight of p_kNN in [0, 1] (default 0.25).")
    parser.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="Distance temperature (default: the datastore's calibrated temperature).",
    )
    parser.add_argument("--recompute-dists", action="store_true", help="Exact distances from stored keys.")
    parser.add_argument(
        "--nprobe", type=positive_int, default=32, help="IVF lists probed per query (default 32)."
    )
    parser.add_argument(
        "--gpu",
        default="auto",
        choices=["auto", "replicate", "shard", "none"],
        help="With faiss-gpu: clone the index to every GPU, or split it (default auto).",
    )


def add_skip_args(parser: argparse.ArgumentParser) -> None:
    """``--retomaton`` and ``--gate``: two ways of searching at fewer steps."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--retomaton",
        type=int,
        default=None,
        metavar="THRESHOLD",
        help="RetoMaton: follow corpus pointers, search only when fewer than THRESHOLD survive.",
    )
    group.add_argument(
        "--gate", action="store_true", help="Use the adaptive-retrieval gate saved with the datastore."
    )


def knn_kwargs(args: argparse.Namespace) -> dict:
    """The mixture settings of :func:`add_knn_args` / :func:`add_skip_args` as keyword arguments."""
    return dict(
        k=args.k,
        lmbda=args.lmbda,
        temperature=args.temperature,
        recompute_dists=args.recompute_dists,
        retomaton=getattr(args, "retomaton", None),
        gate=getattr(args, "gate", False) or None,
    )


def add_index_args(parser: argparse.ArgumentParser, *, default_factory: str | None) -> None:
    """``--index-factory``, ``--train-size`` and ``--overwrite``: shared by build and reindex."""
    parser.add_argument(
        "--index-factory",
        default=default_factory,
        required=default_factory is None,
        help="faiss index factory, e.g. Flat or IVF4096,PQ64.",
    )
    parser.add_argument(
        "--train-size", type=positive_int, default=1_000_000, help="Keys sampled to train the index."
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace a finished datastore in --output.")


def size(text: str) -> int | str:
    """``--max-shard-size 500MB`` or a plain number of bytes."""
    return int(text) if text.strip().isdigit() else text


def load_model(args: argparse.Namespace):
    from ..lm.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(
        args.model,
        gguf_file=args.gguf_file,
        tokenizer=args.tokenizer,
        revision=args.revision,
        dtype=args.dtype,
        device=args.device,
    )


def load_data(args: argparse.Namespace):
    from ..lm.corpus import read_text_file

    if args.data:
        if len(args.data) == 1:
            return args.data[0]
        return [read_text_file(path) for path in args.data]
    from datasets import load_dataset

    return load_dataset(args.dataset, args.dataset_config, split=args.split)


def load_datastore(args: argparse.Namespace):
    from ..datastore import Datastore

    return Datastore.from_pretrained(args.datastore, nprobe=args.nprobe, gpu=args.gpu)
