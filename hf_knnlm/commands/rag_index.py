"""``hf-knnlm rag-index``: cut a corpus into passages and index them with BM25 or a dense encoder."""

from __future__ import annotations

import argparse

from ._common import add_data_args, check_data_args, load_data


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from ..lm.loading import gguf_file_in
    from ..rag import BM25Retriever, DenseRetriever, chunk_documents, sentence_encoder
    from ..retrieval.chunking import token_spans

    token_spans(1, args.chunk_tokens, args.overlap)  # bad sizes fail before the tokenizer loads
    if args.kind != "bm25" and not args.encoder:
        raise ValueError("--kind dense needs --encoder <sentence encoder folder or Hub id>.")
    check_data_args(args)
    gguf_file = args.gguf_file or gguf_file_in(args.tokenizer)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, **kwargs)
    passages = chunk_documents(
        load_data(args),
        tokenizer,
        chunk_tokens=args.chunk_tokens,
        overlap=args.overlap,
        text_column=args.text_column,
        title_column=args.title_column,
    )
    if args.kind == "bm25":
        retriever = BM25Retriever.build(passages)
    else:
        if not args.encoder:
            raise ValueError("--kind dense needs --encoder <sentence encoder folder or Hub id>.")
        encoder_tokenizer = AutoTokenizer.from_pretrained(args.encoder)
        retriever = DenseRetriever.build(
            passages, sentence_encoder(args.encoder), encoder_tokenizer, show_progress=True
        )
    retriever.save_pretrained(args.output)
    print(f"{retriever} saved to {args.output}")
    if args.push_to_hub:
        retriever.push_to_hub(args.push_to_hub)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("rag-index", help="Passages + a BM25 or dense index for RALM / REPLUG / FLARE.")
    p.add_argument(
        "--tokenizer", required=True, help="The LM's tokenizer (passage lengths are in its tokens)."
    )
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --tokenizer, if it is a GGUF folder.")
    add_data_args(p)
    p.add_argument("--title-column", default="title", help="Column holding passage titles (default: title).")
    p.add_argument("--chunk-tokens", type=int, default=128, help="Tokens per passage (default 128).")
    p.add_argument(
        "--overlap", type=int, default=32, help="Tokens shared by consecutive passages (default 32)."
    )
    p.add_argument("--kind", choices=["bm25", "dense"], default="bm25")
    p.add_argument(
        "--encoder", default=None, help="Sentence encoder for --kind dense (e.g. all-MiniLM-L6-v2)."
    )
    p.add_argument("--output", required=True, help="Folder to save the index to.")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="Also push it to this Hub repo.")
    p.set_defaults(func=run)
