"""A tiny random causal LM built in-process, for examples and tests (as transformers' testing utilities).

[`tiny_causal_lm`][hf_knnlm.lm.testing.tiny_causal_lm] gives a random two-layer GPT-2 of width 32 with
GPT-2's tokenizer (its files come from the Hub once, then from the Hub cache): the numbers such a model
gives mean nothing, but it runs every code path a real causal LM does, in a fraction of a second.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config


class TinyLM(NamedTuple):
    """What [`tiny_causal_lm`][hf_knnlm.lm.testing.tiny_causal_lm] returns.

    Examples:

    ```python
    >>> from hf_knnlm.lm.testing import tiny_causal_lm
    >>> tiny_causal_lm()._fields  # or unpack it: model, tokenizer = tiny_causal_lm()
    ('model', 'tokenizer')
    ```
    """

    model: torch.nn.Module
    tokenizer: Any


def tiny_causal_lm(*, n_layer: int = 2, n_embd: int = 32, seed: int | None = None) -> TinyLM:
    """``(model, tokenizer)``: a random GPT-2 (``n_layer`` layers of width ``n_embd``, two heads, GPT-2's
    vocabulary) and the ``gpt2`` tokenizer. With ``seed`` the weights are drawn after
    ``torch.manual_seed(seed)``.

    Examples:

    ```python
    >>> from hf_knnlm.lm.testing import tiny_causal_lm
    >>> model, tokenizer = tiny_causal_lm()
    >>> type(model).__name__, model.config.n_layer, model.config.n_embd, len(tokenizer)
    ('GPT2LMHeadModel', 2, 32, 50257)
    ```
    """
    tokenizer = AutoTokenizer.from_pretrained("gpt2")
    if seed is not None:
        torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2))
    return TinyLM(model, tokenizer)


__all__ = ["TinyLM", "tiny_causal_lm"]
