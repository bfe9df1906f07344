"""Training features for REALM: retrieval, answer-span matching in each retrieved document, padding.

Retrieval for training happens here, not inside the model. :class:`RealmDataCollator` embeds the questions of
each batch with the *current* query encoder (no gradient, dropout off), searches the frozen document index for
the top-k and puts the stored vectors of those documents in the batch; the model then recomputes the query
embedding with gradients, so the query encoder trains through f(x, z) while the index stays fixed (REALM
fine-tuning). Rows that already carry ``doc_positions`` (see :func:`precompute_retrieval`) skip the search and
use the precomputed top-k instead.

Answers are matched as token-id sequences inside the document part of ``[CLS] question [SEP] document [SEP]``
(like REALM, and case-insensitive with an uncased tokenizer); only spans shorter than ``max_span_width``
count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..checks import check_positive_int
from .document_index import DocumentIndex


def normalize_answers(answers: Any) -> list[str]:
    """Answer strings from a SQuAD-style ``{"text": [...]}`` dict, a list of strings or one string."""
    if isinstance(answers, Mapping):
        answers = answers.get("text", [])
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, Sequence):
        raise ValueError(
            f"answers must be a string, a list of strings or a SQuAD dict {{'text': [...]}}, got "
            f"{type(answers).__name__}."
        )
    return [str(a) for a in answers if str(a).strip()]


def _require_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow tokenizer; REALM features need offsets and sequence ids. "
            "Load it with AutoTokenizer.from_pretrained(..., use_fast=True)."
        )


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def resolve_top_k(top_k: int | None, model: Any) -> int:
    """``top_k``, or the model's default when it is None; 0, negatives and non-integers are refused."""
    top_k = model.config.top_k if top_k is None else top_k
    check_positive_int("top_k", top_k, "documents retrieved per question")
    return top_k


@torch.no_grad()
def retrieve(
    model: Any, tokenizer: Any, index: DocumentIndex, questions: list[str], top_k: int
) -> np.ndarray:
    """Top-k document positions ``[len(questions), top_k]`` for the current query encoder (``-1``: none)."""
    encoded = tokenizer(
        questions,
        truncation=True,
        max_length=model.config.max_question_length,
        padding=True,
        return_tensors="pt",
    )
    device = _device(model)
    embedder = model.query_embedder
    was_training = embedder.training
    embedder.eval()  # dropout would make the search noisy and the batch non-reproducible
    try:
        query = embedder(**{name: tensor.to(device) for name, tensor in encoded.items()})
    finally:
        embedder.train(was_training)
    _, positions = index.search(query, top_k)
    return positions


def _truncate_questions(tokenizer: Any, questions: list[str], max_length: int) -> list[str]:
    """Cut each question at the last character of its first ``max_length`` tokens (specials included)."""
    encoded = tokenizer(questions, truncation=True, max_length=max_length, return_offsets_mapping=True)
    cut = []
    for question, offsets in zip(questions, encoded["offset_mapping"], strict=True):
        ends = [end for start, end in offsets if end > start]
        cut.append(question[: ends[-1]] if ends else question)
    return cut


def _answer_token_ids(tokenizer: Any, answers: list[str]) -> list[list[int]]:
    """Token ids of each answer; answers with an unknown token are dropped (``[UNK]`` would match any
    other unknown word)."""
    encoded = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    return [ids for ids in encoded if tokenizer.unk_token_id not in ids]


def match_answer_spans(
    token_ids: Sequence[int],
    doc_start: int,
    doc_end: int,
    answer_ids: list[list[int]],
    max_span_width: int,
    max_spans: int,
) -> list[tuple[int, int]]:
    """Inclusive ``(start, end)`` token spans inside ``[doc_start, doc_end]`` equal to one of
    ``answer_ids``."""
    spans: list[tuple[int, int]] = []
    for answer in answer_ids:
        n = len(answer)
        if n == 0 or n > max_span_width:
            continue
        for start in range(doc_start, doc_end - n + 2):
            if list(token_ids[start : start + n]) == answer and (start, start + n - 1) not in spans:
                spans.append((start, start + n - 1))
                if len(spans) == max_spans:
                    return spans
    return spans


def build_features(
    model: Any,
    tokenizer: Any,
    index: DocumentIndex,
    questions: list[str],
    doc_positions: np.ndarray | Sequence[Sequence[int]],
    answers: list[list[str]] | None = None,
    max_answer_spans: int = 8,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Padded model inputs for ``questions`` paired with the documents at ``doc_positions`` ``[b, k]``.

    Returns ``(features, meta)``: ``features`` are the tensors :meth:`RealmForOpenQA.forward` takes
    (with ``answer_starts`` / ``answer_ends`` when ``answers`` are given); ``meta`` has the document ids,
    texts and token character offsets that turn a span back into text.
    """
    _require_fast(tokenizer)
    config = model.config
    positions = np.asarray(doc_positions, dtype=np.int64)
    if positions.ndim != 2 or positions.shape[0] != len(questions):
        raise ValueError(
            f"doc_positions has shape {positions.shape}; expected [{len(questions)}, k], one row per "
            "question."
        )
    batch, k = positions.shape
    question_enc = tokenizer(
        questions, truncation=True, max_length=config.max_question_length, padding=True, return_tensors="pt"
    )
    short_questions = _truncate_questions(tokenizer, questions, config.max_question_length)
    texts = [[index.texts[p] if p >= 0 else "" for p in row] for row in positions]
    reader_enc = tokenizer(
        [q for q in short_questions for _ in range(k)],
        [t for row in texts for t in row],
        truncation="only_second",
        max_length=config.max_reader_length,
        padding=True,
        return_offsets_mapping=True,
    )
    seq = len(reader_enc["input_ids"][0])
    doc_mask = torch.zeros(batch * k, seq, dtype=torch.bool)
    for row in range(batch * k):
        doc_mask[row] = torch.tensor([sid == 1 for sid in reader_enc.sequence_ids(row)])

    features = {f"question_{name}": tensor for name, tensor in question_enc.items()}
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        if name in reader_enc:
            features[f"reader_{name}"] = torch.tensor(reader_enc[name]).view(batch, k, seq)
    features["doc_mask"] = doc_mask.view(batch, k, seq)
    features["doc_valid"] = torch.from_numpy(positions >= 0)
    features["doc_embeddings"] = index.embeddings_for(positions)

    if answers is not None:
        starts = torch.full((batch, k, max_answer_spans), -1, dtype=torch.long)
        ends = torch.full_like(starts, -1)
        for b in range(batch):
            answer_ids = _answer_token_ids(tokenizer, answers[b])
            for z in range(k):
                row = b * k + z
                in_doc = doc_mask[row].nonzero().flatten()
                if positions[b, z] < 0 or in_doc.numel() == 0:
                    continue
                spans = match_answer_spans(
                    reader_enc["input_ids"][row],
                    int(in_doc[0]),
                    int(in_doc[-1]),
                    answer_ids,
                    config.max_span_width,
                    max_answer_spans,
                )
                for m, (start, end) in enumerate(spans):
                    starts[b, z, m], ends[b, z, m] = start, end
        features["answer_starts"], features["answer_ends"] = starts, ends

    offsets = reader_enc["offset_mapping"]
    meta = {
        "positions": positions,
        "doc_ids": [[index.ids[p] if p >= 0 else None for p in row] for row in positions],
        "texts": texts,
        "offsets": [[offsets[b * k + z] for z in range(k)] for b in range(batch)],
    }
    return features, meta


class RealmDataCollator:
    """``Trainer`` collator: (question, answers) rows -> retrieval -> span labels -> padded tensors.

    Use ``TrainingArguments(remove_unused_columns=False)`` so that the raw ``question`` / ``answers`` columns
    reach the collator.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        index: DocumentIndex,
        *,
        top_k: int | None = None,
        max_answer_spans: int = 8,
        question_column: str = "question",
        answers_column: str = "answers",
    ):
        _require_fast(tokenizer)
        self.model, self.tokenizer, self.index = model, tokenizer, index
        self.top_k = resolve_top_k(top_k, model)
        self.max_answer_spans = max_answer_spans
        self.question_column, self.answers_column = question_column, answers_column

    def __call__(self, examples: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        for name in (self.question_column, self.answers_column):
            if name not in examples[0]:
                raise ValueError(
                    f"collator got rows with columns {sorted(examples[0])}, missing {name!r}. Set "
                    f"TrainingArguments(remove_unused_columns=False) or point question_column/answers_column "
                    "at your columns."
                )
        questions = [str(ex[self.question_column]) for ex in examples]
        answers = [normalize_answers(ex[self.answers_column]) for ex in examples]
        if all("doc_positions" in ex for ex in examples):
            positions = np.asarray([ex["doc_positions"][: self.top_k] for ex in examples])
        else:
            positions = retrieve(self.model, self.tokenizer, self.index, questions, self.top_k)
        features, _ = build_features(
            self.model, self.tokenizer, self.index, questions, positions, answers, self.max_answer_spans
        )
        return features


def precompute_retrieval(
    dataset: Any,
    model: Any,
    tokenizer: Any,
    index: DocumentIndex,
    *,
    top_k: int | None = None,
    question_column: str = "question",
    batch_size: int = 64,
) -> Any:
    """Add a ``doc_positions`` column (top-k once, with the current query encoder) to a
    ``datasets.Dataset``."""
    top_k = resolve_top_k(top_k, model)

    def add(batch: dict[str, list]) -> dict[str, list]:
        positions = retrieve(model, tokenizer, index, [str(q) for q in batch[question_column]], top_k)
        return {"doc_positions": positions.tolist()}

    return dataset.map(add, batched=True, batch_size=batch_size, desc="retrieve")


__all__ = [
    "RealmDataCollator",
    "build_features",
    "match_answer_spans",
    "normalize_answers",
    "precompute_retrieval",
    "retrieve",
]
