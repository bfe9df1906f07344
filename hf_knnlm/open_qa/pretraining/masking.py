"""Masked sentences of the corpus for REALM pre-training: one salient (or random) span per sentence.

Each row of [`masked_examples`][hf_knnlm.open_qa.pretraining.masked_examples] is one sentence of one document,
tokenised as ``[CLS] sentence [SEP]`` with the tokens of one span replaced by ``[MASK]``: ``input_ids``,
``labels`` (the original ids at the masked tokens, -100 elsewhere), ``source`` (the document's position, so
that it is never retrieved), ``target`` (the masked text) and ``kind`` (``date``, ``number``, ``entity`` or
``random``). The span of every sentence is drawn from a generator seeded by (seed, document, sentence), so
the rows do not depend on the order or number of documents processed.
"""

from __future__ import annotations

import random
import re
from typing import Any

from ...retrieval.document_index import DocumentIndex
from ...retrieval.documents import rows_of
from ...retrieval.embedder import retriever_tokenizer
from .modeling import IGNORE_INDEX
from .settings import RealmPretrainingSettings
from .spans import salient_spans, split_sentences


def random_word_span(text: str, rng: random.Random, max_words: int) -> tuple[int, int] | None:
    """A random run of 1 to ``max_words`` whole words of ``text`` (characters), ``None`` for no word.

    Examples:

    ```python
    >>> import random
    >>> from hf_knnlm.open_qa.pretraining.masking import random_word_span
    >>> text = "the cat sat on the mat"
    >>> start, end = random_word_span(text, random.Random(0), max_words=2)
    >>> len(text[start:end].split()) <= 2 and text[start:end] in text
    True
    ```
    """
    words = [m.span() for m in re.finditer(r"\w[\w'’-]*", text)]
    if not words:
        return None
    length = rng.randint(1, min(max_words, len(words)))
    first = rng.randrange(len(words) - length + 1)
    return words[first][0], words[first + length - 1][1]


def mask_span(tokenizer: Any, text: str, span: tuple[int, int], max_length: int) -> dict[str, list] | None:
    """``[CLS] text [SEP]`` ids with every token overlapping the character ``span`` masked, and the labels;
    ``None`` when no token of the span survives truncation to ``max_length``.

    Examples:

    ```python
    >>> from transformers import BertTokenizerFast
    >>> from hf_knnlm.open_qa.pretraining.masking import mask_span
    >>> words = "[PAD] [UNK] [CLS] [SEP] [MASK] paris is in france".split()
    >>> tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(words)})
    >>> row = mask_span(tokenizer, "paris is in france", (12, 18), max_length=16)
    >>> tokenizer.decode(row["input_ids"]), row["labels"]
    ('[CLS] paris is in [MASK] [SEP]', [-100, -100, -100, -100, 8, -100])
    ```
    """
    encoded = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True)
    ids, labels = list(encoded["input_ids"]), [IGNORE_INDEX] * len(encoded["input_ids"])
    for i, (start, end) in enumerate(encoded["offset_mapping"]):
        if end > start and start < span[1] and end > span[0]:
            labels[i], ids[i] = ids[i], tokenizer.mask_token_id
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def _choose_span(sentence: str, rng: random.Random, settings: RealmPretrainingSettings):
    """``(start, end, kind)`` of the span to mask in one sentence, or ``None`` to leave it out."""
    if settings.masking == "salient":
        spans = salient_spans(sentence)
        if spans:
            return rng.choice(spans)
        if not settings.fallback_to_random:
            return None
    span = random_word_span(sentence, rng, settings.random_span_words)
    return None if span is None else (*span, "random")


def masked_examples(
    documents: Any,
    tokenizer: Any,
    settings: RealmPretrainingSettings | None = None,
    *,
    max_length: int = 64,
) -> list[dict[str, Any]]:
    """One masked row per sentence of every document (a [`DocumentIndex`][hf_knnlm.retrieval.DocumentIndex]
    or rows with ``text``); ``max_length`` is the model's ``max_question_length``.

    Examples:

    ```python
    >>> from transformers import BertTokenizerFast
    >>> from hf_knnlm.open_qa.pretraining import masked_examples
    >>> words = "[PAD] [UNK] [CLS] [SEP] [MASK] paris is the capital of france since 1790 it .".split()
    >>> tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(words)}, do_lower_case=True)
    >>> docs = [{"text": "Paris is the capital of France since 1790. It is."}]
    >>> rows = masked_examples(docs, tokenizer)  # the second sentence is too short to mask
    >>> [(row["target"], row["kind"], row["source"]) for row in rows]
    [('1790', 'date', 0)]
    >>> tokenizer.decode(rows[0]["input_ids"])
    '[CLS] paris is the capital of france since [MASK]. [SEP]'
    ```
    """
    settings = settings or RealmPretrainingSettings()
    texts = documents.texts if isinstance(documents, DocumentIndex) else rows_of(documents)[2]
    tokenizer = retriever_tokenizer(tokenizer)
    rows = []
    for position, text in enumerate(texts):
        sentences = split_sentences(text)[: settings.max_sentences_per_document]
        for start, end in sentences:
            sentence = text[start:end]
            if len(sentence.split()) < settings.min_sentence_words:
                continue
            chosen = _choose_span(sentence, random.Random(f"{settings.seed}:{position}:{start}"), settings)
            row = chosen and mask_span(tokenizer, sentence, chosen[:2], max_length)
            if row:
                target = sentence[chosen[0] : chosen[1]]
                rows.append({**row, "source": position, "target": target, "kind": chosen[2]})
    return rows


__all__ = ["mask_span", "masked_examples", "random_word_span"]
