"""``hf-knnlm explain``: generate with a kNN-LM and show, per token, the stored contexts behind it."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from ..utils.files import atomic_write_bytes, atomic_write_json
from ._common import add_knn_args, add_model_args, knn_settings, load_datastore, load_model, positive_int
from .generate import check_prompt


def run(args: argparse.Namespace) -> int:
    from ..knnlm.attribution import explain_generation, format_attribution, render_html

    check_prompt(args.prompt)
    settings = knn_settings(args)
    store = load_datastore(args)
    model, tokenizer = load_model(args)
    if store.provenance.documents is None:
        print(
            "note: this datastore records no documents (built before attribution existed); neighbours "
            "are shown by entry id. Record them with hf_knnlm.datastore.provenance.attach_documents."
        )
    attributions, text = explain_generation(
        model,
        tokenizer,
        store,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        settings=settings,
        top=args.top,
    )
    print(args.prompt + text)
    print()
    for a in attributions:
        print(format_attribution(a))
    if args.html:
        atomic_write_bytes(args.html, render_html(args.prompt, attributions).encode("utf-8"))
        print(f"\nwrote {args.html}")
    if args.output_json:
        atomic_write_json(
            args.output_json, {"prompt": args.prompt, "tokens": [asdict(a) for a in attributions]}
        )
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "explain", help="Generate and show each token's nearest stored contexts with their source and weight."
    )
    add_model_args(p)
    add_knn_args(p)
    p.add_argument("--prompt", required=True, help="The text to continue.")
    p.add_argument(
        "--max-new-tokens", type=positive_int, default=20, help="Tokens to generate (default: 20)."
    )
    p.add_argument("--top", type=positive_int, default=5, help="Neighbours shown per token (default: 5).")
    p.add_argument("--html", default=None, help="Also write an HTML view of the kNN share (default: none).")
    p.add_argument(
        "--output-json", default=None, help="Also write every attribution as JSON (default: none)."
    )
    p.set_defaults(func=run)
