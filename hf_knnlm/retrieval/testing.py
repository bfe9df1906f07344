"""Tiny random retrieval parts built in-process, for examples and tests (as transformers' testing utilities).

A word-level BERT tokenizer over a handful of words and a one-layer BERT config of width 32: nothing is
downloaded, and an encoder built from them is random, so its vectors mean nothing but have the shapes
and types of a real one. [`hf_knnlm.open_qa.testing`][hf_knnlm.open_qa.testing] builds a whole REALM
from them.
"""

from __future__ import annotations

from transformers import BertConfig, BertTokenizerFast

TINY_WORDS: tuple[str, ...] = tuple(
    "[PAD] [UNK] [CLS] [SEP] [MASK] what is the capital of france italy paris rome".split()
)


def tiny_tokenizer(words: tuple[str, ...] | list[str] = TINY_WORDS) -> BertTokenizerFast:
    """A word-level BERT tokenizer whose vocabulary is ``words`` (the BERT special tokens first).

    Examples:

    ```python
    >>> from hf_knnlm.retrieval.testing import tiny_tokenizer
    >>> tokenizer = tiny_tokenizer()
    >>> tokenizer.tokenize("what is the capital of france"), len(tokenizer)
    (['what', 'is', 'the', 'capital', 'of', 'france'], 14)
    ```
    """
    return BertTokenizerFast(vocab={word: i for i, word in enumerate(words)})


def tiny_encoder_config(vocab_size: int) -> BertConfig:
    """A one-layer BERT config of width 32 (two heads): the shape, not the size, of e.g.
    ``all-MiniLM-L6-v2``'s config.

    Examples:

    ```python
    >>> from hf_knnlm.retrieval.testing import tiny_encoder_config
    >>> config = tiny_encoder_config(vocab_size=14)
    >>> config.hidden_size, config.num_hidden_layers, config.vocab_size
    (32, 1, 14)
    ```
    """
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )


__all__ = ["TINY_WORDS", "tiny_encoder_config", "tiny_tokenizer"]
