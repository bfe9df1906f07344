"""A tiny random kNN-LM built in-process, for examples and tests (as transformers' testing utilities).

[`tiny_datastore`][hf_knnlm.datastore.testing.tiny_datastore] runs the random GPT-2 of
[`tiny_causal_lm`][hf_knnlm.lm.testing.tiny_causal_lm] over a few sentences and saves a
[`Datastore`][hf_knnlm.Datastore] of them; the store's structure (files, config, entries per token) is
that of a real one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from ..lm.testing import tiny_causal_lm
from .datastore import Datastore

TINY_TEXT: tuple[str, ...] = ("The cat sat on the mat.",)


class TinyKNNLM(NamedTuple):
    """What [`tiny_datastore`][hf_knnlm.datastore.testing.tiny_datastore] returns.

    Examples:

    ```python
    >>> from hf_knnlm.datastore.testing import tiny_datastore
    >>> tiny_datastore("tiny-store")._fields  # or unpack it: model, tokenizer, store = tiny_datastore(...)
    ('model', 'tokenizer', 'store')
    ```
    """

    model: torch.nn.Module
    tokenizer: Any
    store: Datastore


def tiny_datastore(
    folder: str | os.PathLike,
    texts: Sequence[str] = TINY_TEXT,
    *,
    max_length: int = 16,
    stride: int = 8,
    seed: int | None = None,
) -> TinyKNNLM:
    """``(model, tokenizer, store)``: the model and tokenizer of
    [`tiny_causal_lm`][hf_knnlm.lm.testing.tiny_causal_lm] (``seed`` goes to it) and a
    [`Datastore`][hf_knnlm.Datastore] of ``texts`` (by default "The cat sat on the mat.") built by them in
    windows of ``max_length`` / ``stride`` tokens and saved in ``folder``.

    Examples:

    ```python
    >>> from hf_knnlm.datastore.testing import tiny_datastore
    >>> model, tokenizer, store = tiny_datastore("my-store")
    >>> len(store), store.hidden_size, store.folder.name  # one entry per token after the first
    (6, 32, 'my-store')
    ```
    """
    model, tokenizer = tiny_causal_lm(seed=seed)
    store = Datastore.build(
        model, tokenizer, list(texts), folder, max_length=max_length, stride=stride, disable_progress=True
    )
    return TinyKNNLM(model, tokenizer, store)


__all__ = ["TINY_TEXT", "TinyKNNLM", "tiny_datastore"]
