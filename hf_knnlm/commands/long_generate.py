"""``hf-knnlm long-generate``: continue a prompt longer than the window with Unlimiformer."""

from __future__ import annotations

import argparse

from ._common import add_model_args, load_model, positive_int
from .generate import check_prompt
from .long_evaluate import add_unlimiformer_args, attention_settings


def prompt_text(args: argparse.Namespace) -> str:
    from ..lm.corpus import read_text_file

    text = read_text_file(args.prompt_file) if args.prompt_file else args.prompt
    check_prompt(text)
    return text


def run(args: argparse.Namespace) -> int:
    from ..attention import Unlimiformer

    settings = attention_settings(args)
    prompt = prompt_text(args)
    model, tokenizer = load_model(args)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)
    output = Unlimiformer(model, settings).generate(
        ids, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, pad_token_id=tokenizer.eos_token_id
    )
    print(tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True))
    return 0


def configure(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="The text to continue.")
    source.add_argument("--prompt-file", help="A UTF-8 file holding the text to continue.")
    p.add_argument(
        "--max-new-tokens", type=positive_int, default=50, help="Tokens to generate (default: 50)."
    )
    p.add_argument(
        "--do-sample", action="store_true", help="Sample instead of greedy decoding (default: off)."
    )
    add_unlimiformer_args(p)
    p.set_defaults(func=run)


HELP = "Continue a prompt longer than the window: the window + Unlimiformer over the rest."


def register(subparsers) -> None:
    subparsers.add_parser("long-generate", configure=configure, help=HELP)
