"""Tiny, offline fixtures for the open-QA tests: a word-level BERT tokenizer and a random 1-layer BERT."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import BertConfig, BertTokenizerFast

from hf_knnlm.open_qa import DocumentIndex, RealmConfig, RealmForOpenQA

DOCUMENTS = [
    {"id": "paris", "title": "france", "text": "paris is the capital of france and sits on the seine river"},
    {"id": "berlin", "title": "germany", "text": "berlin is the capital of germany since 1990 and is large"},
    {"id": "rome", "title": "italy", "text": "rome is the capital of italy and has the tiber river"},
    {"id": "madrid", "title": "spain", "text": "madrid is the capital of spain and lies in the centre"},
    {"id": "lisbon", "title": "portugal", "text": "lisbon is the capital of portugal near the ocean"},
    {"id": "vienna", "title": "austria", "text": "vienna is the capital of austria on the danube river"},
]

QUESTIONS = [
    {"question": "what is the capital of france", "answers": {"text": ["paris"], "answer_start": [0]}},
    {"question": "what is the capital of germany", "answers": {"text": ["berlin"], "answer_start": [0]}},
    {"question": "which river flows through rome", "answers": {"text": ["tiber", "the tiber river"]}},
    {"question": "what is the capital of austria", "answers": ["vienna"]},
]

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_tokenizer(folder: Path) -> BertTokenizerFast:
    words = set()
    for text in [d["title"] + " " + d["text"] for d in DOCUMENTS] + [q["question"] for q in QUESTIONS]:
        words.update(re.findall(r"\w+", text.lower()))
    vocab = {token: i for i, token in enumerate(SPECIALS + sorted(words))}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    tokenizer.save_pretrained(folder)  # a real folder, so the CLI tests can load it by path
    return tokenizer


def make_model(tokenizer: BertTokenizerFast, seed: int = 0, **config_kwargs) -> RealmForOpenQA:
    torch.manual_seed(seed)
    encoder = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    settings = dict(
        retriever_proj_size=16,
        span_hidden_size=16,
        max_span_width=4,
        top_k=3,
        max_question_length=16,
        max_reader_length=48,
        max_doc_embed_length=32,
    )
    settings.update(config_kwargs)
    model = RealmForOpenQA(RealmConfig(encoder_config=encoder.to_dict(), **settings))
    return model.eval()


def make_index(model: RealmForOpenQA, tokenizer: BertTokenizerFast) -> DocumentIndex:
    return DocumentIndex.build(DOCUMENTS, model, tokenizer, batch_size=4, show_progress=False)
