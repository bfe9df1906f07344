"""Perplexity of long documents, each scored from its start, by one of four kinds of attention.

* ``window``: sliding windows of ``max_length`` tokens, each run alone (the baseline);
* ``unlimiformer``: the same windows, every head also attending over its top-k keys of the whole
  preceding document (``Unlimiformer``);
* ``memorizing``: the same windows, one layer also attending over its kNN memory of the document so
  far, mixed in by a (trained) gate (``MemorizingTransformer``);
* ``full``: one forward over the whole document (up to the model's maximum positions); the output
  layer runs in chunks, so the logits of a long document are never all in memory at once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils.checks import check_positive_int, is_int
from .memorizing import MemorizingTransformer
from .settings import METHODS, MemorizingSettings, UnlimiformerSettings
from .unlimiformer import Unlimiformer, windowed_log_probs


def max_positions(model: nn.Module) -> int | None:
    """The most positions ``model`` has embeddings for (None: no limit in its config)."""
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


@torch.no_grad()
def full_attention_log_probs(model: nn.Module, input_ids: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Log-probabilities of tokens 1..n-1 of one document (1-D ids) with full attention over all of it.

    Args:
        model (`PreTrainedModel`): A causal LM whose logits are its output layer applied to the last
            hidden state (the Llama family, GPT-2).
        input_ids (`torch.Tensor`): One document's token ids, 1-D, at most the model's maximum positions.
        chunk (`int`, *optional*, defaults to 512): Positions per call of the output layer.

    Examples:

    ```python
    >>> import torch
    >>> from transformers import AutoModelForCausalLM, GPT2Config
    >>> from hf_knnlm.attention.evaluation import full_attention_log_probs
    >>> _ = torch.manual_seed(0)
    >>> model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50,
    ...                                                     n_positions=64)).eval()
    >>> ids = torch.randint(0, 50, (64,))
    >>> logits = model(ids[None]).logits[0, :-1]
    >>> expected = torch.log_softmax(logits, -1).gather(1, ids[1:, None])[:, 0]
    >>> bool(torch.allclose(full_attention_log_probs(model, ids, chunk=16), expected, atol=1e-5))
    True
    >>> full_attention_log_probs(model, torch.randint(0, 50, (65,)))
    Traceback (most recent call last):
    ...
    ValueError: a document of 65 tokens is longer than the model's 64 positions; keep its first 64 ...
    ```
    """
    check_positive_int("chunk", chunk, "positions per call of the output layer")
    if input_ids.ndim != 1:
        raise ValueError(f"input_ids of shape {tuple(input_ids.shape)} must be 1-D (one document).")
    limit = max_positions(model)
    if limit is not None and len(input_ids) > limit:
        raise ValueError(
            f"a document of {len(input_ids)} tokens is longer than the model's {limit} positions; "
            f"keep its first {limit} tokens (--max-tokens {limit})."
        )
    device = model.get_output_embeddings().weight.device
    hidden = model.base_model(input_ids[None].to(device), use_cache=False).last_hidden_state[0, :-1]
    head, targets = model.get_output_embeddings(), input_ids[1:].to(device)
    out = [
        torch.log_softmax(head(hidden[i : i + chunk]).float(), -1).gather(1, targets[i : i + chunk, None])[
            :, 0
        ]
        for i in range(0, len(hidden), chunk)
    ]
    return torch.cat(out).cpu() if out else torch.empty(0)


def _scorer(model: nn.Module, method: str, settings: Any, gate: str | Path | None):
    """``input_ids -> log-probs`` of one document for ``method``, its settings checked."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {list(METHODS)}.")
    if gate is not None and method != "memorizing":
        raise ValueError(
            f"gate={str(gate)!r} is a Memorizing Transformers gate; pass it with method='memorizing'."
        )
    if method == "full":
        return lambda ids: full_attention_log_probs(model, ids)
    wanted = MemorizingSettings if method == "memorizing" else UnlimiformerSettings
    settings = wanted() if settings is None else settings
    accepted = (UnlimiformerSettings, MemorizingSettings) if method == "window" else (wanted,)
    if not isinstance(settings, accepted):
        raise TypeError(f"method={method!r} takes a {wanted.__name__}, not {type(settings).__name__}.")
    if method == "window":
        return lambda ids: windowed_log_probs(model, ids, settings.max_length, settings.stride)
    if method == "unlimiformer":
        return Unlimiformer(model, settings).log_probs
    memorizing = MemorizingTransformer(model, settings)
    if gate is not None:
        memorizing.load_gate(gate)
    return memorizing.log_probs


def long_context_perplexity(
    model: nn.Module,
    documents: Sequence[torch.Tensor],
    *,
    method: str = "unlimiformer",
    settings: UnlimiformerSettings | MemorizingSettings | None = None,
    score_from: int = 0,
    gate: str | Path | None = None,
) -> dict[str, Any]:
    """Perplexity of the tokens at positions ``score_from`` and later of every document, each scored
    from its start (memories cleared between documents) with one of ``window``, ``unlimiformer``,
    ``memorizing`` and ``full``.

    Args:
        model (`PreTrainedModel`): A causal LM of the Llama family (Llama, SmolLM2, Qwen2) or GPT-2.
        documents (`Sequence[torch.Tensor]`): Token ids, one 1-D tensor per document.
        method (`str`, *optional*, defaults to ``"unlimiformer"``): ``window``, ``unlimiformer``,
            ``memorizing`` or ``full`` (see the module doc).
        settings (`UnlimiformerSettings | MemorizingSettings`, *optional*): The method's settings
            (``memorizing``: a MemorizingSettings; ``window``: either, for its windows; ``full``: none);
            default: the library defaults.
        score_from (`int`, *optional*, defaults to 0): The first scored position; 512 with 512-token
            windows scores only tokens that a window alone cannot see the whole past of.
        gate (`str | Path`, *optional*): A folder with a trained gate (``MemorizingTransformer.save_gate``).

    Returns:
        `dict`: ``method``, ``perplexity``, ``scored_tokens``, ``documents`` and ``seconds`` (wall time).

    Examples:

    ```python
    >>> import torch
    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> from hf_knnlm.attention import UnlimiformerSettings, long_context_perplexity
    >>> _ = torch.manual_seed(0)
    >>> config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                      num_attention_heads=4, num_key_value_heads=2)
    >>> model = AutoModelForCausalLM.from_config(config).eval()
    >>> documents = [torch.randint(0, 50, (80,)), torch.randint(0, 50, (60,))]
    >>> settings = UnlimiformerSettings(k=80, max_length=16, stride=8)  # k >= every document
    >>> ppl = {method: long_context_perplexity(model, documents, method=method, settings=settings,
    ...                                        score_from=16)["perplexity"]
    ...        for method in ("window", "unlimiformer", "full")}
    >>> abs(ppl["unlimiformer"] - ppl["full"]) < 1e-3  # every earlier key retrieved: full attention
    True
    >>> abs(ppl["window"] - ppl["full"]) < 1e-3  # the window alone is not
    False
    >>> result = long_context_perplexity(model, documents, method="window", settings=settings, score_from=16)
    >>> result["scored_tokens"], result["documents"]  # 64 + 44 tokens at positions >= 16
    (108, 2)
    ```
    """
    if not is_int(score_from) or score_from < 0:
        raise ValueError(f"score_from={score_from!r} must be an integer >= 0 (the first scored position).")
    score = _scorer(model, method, settings, gate)
    total, count, start = 0.0, 0, time.perf_counter()
    for position, ids in enumerate(documents):
        if not isinstance(ids, torch.Tensor) or ids.ndim != 1:
            raise ValueError(f"documents[{position}] must be a 1-D tensor of token ids.")
        with torch.no_grad():
            scores = score(ids)[max(score_from - 1, 0) :]  # scores[i] is the log-prob of token i + 1
        total, count = total - float(scores.double().sum()), count + len(scores)
    if count == 0:
        raise ValueError(
            f"no document has a token at position {score_from} or later; lower score_from or pass "
            "longer documents."
        )
    return {
        "method": method,
        "perplexity": math.exp(total / count),
        "scored_tokens": count,
        "documents": len(documents),
        "seconds": time.perf_counter() - start,
    }


__all__ = ["METHODS", "full_attention_log_probs", "long_context_perplexity", "max_positions"]
