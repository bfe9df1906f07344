"""Tiny, offline fixtures for the open-QA tests: a word-level BERT tokenizer and a random 1-layer BERT."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig, BertForQuestionAnswering, BertModel, BertTokenizerFast, TrainerCallback

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
    encoder = tiny_bert_config(tokenizer)
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


def tiny_bert_config(tokenizer: BertTokenizerFast) -> BertConfig:
    return BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def save_encoder(tokenizer: BertTokenizerFast, folder: Path, seed: int = 0) -> Path:
    """A random 1-layer BertModel and the tokenizer, saved as a retriever / encoder checkpoint."""
    torch.manual_seed(seed)
    BertModel(tiny_bert_config(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_qa_checkpoint(tokenizer: BertTokenizerFast, folder: Path, seed: int = 1) -> Path:
    """A random 1-layer BertForQuestionAnswering (a standard QA checkpoint) and the tokenizer. The QA head is
    scaled up so that span scores are well separated (no near-ties between implementations)."""
    torch.manual_seed(seed)
    model = BertForQuestionAnswering(tiny_bert_config(tokenizer))
    with torch.no_grad():
        model.qa_outputs.weight.mul_(50.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def pipeline_best_span(model, tokenizer, question: str, context: str, max_answer_len: int) -> tuple[int, int]:
    """Character span that transformers 4's ``pipeline("question-answering")`` returns for one window (its
    postprocessing, restated: transformers 5 removed that pipeline). Softmax of start and end logits over the
    context tokens, outer product, spans of at most ``max_answer_len`` tokens, the 12 best candidates, the
    scores of candidates with the same (lower-cased) text summed, the best text."""
    kwargs = dict(truncation="only_second", max_length=384)
    encoded = tokenizer(question, context, return_tensors="pt", **kwargs)
    offsets = tokenizer(question, context, return_offsets_mapping=True, **kwargs)["offset_mapping"]
    with torch.no_grad():
        out = model(**encoded)
    undesired = np.array([sid != 1 for sid in encoded.sequence_ids(0)])
    start = np.where(undesired, -10000.0, out.start_logits[0].numpy())
    end = np.where(undesired, -10000.0, out.end_logits[0].numpy())
    start = np.exp(start - start.max())
    end = np.exp(end - end.max())
    start, end = start / start.sum(), end / end.sum()
    start[0] = end[0] = 0.0  # [CLS]: no impossible answers
    candidates = np.tril(np.triu(np.outer(start, end)), max_answer_len - 1)
    answers: dict[str, list] = {}
    for flat in np.argsort(-candidates.flatten())[:12]:
        first, last = np.unravel_index(flat, candidates.shape)
        if undesired[first] or undesired[last]:
            continue
        span = (offsets[first][0], offsets[last][1])
        entry = answers.setdefault(context[span[0] : span[1]].lower(), [0.0, span])
        entry[0] += candidates[first, last]
    return max(answers.values(), key=lambda entry: entry[0])[1]


class Killed(Exception):
    pass


class KillAfter(TrainerCallback):
    """Stops training right after step ``step``, before that step's checkpoint: a kill at that point."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed
