"""Training features for REALM: retrieval, answer-span matching in each retrieved document, padding.

Retrieval for training happens here, not inside the model.
[`RealmDataCollator`][hf_knnlm.open_qa.RealmDataCollator] embeds the questions of each batch with the
*current* query encoder (no gradient, dropout off), searches the frozen document index for the top-k and puts
the stored vectors of those documents in the batch; the model then recomputes the query embedding with
gradients, so the query encoder trains through f(x, z) while the index stays fixed (REALM fine-tuning). Rows
that already carry ``doc_positions`` (see [`precompute_retrieval`][hf_knnlm.open_qa.precompute_retrieval])
skip the search and use the precomputed top-k instead.

Answers are matched on characters: every occurrence of an answer string in a retrieved document
(case-insensitive, at word boundaries) that begins and ends on token boundaries of a reader window becomes a
labelled span of that window (REALM matches token ids instead, which misses answers of byte-level BPE
tokenizers whose tokens depend on the preceding space). Only spans of at most ``max_span_width`` tokens count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..retrieval.document_index import DocumentIndex
from ..utils.checks import check_positive_int
from .reader_windows import ReaderWindows, read_in_windows
from .tokenization import reader_tokenizer, retriever_tokenizer


def normalize_answers(answers: Any) -> list[str]:
    """Answer strings from a SQuAD-style ``{"text": [...]}`` dict, a list of strings or one string.

    Examples:

    ```python
    >>> from hf_knnlm.open_qa import normalize_answers
    >>> normalize_answers({"text": ["the mat", "mat"], "answer_start": [16, 20]})  # the Hub's squad layout
    ['the mat', 'mat']
    >>> normalize_answers("the mat"), normalize_answers(["the mat"])
    (['the mat'], ['the mat'])
    ```
    """
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
    """Top-k document positions ``[len(questions), top_k]`` for the current query encoder (``-1``: none).

    Examples:

    ```python
    >>> from hf_knnlm.open_qa.testing import tiny_realm
    >>> model, tokenizer, index = tiny_realm()  # a random 1-layer REALM, documents paris and rome
    >>> from hf_knnlm.open_qa import retrieve
    >>> positions = retrieve(model, tokenizer, index, ["what is the capital of france"], top_k=2)
    >>> positions.shape, sorted(index.ids[p] for p in positions[0])  # positions in the index, best first
    ((1, 2), ['paris', 'rome'])
    ```
    """
    encoded = retriever_tokenizer(tokenizer)(
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


def find_answer_chars(text: str, answers: list[str]) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of every occurrence of an answer in ``text`` that starts and ends at a
    word boundary; case-insensitive (unless lower-casing changes the length of ``text``)."""
    haystack = text.lower() if len(text.lower()) == len(text) else text
    spans = set()
    for answer in answers:
        needle = answer.strip()
        needle = needle.lower() if haystack is not text and len(needle.lower()) == len(needle) else needle
        start = haystack.find(needle) if needle else -1
        while start >= 0:
            end = start + len(needle)
            if (start == 0 or not text[start - 1].isalnum()) and (
                end == len(text) or not text[end].isalnum()
            ):
                spans.add((start, end))
            start = haystack.find(needle, start + 1)
    return sorted(spans)


def match_answer_spans(
    offsets: Sequence[Sequence[int]],
    doc_mask: Sequence[bool],
    char_spans: list[tuple[int, int]],
    max_span_width: int,
    max_spans: int,
) -> list[tuple[int, int]]:
    """Inclusive ``(start, end)`` token spans of one window whose document tokens begin exactly at an answer's
    first character and end exactly at its last (``offsets``: the window's offset mapping)."""
    starts, ends = {}, {}
    for t, ((begin, finish), in_doc) in enumerate(zip(offsets, doc_mask, strict=True)):
        if in_doc and finish > begin:
            starts.setdefault(begin, t)
            ends[finish] = t
    spans = []
    for begin, finish in char_spans:
        first, last = starts.get(begin), ends.get(finish)
        if first is not None and last is not None and 0 <= last - first < max_span_width:
            spans.append((first, last))
            if len(spans) == max_spans:
                break
    return spans


def _check_doc_positions(
    doc_positions: np.ndarray | Sequence[Sequence[int]], num_questions: int
) -> np.ndarray:
    """``doc_positions`` as int64 ``[b, k]``, refused unless it has one row per question."""
    positions = np.asarray(doc_positions, dtype=np.int64)
    if positions.ndim != 2 or positions.shape[0] != num_questions:
        raise ValueError(
            f"doc_positions has shape {positions.shape}; expected [{num_questions}, k], one row per question."
        )
    return positions


def _model_inputs(
    question_enc: Any, windows: ReaderWindows, positions: np.ndarray, index: DocumentIndex
) -> dict[str, torch.Tensor]:
    """The tensors ``RealmForOpenQA.forward`` takes, under the names it takes them by."""
    features = {f"question_{name}": tensor for name, tensor in question_enc.items()}
    features.update({f"reader_{name}": tensor for name, tensor in windows.tensors.items()})
    features["doc_mask"] = windows.doc_mask
    features["window_doc"] = windows.window_doc
    features["doc_valid"] = torch.from_numpy(positions >= 0)
    features["doc_embeddings"] = index.embeddings_for(positions)
    return features


def _answer_labels(
    windows: ReaderWindows,
    texts: list[list[str]],
    answers: list[list[str]],
    max_span_width: int,
    max_answer_spans: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``answer_starts`` / ``answer_ends`` ``[b, n, m]``: each window's answer spans, ``-1`` past the last."""
    batch, n = windows.window_doc.shape
    starts = torch.full((batch, n, max_answer_spans), -1, dtype=torch.long)
    ends = torch.full_like(starts, -1)
    for b, question_offsets in enumerate(windows.offsets):
        chars = [find_answer_chars(text, answers[b]) for text in texts[b]]
        for w, offsets in enumerate(question_offsets):
            spans = match_answer_spans(
                offsets,
                windows.doc_mask[b, w].tolist(),
                chars[int(windows.window_doc[b, w])],
                max_span_width,
                max_answer_spans,
            )
            for m, (start, end) in enumerate(spans):
                starts[b, w, m], ends[b, w, m] = start, end
    return starts, ends


def _window_meta(
    positions: np.ndarray, index: DocumentIndex, texts: list[list[str]], windows: ReaderWindows
) -> dict[str, Any]:
    """What turns a predicted span back into text: the documents' ids and texts, the windows' offsets."""
    return {
        "positions": positions,
        "doc_ids": [[index.ids[p] if p >= 0 else None for p in row] for row in positions],
        "texts": texts,
        "offsets": windows.offsets,
    }


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

    Every document is read in windows of ``max_reader_length`` tokens overlapping by ``reader_stride``; the
    windows of a question are laid out along one axis ``[b, n, seq]`` and ``window_doc`` ``[b, n]`` says which
    of its k documents each comes from (``-1``: padding). Returns ``(features, meta)``: ``features`` are the
    tensors [`RealmForOpenQA.forward`][hf_knnlm.open_qa.RealmForOpenQA.forward] takes (with ``answer_starts``
    / ``answer_ends`` ``[b, n, m]`` when ``answers`` are given); ``meta`` has the document ids and texts and
    each window's character offsets, which turn a span back into text.

    Examples:

    ```python
    >>> from hf_knnlm.open_qa.testing import tiny_realm
    >>> model, tokenizer, index = tiny_realm()  # a random 1-layer REALM, documents paris and rome
    >>> from hf_knnlm.open_qa import build_features
    >>> features, meta = build_features(model, tokenizer, index, ["what is the capital of france"],
    ...                                 [[0, 1]], answers=[["paris"]])
    >>> tuple(features["reader_input_ids"].shape), features["window_doc"].tolist()  # [b, n, seq]
    ((1, 2, ...), [[0, 1]])
    >>> int(features["answer_starts"][0, 0, 0]) >= 0  # "paris" found in the first document's window
    True
    ```
    """
    config = model.config
    retriever_tok, reader_tok = retriever_tokenizer(tokenizer), reader_tokenizer(tokenizer)
    for tok in (retriever_tok, reader_tok):
        _require_fast(tok)
    positions = _check_doc_positions(doc_positions, len(questions))
    question_enc = retriever_tok(
        questions, truncation=True, max_length=config.max_question_length, padding=True, return_tensors="pt"
    )
    short_questions = _truncate_questions(reader_tok, questions, config.max_question_length)
    texts = [[index.texts[p] if p >= 0 else "" for p in row] for row in positions]
    windows = read_in_windows(reader_tok, short_questions, texts, positions, config)
    features = _model_inputs(question_enc, windows, positions, index)
    if answers is not None:
        features["answer_starts"], features["answer_ends"] = _answer_labels(
            windows, texts, answers, config.max_span_width, max_answer_spans
        )
    return features, _window_meta(positions, index, texts, windows)


LIVE_RETRIEVAL_IN_WORKER = (
    "RealmDataCollator retrieves with the live query encoder, but it is running in a DataLoader worker "
    "process, which holds a copy of the model frozen when the worker started (retrieval would silently use "
    "stale weights). Set dataloader_num_workers=0, or add a doc_positions column with precompute_retrieval() "
    "so that workers only build features."
)


class RealmDataCollator:
    """``Trainer`` collator: (question, answers) rows -> retrieval -> span labels -> padded tensors.

    Use ``TrainingArguments(remove_unused_columns=False)`` so that the raw ``question`` / ``answers`` columns
    reach the collator.

    Retrieval runs in the process that calls the collator, with the query encoder as it is at that step. In
    a ``DataLoader`` worker (``dataloader_num_workers > 0``) the model is a stale copy, so live retrieval is
    refused there; rows with a precomputed ``doc_positions`` column
    ([`precompute_retrieval`][hf_knnlm.open_qa.precompute_retrieval]) skip retrieval and are safe to collate
    in workers.

    Examples:

    ```python
    >>> from hf_knnlm.open_qa.testing import tiny_realm
    >>> model, tokenizer, index = tiny_realm()  # a random 1-layer REALM, documents paris and rome
    >>> from hf_knnlm.open_qa import RealmDataCollator
    >>> collator = RealmDataCollator(model, tokenizer, index)
    >>> batch = collator([{"question": "what is the capital of france", "answers": {"text": ["paris"]}}])
    >>> tuple(batch["doc_embeddings"].shape)  # the stored vectors of the 2 retrieved documents (width 128)
    (1, 2, 128)
    >>> "question_input_ids" in batch and "answer_starts" in batch  # what RealmForOpenQA.forward takes
    True
    ```
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
        _require_fast(retriever_tokenizer(tokenizer))
        _require_fast(reader_tokenizer(tokenizer))
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
            if torch.utils.data.get_worker_info() is not None:
                raise RuntimeError(LIVE_RETRIEVAL_IN_WORKER)
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
    ``datasets.Dataset``.

    Examples:

    ```python
    >>> from hf_knnlm.open_qa import precompute_retrieval
    >>> from hf_knnlm.open_qa.testing import tiny_questions, tiny_realm
    >>> model, tokenizer, index = tiny_realm()  # a random 1-layer REALM, documents paris and rome
    >>> rows = precompute_retrieval(tiny_questions(), model, tokenizer, index, top_k=2)  # a datasets.Dataset
    >>> rows.column_names, len(rows[0]["doc_positions"])  # DataLoader workers may collate these rows
    (['question', 'answers', 'doc_positions'], 2)
    ```
    """
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
