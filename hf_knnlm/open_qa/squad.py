"""SQuAD-format data for open QA and the official SQuAD v1.1 answer metrics.

In the open setting every paragraph becomes a document (title = article title) and a question is answered
against the whole collection; the paragraph it was written for is kept as its gold document so that retrieval
recall can be measured.
"""

from __future__ import annotations

import collections
import json
import os
import re
import string
from pathlib import Path
from typing import Any

import datasets


def _load_articles(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SQuAD file {path} does not exist; pass the path of a SQuAD v1.1 JSON file.")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"{path} is not in the SQuAD JSON layout ({{'data': [{{'title', 'paragraphs'}}]}}).")
    return data["data"]


def paragraph_id(article: int, paragraph: int) -> str:
    return f"{article}-{paragraph}"


def load_squad_open(
    path: str | os.PathLike, *, articles: slice | None = None
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """``(documents, questions)`` of a SQuAD JSON file.

    ``documents`` holds *all* paragraphs (``id``, ``title``, ``text``) whatever ``articles`` says: the open
    collection is the whole file. ``questions`` (``id``, ``question``, ``answers``, ``gold_doc_id``) come only
    from the articles selected by ``articles`` (e.g. ``slice(0, 38)``).

    Examples:

    ```python
    >>> from hf_knnlm.open_qa.testing import write_tiny_squad
    >>> _ = write_tiny_squad("squad.json")  # articles "cats" (1 paragraph, 1 question) and "dogs" (1, none)
    >>> from hf_knnlm.open_qa import load_squad_open
    >>> documents, questions = load_squad_open("squad.json", articles=slice(0, 1))
    >>> len(documents), len(questions)  # every paragraph is retrievable; questions of the chosen articles
    (2, 1)
    ```
    """
    all_articles = _load_articles(path)
    chosen = set(range(len(all_articles))[articles or slice(None)])
    docs: dict[str, list] = {"id": [], "title": [], "text": []}
    questions: dict[str, list] = {"id": [], "question": [], "answers": [], "gold_doc_id": []}
    for a, article in enumerate(all_articles):
        for p, paragraph in enumerate(article["paragraphs"]):
            doc_id = paragraph_id(a, p)
            docs["id"].append(doc_id)
            docs["title"].append(article["title"].replace("_", " "))
            docs["text"].append(paragraph["context"])
            if a not in chosen:
                continue
            for qa in paragraph["qas"]:
                questions["id"].append(qa["id"])
                questions["question"].append(qa["question"])
                questions["answers"].append([answer["text"] for answer in qa["answers"]])
                questions["gold_doc_id"].append(doc_id)
    return datasets.Dataset.from_dict(docs), datasets.Dataset.from_dict(questions)


def load_squad(path: str | os.PathLike, *, articles: slice | None = None) -> datasets.Dataset:
    """The questions of the chosen articles in the layout of the Hub's ``squad`` dataset (``id``, ``title``,
    ``context``, ``question``, ``answers`` = ``{"text": [...], "answer_start": [...]}``) plus ``gold_doc_id``:
    what [`train_reader`][hf_knnlm.open_qa.train_reader] reads.

    Examples:

    ```python
    >>> from hf_knnlm.open_qa.testing import write_tiny_squad
    >>> _ = write_tiny_squad("squad.json")  # articles "cats" (1 paragraph, 1 question) and "dogs" (1, none)
    >>> from hf_knnlm.open_qa import load_squad
    >>> rows = load_squad("squad.json", articles=slice(0, 1))  # the Hub squad layout, + gold_doc_id
    >>> rows[0]["question"], rows[0]["answers"], rows[0]["gold_doc_id"]
    ('where does the cat sit', {'text': ['the mat'], 'answer_start': [16]}, '0-0')
    ```
    """
    all_articles = _load_articles(path)
    rows: dict[str, list] = {k: [] for k in ("id", "title", "context", "question", "answers", "gold_doc_id")}
    for a in range(len(all_articles))[articles or slice(None)]:
        article = all_articles[a]
        for p, paragraph in enumerate(article["paragraphs"]):
            for qa in paragraph["qas"]:
                rows["id"].append(qa["id"])
                rows["title"].append(article["title"].replace("_", " "))
                rows["context"].append(paragraph["context"])
                rows["question"].append(qa["question"])
                rows["answers"].append(
                    {
                        "text": [answer["text"] for answer in qa["answers"]],
                        "answer_start": [int(answer["answer_start"]) for answer in qa["answers"]],
                    }
                )
                rows["gold_doc_id"].append(paragraph_id(a, p))
    return datasets.Dataset.from_dict(rows)


# -- official SQuAD v1.1 evaluation (normalisation, exact match, token F1) ----------------------------------
def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation, articles (a/an/the) and extra white space."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: list[str]) -> float:
    return max((float(normalize_answer(prediction) == normalize_answer(a)) for a in answers), default=0.0)


def _f1(prediction: str, truth: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    true_tokens = normalize_answer(truth).split()
    common = collections.Counter(pred_tokens) & collections.Counter(true_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(true_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, answers: list[str]) -> float:
    return max((_f1(prediction, a) for a in answers), default=0.0)


__all__ = ["exact_match", "f1_score", "load_squad", "load_squad_open", "normalize_answer", "paragraph_id"]
