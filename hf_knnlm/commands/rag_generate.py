"""``hf-knnlm rag-generate``: generate with In-Context RALM, REPLUG or FLARE."""

from __future__ import annotations

import argparse

from ..utils.checks import check_fraction, check_positive_int
from ._common import add_model_args, load_model
from ._rag import add_retriever_args, load_retriever, retrieval_settings

FLARE_THRESHOLD = 0.4  # flare_generate's threshold (tests/test_cli_defaults.py checks it)


def run(args: argparse.Namespace) -> int:
    from transformers import LogitsProcessorList

    from ..rag import InContextRALMProcessor, REPLUGProcessor, flare_generate

    if not args.prompt.strip():
        raise ValueError("--prompt is empty; pass the text to continue, e.g. --prompt 'The history of'.")
    settings = retrieval_settings(args)  # bad values fail before anything is loaded
    check_positive_int("max_new_tokens", args.max_new_tokens, "tokens to generate")
    if args.method == "flare":
        check_fraction("threshold", args.threshold, "retrieve below this probability, e.g. 0.4")
    retriever = load_retriever(args)  # before the model: a wrong folder fails at once
    model, tokenizer = load_model(args)
    common = dict(query_length=settings.query_length, max_document_tokens=settings.max_document_tokens)
    if args.method == "flare":
        out = flare_generate(
            model,
            tokenizer,
            retriever,
            args.prompt,
            threshold=args.threshold,
            num_documents=settings.num_documents,
            max_new_tokens=args.max_new_tokens,
            max_document_tokens=settings.max_document_tokens,
        )
        print(args.prompt + out.text)
        print(f"[{len(out.steps)} sentences, {out.num_retrievals} retrievals]")
        return 0
    if args.method == "ralm":
        processor = InContextRALMProcessor(
            model, tokenizer, retriever, retrieval_stride=settings.retrieval_stride, **common
        )
    else:
        processor = REPLUGProcessor(
            model,
            tokenizer,
            retriever,
            k=settings.num_documents,
            temperature=settings.document_temperature,
            **common,
        )
    inputs = tokenizer(args.prompt, return_tensors="pt").to(model.device)
    output = model.generate(
        **inputs,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        logits_processor=LogitsProcessorList([processor]),
        pad_token_id=tokenizer.eos_token_id,
    )
    print(tokenizer.decode(output[0], skip_special_tokens=True))
    print(f"[{processor.num_retrievals} retrievals]")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("rag-generate", help="Generate with In-Context RALM, REPLUG or FLARE.")
    add_model_args(p)
    p.add_argument("--method", choices=["ralm", "replug", "flare"], default="ralm", help="(default: ralm).")
    add_retriever_args(p)
    p.add_argument(
        "--threshold",
        type=float,
        default=FLARE_THRESHOLD,
        help=f"FLARE: retrieve below this token probability (default: {FLARE_THRESHOLD}).",
    )
    p.add_argument("--prompt", required=True, help="The text to continue.")
    p.add_argument("--max-new-tokens", type=int, default=50, help="Tokens to generate (default: 50).")
    p.add_argument(
        "--do-sample", action="store_true", help="Sample instead of greedy decoding (default: off)."
    )
    p.set_defaults(func=run)
