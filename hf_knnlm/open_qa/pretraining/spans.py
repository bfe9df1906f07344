"""Salient spans for REALM's masking: a rule set for named entities and dates that needs no model.

REALM masks *salient spans* (named entities and dates, found by a tagger in the paper) rather than random
tokens, so that the masked text can only be restored with world knowledge. This module finds them with
rules that install offline and run in microseconds:

* **dates**: ``March 3, 1990``, ``3 March 1990``, ``March 1990``, and years and decades 1000-2099
  (``1990``, ``1990s``);
* **numbers**: other digit groups (``2,067``, ``3.5``, ``45``);
* **named entities**: runs of capitalised words (``University of Notre Dame``, ``Super Bowl 50``),
  joined through ``of``, ``the``, ``de``, ``von``, ``van``, ``and`` and ``for`` when a capitalised word
  follows.
  At the start of a sentence leading function words (``The``, ``In``, ``However``, ...) are dropped, and a
  run left with only its sentence-initial word is dropped too (it is capitalised because it starts the
  sentence, not because it is a name). A possessive ``'s`` and surrounding punctuation are not part of
  the span. Entity runs that overlap a date, and numbers inside an entity (``Super Bowl 50``), are dropped.

Its precision on SQuAD v1.1 dev paragraphs is measured by hand in the pre-training how-to
(docs/how-to/realm-pretraining.md).
"""

from __future__ import annotations

import re

_MONTHS = (
    "January|February|March|April|May|June|July|August|September|October|November|December|"
    "Jan\\.|Feb\\.|Mar\\.|Apr\\.|Aug\\.|Sept?\\.|Oct\\.|Nov\\.|Dec\\."
)
_DATES = [
    re.compile(rf"\b(?:{_MONTHS})\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}\b"),
    re.compile(rf"\b\d{{1,2}}(?:st|nd|rd|th)?\s+(?:{_MONTHS})\s+\d{{4}}\b"),
    re.compile(rf"\b(?:{_MONTHS})\s+\d{{4}}\b"),
    re.compile(r"\b(?:1\d|20)\d{2}s?\b"),
]
_NUMBER = re.compile(r"(?<![\w.,])\d+(?:[.,]\d+)*(?![\w])")
_CONNECTORS = frozenset("of the de du von van and for da del la".split())
_LEADING = frozenset(
    """the a an in on at it he she they we i this that these those there his her its their as after before
    during when while by for from with although however some many most other each one if since but and or
    so to of our my your what which who how where why also both all no not then thus despite under over
    between among until upon".""".split()
)
_OPENERS = "\"'(“‘["
_CLOSERS = ",;:!?\"')”’]"
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"”’)]?\s+(?=[\"“(]?[A-Z0-9])")


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character ``(start, end)`` of each sentence: a split after ``.``, ``!`` or ``?`` and white space
    before a capital letter or digit.

    Examples:

    ```python
    >>> from hf_knnlm.open_qa.pretraining.spans import split_sentences
    >>> text = "Paris is in France. It lies on the Seine."
    >>> [text[s:e] for s, e in split_sentences(text)]
    ['Paris is in France.', 'It lies on the Seine.']
    ```
    """
    spans, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        spans.append((start, match.start()))
        start = match.end()
    spans.append((start, len(text)))
    return [(s, e) for s, e in spans if text[s:e].strip()]


def _words(text: str) -> list[tuple[int, int, bool]]:
    """``(start, end, breaks)`` of each word with its edge punctuation stripped; ``breaks`` when punctuation
    (or a possessive) follows it or opens the next word, which ends an entity run."""
    words = []
    for match in re.finditer(r"\S+", text):
        start, end = match.start(), match.end()
        if start < end and text[start] in _OPENERS and words:
            words[-1] = (*words[-1][:2], True)
        while start < end and text[start] in _OPENERS:
            start += 1
        stripped, before = end, None
        while end != before:  # "Act)." or "Sorin's," lose every trailing mark, in any order
            before = end
            while end > start and text[end - 1] in _CLOSERS:
                end -= 1
            if text[end - 2 : end] in ("'s", "’s") and end - 2 > start:
                end -= 2
            if end > start and text[end - 1] == "." and "." not in text[start : end - 1]:
                end -= 1
        if end > start:
            words.append((start, end, end != stripped))
    return words


def _capitalised(word: str) -> bool:
    return word[:1].isupper() and word != "I"


def _entity_runs(text: str, offset: int) -> list[tuple[int, int]]:
    """Runs of capitalised words in one sentence (``offset`` is its start in the paragraph)."""
    words, runs, i = _words(text), [], 0
    while i < len(words):
        if not _capitalised(text[words[i][0] : words[i][1]]):
            i += 1
            continue
        first = last = i
        while not words[last][2] and last + 1 < len(words):
            nxt = text[words[last + 1][0] : words[last + 1][1]]
            if _capitalised(nxt) or nxt.isdigit():
                last += 1
            elif nxt in _CONNECTORS and last + 2 < len(words) and not words[last + 1][2]:
                after = text[words[last + 2][0] : words[last + 2][1]]
                if not _capitalised(after):
                    break
                last += 2
            else:
                break
        if first == 0:
            while first <= last and text[words[first][0] : words[first][1]].lower() in _LEADING:
                first += 1
            if first == last == 0:
                first = last + 1  # only the sentence-initial word: capitalised for being first
        if first <= last:
            runs.append((offset + words[first][0], offset + words[last][1]))
        i = last + 1
    return runs


def salient_spans(text: str) -> list[tuple[int, int, str]]:
    """``(start, end, kind)`` character spans of the dates, numbers and named entities of ``text``, in text
    order; ``kind`` is ``"date"``, ``"number"`` or ``"entity"``.

    Examples:

    ```python
    >>> from hf_knnlm.open_qa.pretraining.spans import salient_spans
    >>> text = "The University of Notre Dame was founded on November 26, 1842 by 7 priests. It grew."
    >>> [(text[s:e], kind) for s, e, kind in salient_spans(text)]
    [('University of Notre Dame', 'entity'), ('November 26, 1842', 'date'), ('7', 'number')]
    ```
    """
    taken: list[tuple[int, int, str]] = []

    def free(start: int, end: int) -> bool:
        return all(end <= s or start >= e for s, e, _ in taken)

    for pattern in _DATES:
        taken += [(m.start(), m.end(), "date") for m in pattern.finditer(text) if free(m.start(), m.end())]
    for start, end in split_sentences(text):
        for s, e in _entity_runs(text[start:end], start):
            if free(s, e):
                taken.append((s, e, "entity"))
    taken += [(m.start(), m.end(), "number") for m in _NUMBER.finditer(text) if free(m.start(), m.end())]
    return sorted(taken)


__all__ = ["salient_spans", "split_sentences"]
