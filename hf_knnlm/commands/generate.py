"""``hf-knnlm generate``: generate with a [`KNNProcessor`][hf_knnlm.KNNProcessor]."""

from __future__ import annotations

import argparse

from ._common import add_knn_args, add_model_args, knn_settings, load_datastore, load_model, positive_int


def check_prompt(prompt: str) -> None:
    if not prompt.strip():
        raise ValueError("--prompt is empty; pass the text to continue, e.g. --prompt 'The history of'.")


def run(args: argparse.Namespace) -> int:
    from transformers import LogitsProcessorList

    from ..knnlm.logits_process import KNNProcessor

    check_prompt(args.prompt)
    settings = knn_settings(args)
    store = load_datastore(args)
    model, tokenizer = load_model(args)
    processor = KNNProcessor(model, store, tokenizer=tokenizer, settings=settings)
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
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="Generate with a KNNProcessor.")
    add_model_args(p)
    add_knn_args(p)
    p.add_argument("--prompt", required=True, help="The text to continue.")
    p.add_argument(
        "--max-new-tokens", type=positive_int, default=50, help="Tokens to generate (default: 50)."
    )
    p.add_argument(
        "--do-sample", action="store_true", help="Sample instead of greedy decoding (default: off)."
    )
    p.add_argument("--num-beams", type=positive_int, default=1, help="Beam search width (default: 1).")
    p.set_defaults(func=run)
