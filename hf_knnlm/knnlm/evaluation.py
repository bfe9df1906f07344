"""Perplexity of the base LM and of the kNN-LM over the same sliding windows as the build."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..datastore.datastore import Datastore
from ..lm.corpus import CorpusLike
from ..lm.forward import check_forward_args
from ..lm.windows import WindowSettings
from ..utils.outputs import Output
from .policies import GateLike, RetrievalStats, SearchPolicy, search_policy, split_gate
from .scored import iter_scored_batches, scored_tokens
from .settings import KNNSettings, settings_from


@dataclass
class PerplexityOutput(Output):
    """The result of [`evaluate_perplexity`][hf_knnlm.evaluate_perplexity] (also readable as a dict:
    ``result["knn_ppl"]``).

    Attributes:
        base_ppl: perplexity of the model alone.
        knn_ppl: perplexity of the kNN-LM (None without a datastore).
        num_tokens: tokens scored.
        steps, searches, searches_saved: queries answered, faiss searches run and the fraction saved
            (RetoMaton and the gate save some; None without a datastore).
        settings: the kNN-LM settings used, resolved for the store (its temperature and k filled in).
        windows: the sliding windows used.
        search: the store's search setup (entries, index factory, nprobe).

    Examples:

    ```python
    >>> from hf_knnlm.datastore.testing import tiny_datastore
    >>> from hf_knnlm import evaluate_perplexity
    >>> text = ["The cat sat on the mat. The dog sat on the log."]
    >>> model, tokenizer, store = tiny_datastore("output-store", text)  # random GPT-2, a store of text
    >>> base = evaluate_perplexity(model, tokenizer, text, max_length=16, stride=8, disable_progress=True)
    >>> base.knn_ppl, base.searches  # without a datastore: the model alone
    (None, None)
    >>> result = evaluate_perplexity(model, tokenizer, text, store, k=4, lmbda=0.0, disable_progress=True)
    >>> result["knn_ppl"] == result["base_ppl"] == base.base_ppl  # lmbda=0: the base model exactly
    True
    >>> result.to_dict()["settings"]["lmbda"], result.searches, result.search["entries"]
    (0.0, 13, 13)
    ```
    """

    base_ppl: float
    knn_ppl: float | None
    num_tokens: int
    steps: int | None = None
    searches: int | None = None
    searches_saved: float | None = None
    settings: KNNSettings | None = None
    windows: WindowSettings | None = None
    search: dict[str, Any] = field(default_factory=dict)


def recorded_windows(datastore: Datastore | None) -> tuple[int | None, int | None]:
    """``(max_length, stride)`` a datastore was built with (None for stores that did not record them)."""
    if datastore is None:
        return None, None
    return datastore.config.max_length, datastore.config.stride


def search_setup(datastore: Datastore) -> dict[str, Any]:
    """What a result records about the store that was searched."""
    return {
        "datastore": str(datastore.folder),
        "entries": len(datastore),
        "index_factory": datastore.config.index_factory,
        "nprobe": datastore.nprobe,
    }


@dataclass
class _Plan:
    tokens: np.ndarray
    windows: WindowSettings
    settings: KNNSettings | None
    policy: SearchPolicy | None


def _plan(model, tokenizer, data, datastore, settings, windows, text_column, max_tokens, gate) -> _Plan:
    windows = windows.resolve(recorded_windows(datastore))
    check_forward_args(model, windows.max_length, windows.stride, windows.batch_size)
    tokens = scored_tokens(model, tokenizer, data, datastore, text_column, max_tokens)
    if datastore is None:
        return _Plan(tokens, windows, None, None)
    settings = settings.resolve(datastore)
    return _Plan(tokens, windows, settings, search_policy(datastore, settings, gate))


def evaluate_perplexity(
    model: torch.nn.Module,
    tokenizer,
    data: CorpusLike,
    datastore: Datastore | None = None,
    *,
    settings: KNNSettings | None = None,
    windows: WindowSettings | None = None,
    text_column: str = "text",
    max_tokens: int | None = None,
    disable_progress: bool | None = None,
    gate: GateLike = None,
    **overrides: Any,
) -> PerplexityOutput:
    """Sliding-window perplexity of ``model`` and, with a datastore, of the kNN-LM.

    Every token but the first is scored exactly once with at least ``max_length - stride`` tokens
    of context (the protocol used to build datastores); nothing of size tokens x vocabulary is kept.

    Args:
        data: a list of strings, a text file or a `datasets.Dataset` (``text_column``).
        datastore (`Datastore`, *optional*): without one only the base perplexity is computed.
        settings (`KNNSettings`, *optional*): k, lmbda, temperature (default: the store's calibrated
            one), recompute_dists, retomaton, gate.
        windows (`WindowSettings`, *optional*): max_length / stride (default: the store's) and batch_size.
        max_tokens (`int`, *optional*): score only the first ``max_tokens`` tokens.
        gate (`RetrievalGate`, a gate file or `bool`, *optional*): adaptive retrieval with this gate
            (`True`: the one saved with the store).
        overrides: single fields of either settings object, e.g. ``k=16, lmbda=0.3, max_length=512``.

    Returns:
        [`PerplexityOutput`][hf_knnlm.PerplexityOutput]: ``base_ppl``, ``knn_ppl``, ``num_tokens``, the
        searches saved and every setting used.

    Examples:

    ```python
    >>> from hf_knnlm.datastore.testing import tiny_datastore
    >>> from hf_knnlm import evaluate_perplexity
    >>> text = ["The cat sat on the mat. The dog sat on the log."]
    >>> model, tokenizer, store = tiny_datastore("store", text)
    >>> result = evaluate_perplexity(model, tokenizer, text, store, k=4, lmbda=0.5, disable_progress=True)
    >>> result.knn_ppl < result.base_ppl  # the store holds this very text
    True
    >>> result.num_tokens, result.settings.k, result.windows.max_length
    (13, 4, 16)
    ```
    """
    flag, gate = split_gate(gate)
    settings, windows = settings_from(settings, windows, overrides, flag)
    plan = _plan(model, tokenizer, data, datastore, settings, windows, text_column, max_tokens, gate)
    base_nll = knn_nll = 0.0
    count = 0
    for batch in iter_scored_batches(
        model, plan.tokens, datastore, plan.policy, plan.windows, disable_progress=disable_progress
    ):
        base_nll -= batch.lm_log_probs.double().sum().item()
        if plan.policy is not None:
            knn_nll -= batch.mixed(plan.settings).double().sum().item()
        count += len(batch)
    stats = plan.policy.stats if plan.policy is not None else None
    sharded = getattr(datastore, "sharded", None) if stats is not None else None
    if sharded is not None:  # each rank scored its own windows: the sums over ranks are the text's
        base_nll, knn_nll, count, steps, searches = sharded.all_reduce_sum(
            [base_nll, knn_nll, count, stats.steps, stats.searches]
        )
        count, stats = int(count), RetrievalStats(int(steps), int(searches))
    if not count:
        raise ValueError("the text has fewer than 2 tokens: nothing to score.")
    return _output(plan, datastore, base_nll, knn_nll, count, stats)


def _output(plan: _Plan, datastore, base_nll: float, knn_nll: float, count: int, stats) -> PerplexityOutput:
    return PerplexityOutput(
        base_ppl=math.exp(base_nll / count),
        knn_ppl=math.exp(knn_nll / count) if plan.policy is not None else None,
        num_tokens=count,
        **(_stats_fields(stats) if stats is not None else {}),
        settings=plan.settings,
        windows=plan.windows,
        search=search_setup(datastore) if datastore is not None else {},
    )


def _stats_fields(stats: RetrievalStats) -> dict[str, Any]:
    return {"steps": stats.steps, "searches": stats.searches, "searches_saved": stats.searches_saved}


__all__ = ["PerplexityOutput", "evaluate_perplexity", "recorded_windows", "search_setup"]
