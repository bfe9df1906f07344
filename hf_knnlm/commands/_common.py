"""What the ``hf-knnlm`` subcommands share: the parser, error handling, argument groups, loaders.

Every error reaches the user as one line, ``hf-knnlm <command>: error: <what and the fix>``, and a
non-zero exit status (2 for bad input, 1 for anything unexpected); ``--debug`` re-raises it with
its traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..utils.allocator import fix_mmap_threshold
from ._options import add_dataclass_options, dataclass_from_args

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
    # The Hub client's per-request warnings ("Retrying in 1s [Retry 1/5]", a dozen for a name the Hub
    # cannot resolve) would precede the one-line error; --debug shows them.
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    if not debug:
        hub_logger.setLevel(logging.ERROR)
    try:
        fix_mmap_threshold()  # a long run's freed batch buffers go back to the system (utils/allocator.py)
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
    finally:
        hub_logger.setLevel(level)


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
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="Weights dtype (default: auto, as stored).",
    )
    parser.add_argument("--device", default=None, help="e.g. cuda:0; default: where the model loads.")


def add_data_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--data", nargs="+", help="UTF-8 text file(s); each file is one document.")
    group.add_argument("--dataset", help="A `datasets` dataset name or local data folder/file.")
    parser.add_argument("--dataset-config", default=None, help="Dataset configuration name.")
    parser.add_argument("--split", default="train", help="Dataset split (default: train).")
    parser.add_argument("--text-column", default="text", help="Column holding the text (default: text).")


def add_window_args(parser: argparse.ArgumentParser) -> list[str]:
    """``--max-length``, ``--stride``, ``--batch-size`` from
    [`WindowSettings`][hf_knnlm.lm.windows.WindowSettings] (scoring defaults to the windows the datastore was
    built with)."""
    from ..lm.windows import WindowSettings

    return add_dataclass_options(parser.add_argument_group("windows"), WindowSettings)


def window_settings(args: argparse.Namespace):
    from ..lm.windows import WindowSettings

    return dataclass_from_args(args, WindowSettings)


def add_store_args(parser: argparse.ArgumentParser) -> None:
    """``--datastore``, ``--nprobe`` and ``--gpu``: how the store is opened (``from_pretrained``)."""
    from ..datastore.index import DEFAULT_NPROBE, GPU_MODES

    parser.add_argument("--datastore", required=True, help="Datastore folder or Hub repo id.")
    parser.add_argument(
        "--nprobe",
        type=positive_int,
        default=DEFAULT_NPROBE,
        help=f"IVF lists probed per query (default: {DEFAULT_NPROBE}).",
    )
    parser.add_argument(
        "--gpu",
        default=GPU_MODES[0],
        choices=GPU_MODES,
        help=f"With faiss-gpu: clone the index to every GPU, or split it (default: {GPU_MODES[0]}).",
    )


def add_knn_args(parser: argparse.ArgumentParser, *, only: tuple[str, ...] | None = None) -> list[str]:
    """The store options and the [`KNNSettings`][hf_knnlm.KNNSettings] fields (``only`` those named)."""
    from ..knnlm.settings import KNNSettings

    add_store_args(parser)
    return add_dataclass_options(parser.add_argument_group("kNN-LM"), KNNSettings, only=only)


def knn_settings(args: argparse.Namespace):
    """The [`KNNSettings`][hf_knnlm.KNNSettings] of the command line (validated: before any model is
    loaded)."""
    from ..knnlm.settings import KNNSettings

    return dataclass_from_args(args, KNNSettings)


def add_index_args(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    """``--index-factory``, ``--train-size`` and ``--overwrite``: shared by build and reindex."""
    from ..datastore.index import DEFAULT_INDEX_FACTORY, DEFAULT_TRAIN_SIZE

    parser.add_argument(
        "--index-factory",
        default=None if required else DEFAULT_INDEX_FACTORY,
        required=required,
        help="faiss index factory, e.g. Flat or IVF4096,PQ64"
        + ("." if required else f" (default: {DEFAULT_INDEX_FACTORY})."),
    )
    parser.add_argument(
        "--train-size",
        type=positive_int,
        default=DEFAULT_TRAIN_SIZE,
        help=f"Keys sampled to train the index (default: {DEFAULT_TRAIN_SIZE}).",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace a finished datastore in --output (default: off)."
    )


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


def add_max_tokens_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="Score only the first N tokens (default: all)."
    )


def add_scoring_args(parser: argparse.ArgumentParser, *, knn_fields: tuple[str, ...] | None = None) -> None:
    """What a verb that scores a text against a store takes: model, text, windows, store, kNN settings."""
    add_model_args(parser)
    add_data_args(parser)
    add_window_args(parser)
    add_knn_args(parser, only=knn_fields)
    add_max_tokens_arg(parser)


def load_scoring(args: argparse.Namespace, check=None) -> tuple[tuple, dict]:
    """``(model, tokenizer, text, store)`` and the keywords of a scoring call, after every check.

    Settings (and ``check(settings)``, for what depends on them) fail before the store and the model load.
    """
    settings, windows = knn_settings(args), window_settings(args)
    if check is not None:
        check(settings)
    check_data_args(args)
    store = load_datastore(args)
    model, tokenizer = load_model(args)
    keywords = {"settings": settings, "windows": windows, "text_column": args.text_column}
    return (model, tokenizer, load_data(args), store), {**keywords, "max_tokens": args.max_tokens}


def check_data_args(args: argparse.Namespace) -> None:
    """Text files that do not exist are named before any model is loaded."""
    from pathlib import Path

    for path in getattr(args, "data", None) or []:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--data {path}: no such file.")
