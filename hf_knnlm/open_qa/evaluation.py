"""Retrieval recall, end-to-end exact match / F1, and the gold-paragraph reader upper bound."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..retrieval.document_index import DocumentIndex
from .data import build_features, retrieve
from .squad import exact_match, f1_score


def retrieval_recall(
    model: Any,
    tokenizer: Any,
    index: DocumentIndex,
    questions: Sequence[str],
    gold_doc_ids: Sequence[str],
    *,
    ks: Sequence[int] = (1, 5),
    batch_size: int = 64,
) -> dict[str, float]:
    """Fraction of questions whose gold document is among the top-k retrieved, for each k in ``ks``.

    Examples:

    ```python
    >>> from hf_knnlm.open_qa.testing import tiny_realm
    >>> model, tokenizer, index = tiny_realm()  # a random 1-layer REALM, documents paris and rome
    >>> from hf_knnlm.open_qa import retrieval_recall
    >>> questions, gold = ["what is the capital of france"], ["paris"]
    >>> recall = retrieval_recall(model, tokenizer, index, questions, gold, ks=(1, 2))
    >>> sorted(recall), recall["recall@2"]  # with 2 documents, the gold one is always in the top 2
    (['recall@1', 'recall@2'], 1.0)
    ```
    """
    if len(questions) != len(gold_doc_ids):
        raise ValueError(
            f"{len(questions)} questions but {len(gold_doc_ids)} gold document ids; pass one each."
        )
    gold = np.asarray(index.positions_of(gold_doc_ids))
    hits = {k: 0 for k in ks}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(questions), batch_size):
            positions = retrieve(
                model, tokenizer, index, list(questions[start : start + batch_size]), max(ks)
            )
            for k in ks:
                hits[k] += int((positions[:, :k] == gold[start : start + batch_size, None]).any(axis=1).sum())
    finally:
        model.train(was_training)
    return {f"recall@{k}": hits[k] / max(len(questions), 1) for k in ks}


def _score(predictions: list[dict[str, Any]], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    em = [exact_match(p["answer"], list(a)) for p, a in zip(predictions, answers, strict=True)]
    f1 = [f1_score(p["answer"], list(a)) for p, a in zip(predictions, answers, strict=True)]
    n = max(len(em), 1)
    return {"exact_match": 100.0 * sum(em) / n, "f1": 100.0 * sum(f1) / n, "questions": len(em)}


def evaluate_open(
    model: Any,
    tokenizer: Any,
    index: DocumentIndex,
    questions: Sequence[str],
    answers: Sequence[Sequence[str]],
    *,
    top_k: int | None = None,
    batch_size: int = 8,
    show_progress: bool = True,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """End-to-end open QA: retrieve top-k, read, SQuAD EM / F1 (in percent) of the best span.

    Examples:

    ```python
    >>> from hf_knnlm.open_qa.testing import tiny_realm
    >>> model, tokenizer, index = tiny_realm()  # a random 1-layer REALM, documents paris and rome
    >>> from hf_knnlm.open_qa import evaluate_open
    >>> scores, predictions = evaluate_open(model, tokenizer, index, ["what is the capital of france"],
    ...                                     [["paris"]], show_progress=False)
    >>> sorted(scores), sorted(predictions[0])[:3]  # SQuAD EM / F1 in percent, and each prediction
    (['exact_match', 'f1', 'questions'], ['answer', 'doc_id', 'doc_ids'])
    ```
    """
    predictions: list[dict[str, Any]] = []
    for start in tqdm(range(0, len(questions), batch_size), desc="open QA", disable=not show_progress):
        predictions += model.answer(
            list(questions[start : start + batch_size]), index, tokenizer, top_k=top_k, batch_size=batch_size
        )
    return _score(predictions, answers), predictions


def evaluate_gold(
    model: Any,
    tokenizer: Any,
    index: DocumentIndex,
    questions: Sequence[str],
    answers: Sequence[Sequence[str]],
    gold_doc_ids: Sequence[str],
    *,
    batch_size: int = 8,
    show_progress: bool = True,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The same reader given only the gold paragraph (p(z|x) = 1): an upper bound for end-to-end EM / F1.

    Examples:

    ```python
    >>> from hf_knnlm.open_qa.testing import tiny_realm
    >>> model, tokenizer, index = tiny_realm()  # a random 1-layer REALM, documents paris and rome
    >>> from hf_knnlm.open_qa import evaluate_gold
    >>> scores, predictions = evaluate_gold(model, tokenizer, index, ["what is the capital of france"],
    ...                                     [["paris"]], ["paris"], show_progress=False)
    >>> sorted(scores), predictions[0]["doc_id"]  # read from the gold paragraph only
    (['exact_match', 'f1', 'questions'], 'paris')
    ```
    """
    gold = index.positions_of(gold_doc_ids)
    was_training = model.training
    model.eval()
    predictions: list[dict[str, Any]] = []
    try:
        for start in tqdm(
            range(0, len(questions), batch_size), desc="gold paragraph", disable=not show_progress
        ):
            chunk = list(questions[start : start + batch_size])
            positions = np.asarray(gold[start : start + batch_size])[:, None]
            features, meta = build_features(model, tokenizer, index, chunk, positions)
            predictions += model.decode(features, meta)
    finally:
        model.train(was_training)
    return _score(predictions, answers), predictions


__all__ = ["evaluate_gold", "evaluate_open", "retrieval_recall"]
