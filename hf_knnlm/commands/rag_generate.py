"""``hf-knnlm rag-generate``: generate with In-Context RALM, REPLUG or FLARE."""

from __future__ import annotations

import argparse

from ._common import add_model_args, load_model
from ._rag import add_retriever_args, load_retriever, num_documents


def run(args: argparse.Namespace) -> int:
    from transformers import LogitsProcessorList

    from ..rag import InContextRALMProcessor, REPLUGProcessor, flare_generate

    retriever = load_retriever(args)  # before the model: a wrong folder fails at once
    model, tokenizer = load_model(args)
    common = dict(query_length=args.query_length, max_document_tokens=args.max_document_tokens)
    if args.method == "flare":
        out = flare_generate(
            model,
            tokenizer,
            retriever,
            args.prompt,
            threshold=args.threshold,
            num_documents=num_documents(args),
            max_new_tokens=args.max_new_tokens,
            max_document_tokens=args.max_document_tokens,
        )
        print(args.prompt + out.text)
        print(f"[{len(out.steps)} sentences, {out.num_retrievals} retrievals]")
        return 0
    if args.method == "ralm":
        processor = InContextRALMProcessor(
            model, tokenizer, retriever, retrieval_stride=args.retrieval_stride, **common
        )
    else:
        processor = REPLUGProcessor(
            model, tokenizer, retriever, k=num_documents(args), temperature=args.replug_temperature, **common
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
    p.add_argument("--method", choices=["ralm", "replug", "flare"], default="ralm")
    add_retriever_args(p)
    p.add_argument(
        "--threshold", type=float, default=0.4, help="FLARE: retrieve below this token probability."
    )
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--do-sample", action="store_true")
    p.set_defaults(func=run)
