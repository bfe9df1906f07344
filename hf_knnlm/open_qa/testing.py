"""Tiny random REALM parts built in-process, for examples and tests (as transformers' testing utilities).

Nothing is downloaded and nothing is trained: the word-level BERT tokenizer and one-layer BERT config of
[`hf_knnlm.retrieval.testing`][hf_knnlm.retrieval.testing], a random retriever + reader built from them, and
a [`DocumentIndex`][hf_knnlm.open_qa.DocumentIndex] of two documents embedded by it. The numbers such a
model gives mean nothing; the shapes, types and file layouts are those of a real one (e.g. a REALM built
on ``all-MiniLM-L6-v2``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import torch
from transformers import BertTokenizerFast

from ..retrieval.document_index import DocumentIndex
from ..retrieval.testing import tiny_encoder_config, tiny_tokenizer
from ..utils.files import atomic_write_json
from .configuration import RealmConfig
from .modeling import RealmForOpenQA

TINY_DOCUMENTS: tuple[dict[str, str], ...] = (
    {"id": "paris", "title": "france", "text": "paris is the capital of france"},
    {"id": "rome", "title": "italy", "text": "rome is the capital of italy"},
)
TINY_QUESTIONS: tuple[dict[str, Any], ...] = (
    {"question": "what is the capital of france", "answers": ["paris"]},
    {"question": "what is the capital of italy", "answers": ["rome"]},
)
TINY_SQUAD: dict[str, Any] = {
    "data": [
        {
            "title": "cats",
            "paragraphs": [
                {
                    "context": "the cat sits on the mat",
                    "qas": [
                        {
                            "id": "q1",
                            "question": "where does the cat sit",
                            "answers": [{"text": "the mat", "answer_start": 16}],
                        }
                    ],
                }
            ],
        },
        {"title": "dogs", "paragraphs": [{"context": "the dog runs in the park", "qas": []}]},
    ]
}


class TinyRealm(NamedTuple):
    """What [`tiny_realm`][hf_knnlm.open_qa.testing.tiny_realm] returns.

    Examples:

    ```python
    >>> from hf_knnlm.open_qa.testing import tiny_realm
    >>> tiny = tiny_realm()  # or unpack it: model, tokenizer, index = tiny_realm()
    >>> tiny._fields
    ('model', 'tokenizer', 'index')
    ```
    """

    model: RealmForOpenQA
    tokenizer: BertTokenizerFast
    index: DocumentIndex


def tiny_realm(
    documents: tuple[dict[str, str], ...] | list[dict[str, str]] = TINY_DOCUMENTS,
    *,
    seed: int = 0,
    top_k: int = 2,
    **config_kwargs: Any,
) -> TinyRealm:
    """A random REALM ``(model, tokenizer, index)``: the model in eval mode, seeded with ``seed``, the
    tokenizer of [`tiny_tokenizer`][hf_knnlm.retrieval.testing.tiny_tokenizer], and ``documents`` (by default
    ``paris`` and ``rome``) embedded into a [`DocumentIndex`][hf_knnlm.open_qa.DocumentIndex].
    ``config_kwargs`` go to [`RealmConfig`][hf_knnlm.open_qa.RealmConfig].

    It is what the example of [`RealmForOpenQA`][hf_knnlm.open_qa.RealmForOpenQA] builds step by step.

    Examples:

    ```python
    >>> from hf_knnlm.open_qa.testing import tiny_realm
    >>> model, tokenizer, index = tiny_realm()
    >>> type(model).__name__, model.config.top_k, index.ids  # untrained, so its answers are random spans
    ('RealmForOpenQA', 2, ['paris', 'rome'])
    ```
    """
    tokenizer = tiny_tokenizer()
    encoder = tiny_encoder_config(len(tokenizer))
    torch.manual_seed(seed)
    config = RealmConfig(encoder_config=encoder.to_dict(), top_k=top_k, **config_kwargs)
    model = RealmForOpenQA(config).eval()
    index = DocumentIndex.build(list(documents), model, tokenizer, show_progress=False)
    return TinyRealm(model, tokenizer, index)


def tiny_questions() -> datasets.Dataset:
    """``TINY_QUESTIONS`` as a ``datasets.Dataset`` (``question``, ``answers``): one question per document
    of [`tiny_realm`][hf_knnlm.open_qa.testing.tiny_realm], the rows training and evaluation read.

    Examples:

    ```python
    >>> from hf_knnlm.open_qa.testing import tiny_questions
    >>> rows = tiny_questions()
    >>> rows.column_names, rows[1]
    (['question', 'answers'], {'question': 'what is the capital of italy', 'answers': ['rome']})
    ```
    """
    return datasets.Dataset.from_list(list(TINY_QUESTIONS))


def write_tiny_squad(path: str | os.PathLike) -> Path:
    """Write ``TINY_SQUAD`` to ``path`` as a SQuAD v1.1 JSON file: two articles, ``cats`` (one paragraph,
    one question "where does the cat sit", answer "the mat") and ``dogs`` (one paragraph, no question).

    Examples:

    ```python
    >>> from hf_knnlm.open_qa.testing import write_tiny_squad
    >>> path = write_tiny_squad("squad.json")
    >>> import json
    >>> [article["title"] for article in json.loads(path.read_text())["data"]]
    ['cats', 'dogs']
    ```
    """
    atomic_write_json(path, TINY_SQUAD)
    return Path(path)


__all__ = [
    "TINY_DOCUMENTS",
    "TINY_QUESTIONS",
    "TINY_SQUAD",
    "TinyRealm",
    "tiny_questions",
    "tiny_realm",
    "write_tiny_squad",
]
