"""``hf-knnlm``: build | evaluate | generate | demo (and the subcommands other modules register)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from transformers import LogitsProcessorList


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hub id or local path of the causal LM.")
    parser.add_argument(
        "--gguf-file", default=None, help="GGUF file name inside --model (e.g. SmolLM2...gguf)."
    )
    parser.add_argument("--tokenizer", default=None, help="Tokenizer id/path if it differs from --model.")
    parser.add_argument("--revision", default=None, help="Model revision on the Hub.")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--device", default=None, help="e.g. cuda:0; default: where the model loads.")


def _add_data_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--data", nargs="+", help="UTF-8 text file(s); each file is one document.")
    group.add_argument("--dataset", help="A `datasets` dataset name or local data folder/file.")
    parser.add_argument("--dataset-config", default=None, help="Dataset configuration name.")
    parser.add_argument("--split", default="train", help="Dataset split (default: train).")
    parser.add_argument("--text-column", default="text", help="Column holding the text (default: text).")


def _add_window_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-length", type=int, default=1024, help="Window length (default 1024).")
    parser.add_argument("--stride", type=int, default=512, help="New targets per window (default 512).")
    parser.add_argument("--batch-size", type=int, default=8, help="Windows per forward pass (default 8).")


def _add_knn_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--datastore", required=True, help="Datastore folder or Hub repo id.")
    parser.add_argument("--k", type=int, default=1024, help="Neighbours per query (default 1024).")
    parser.add_argument("--lmbda", type=float, default=0.25, help="Weight of p_kNN in [0, 1] (default 0.25).")
    parser.add_argument("--temperature", type=float, default=1.0, help="Distance temperature (default 1).")
    parser.add_argument("--recompute-dists", action="store_true", help="Exact distances from stored keys.")
    parser.add_argument("--nprobe", type=int, default=32, help="IVF lists probed per query (default 32).")
    parser.add_argument(
        "--gpu",
        default="auto",
        choices=["auto", "replicate", "shard", "none"],
        help="With faiss-gpu: clone the index to every GPU, or split it (default auto).",
    )


def _load_model(args: argparse.Namespace):
    from .loading import load_model_and_tokenizer

    return load_model_and_tokenizer(
        args.model,
        gguf_file=args.gguf_file,
        tokenizer=args.tokenizer,
        revision=args.revision,
        dtype=args.dtype,
        device=args.device,
    )


def _load_data(args: argparse.Namespace):
    if args.data:
        if len(args.data) == 1:
            return args.data[0]
        return [open(path, encoding="utf-8").read() for path in args.data]
    from datasets import load_dataset

    return load_dataset(args.dataset, args.dataset_config, split=args.split)


def _load_datastore(args: argparse.Namespace):
    from .datastore import Datastore

    return Datastore.from_pretrained(args.datastore, nprobe=args.nprobe, gpu=args.gpu)


def cmd_build(args: argparse.Namespace) -> None:
    from .datastore import Datastore

    model, tokenizer = _load_model(args)
    store = Datastore.build(
        model,
        tokenizer,
        _load_data(args),
        args.output,
        max_length=args.max_length,
        stride=args.stride,
        batch_size=args.batch_size,
        text_column=args.text_column,
        index_factory=args.index_factory,
        hook_module=args.hook_module,
        max_shard_size=args.max_shard_size,
        train_size=args.train_size,
        overwrite=args.overwrite,
    )
    print(store)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .evaluation import evaluate_perplexity

    model, tokenizer = _load_model(args)
    result = evaluate_perplexity(
        model,
        tokenizer,
        _load_data(args),
        _load_datastore(args),
        max_length=args.max_length,
        stride=args.stride,
        batch_size=args.batch_size,
        k=args.k,
        lmbda=args.lmbda,
        temperature=args.temperature,
        recompute_dists=args.recompute_dists,
        text_column=args.text_column,
        max_tokens=args.max_tokens,
    )
    print(json.dumps(result, indent=2))
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, sort_keys=True)


def cmd_generate(args: argparse.Namespace) -> None:
    from .logits_process import KNNProcessor

    model, tokenizer = _load_model(args)
    processor = KNNProcessor(
        model,
        _load_datastore(args),
        k=args.k,
        lmbda=args.lmbda,
        temperature=args.temperature,
        recompute_dists=args.recompute_dists,
    )
    inputs = tokenizer(args.prompt, return_tensors="pt").to(model.device)
    output = model.generate(
        **inputs,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        num_beams=args.num_beams,
        logits_processor=LogitsProcessorList([processor]),
        pad_token_id=tokenizer.eos_token_id,
    )
    print(tokenizer.decode(output[0], skip_special_tokens=True))


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(
        workdir=args.workdir,
        train_tokens=args.train_tokens,
        eval_tokens=args.eval_tokens,
        max_length=args.max_length,
        stride=args.stride,
        k=args.k,
        lmbda=args.lmbda,
        temperature=args.temperature,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-knnlm", description="kNN-LM and REALM for transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="Build a datastore from a corpus.")
    _add_model_args(p)
    _add_data_args(p)
    _add_window_args(p)
    p.add_argument("--output", required=True, help="Datastore folder to write (resumes if killed).")
    p.add_argument("--index-factory", default="Flat", help="faiss index factory, e.g. Flat or IVF4096,PQ64.")
    p.add_argument("--hook-module", default=None, help="FFN module path, if the model is not in the table.")
    p.add_argument("--max-shard-size", default="5GB", help="Largest keys shard (default 5GB).")
    p.add_argument("--train-size", type=int, default=1_000_000, help="Keys sampled to train the index.")
    p.add_argument("--overwrite", action="store_true", help="Replace a finished datastore in --output.")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("evaluate", help="Base vs kNN-LM perplexity on a text.")
    _add_model_args(p)
    _add_data_args(p)
    _add_window_args(p)
    _add_knn_args(p)
    p.add_argument("--max-tokens", type=int, default=None, help="Score only the first N tokens.")
    p.add_argument("--output-json", default=None, help="Also write the result to this JSON file.")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("generate", help="Generate with a KNNProcessor.")
    _add_model_args(p)
    _add_knn_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--num-beams", type=int, default=1)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="Offline end-to-end demo: SmolLM2-135M + Shakespeare plays.")
    p.add_argument("--workdir", default="knnlm-demo", help="Where the demo datastore goes.")
    p.add_argument("--train-tokens", type=int, default=60_000, help="Datastore size in tokens.")
    p.add_argument("--eval-tokens", type=int, default=6_000, help="Held-out tokens to score.")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--stride", type=int, default=448)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--lmbda", type=float, default=0.25)
    p.add_argument("--temperature", type=float, default=1.0)
    p.set_defaults(func=cmd_demo)

    for register in _extensions():
        register(sub)
    return parser


def _extensions():
    """Subcommands contributed by other parts of the package (tuning, Hub push, open-QA)."""
    from . import hub_cli, tune_cli
    from .open_qa import cli as open_qa_cli

    return [hub_cli.register, tune_cli.register, open_qa_cli.register]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"hf-knnlm {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
