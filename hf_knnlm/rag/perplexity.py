"""Perplexity of In-Context RALM and REPLUG over the same sliding windows as ``evaluate_perplexity``.

The text is cut into the windows of [`evaluate_perplexity`][hf_knnlm.evaluate_perplexity] (every token but
the first scored once, with the window's context). Each window's targets are split into blocks of
``retrieval_stride`` tokens; the ``query_length`` tokens before a block query the retriever, and each
target ``t`` of the block is scored as ``log sum_d w_d p_LM(t | d ⊕ tokens[window.begin:t])``.

A causal LM's prediction at position ``t`` depends only on what precedes it, so every block of a window
that retrieved passage ``d`` is scored from **one** forward pass over ``d ⊕ tokens[window.begin:end]``
(``end`` = the last of those blocks' ends): the result is the same as one pass per block, at a fraction of
the cost. Blocks that retrieved nothing keep the base model's log-probs from the plain window pass, so an
empty retriever gives the base model's perplexity exactly. How rows are planned, batched and served from
the passage KV cache (``reuse_cache``): ``prefixed_rows`` and ``passage_cache``.

With a datastore, the kNN-LM is mixed in through the same [`KNNSettings`][hf_knnlm.KNNSettings] and
[`mix_targets`][hf_knnlm.knnlm.mixture.mix_targets] as everywhere else (merge counts of a pruned store
included): alone over the plain windows, and into In-Context RALM with the queries of the
passage-prefixed pass.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..datastore.datastore import Datastore
from ..knnlm.evaluation import recorded_windows, search_setup
from ..knnlm.mixture import mix_targets
from ..knnlm.scored import ScoredTokens, iter_scored_batches, scored_tokens
from ..knnlm.settings import KNNSettings
from ..lm.corpus import CorpusLike
from ..lm.windows import WindowSettings, sliding_windows
from ..retrieval.retriever import Retriever, check_num_documents
from ..utils.checks import check_positive_int
from ..utils.outputs import Output
from .prefix import document_log_weights, max_positions
from .prefixed_rows import Plan, Prefixed, blocks_of, run_rows
from .settings import RetrievalSettings

_SEARCH_CHUNK = 1024


@dataclass
class RetrievalPerplexityOutput(Output):
    """The result of [`evaluate_retrieval_perplexity`][hf_knnlm.rag.evaluate_retrieval_perplexity] (also
    readable as a dict).

    Attributes:
        base_ppl: the model alone; ppl: In-Context RALM / REPLUG; knn_ppl: the kNN-LM alone;
            knn_ralm_ppl: the kNN-LM mixed into In-Context RALM (the last two None without a datastore).
        num_tokens: tokens scored; retrieved_fraction: the share scored with at least one passage.
        forward_tokens: tokens through the model in prefixed rows (with ``reuse_cache``, each cached
            passage once); padded_tokens: the same with the padding of batched rows; base_forward_tokens:
            tokens of the plain window pass.
        stride_hit_rate: the share of strides (passage slots) that read a passage scored by extending
            the (passage + context) row of an earlier stride of the same window with the same passage,
            instead of recomputing it. passage_hit_rate: the share of rows whose passage KV came from
            the cache (0 with ``reuse_cache=False`` or a model the cache does not serve).
            context_tokens: the rows' context tokens alone, what any exact evaluation runs through the
            model even with every passage's KV cached (a row's context keys depend on its passage).
        times: seconds (``base_s`` the plain window pass, ``retrieval_s``, ``prefixed_s`` the
            document-prefixed passes, ``knn_s`` the datastore searches).
        retrieval, knn, windows, search: every setting used.

    Examples:

    ```python
    >>> from hf_knnlm.rag import RetrievalPerplexityOutput, RetrievalSettings
    >>> out = RetrievalPerplexityOutput(base_ppl=30.0, ppl=28.5, knn_ppl=None, knn_ralm_ppl=None,
    ...     num_tokens=100, retrieved_fraction=0.9, forward_tokens=900, padded_tokens=950,
    ...     base_forward_tokens=100, times={}, retrieval=RetrievalSettings())
    >>> out.ppl / out.base_ppl, out["retrieved_fraction"]  # attributes, or keys as in a dict
    (0.95, 0.9)
    >>> out.to_dict()["retrieval"]["num_documents"]  # JSON-ready, with every setting used
    1
    ```
    """

    base_ppl: float
    ppl: float
    knn_ppl: float | None
    knn_ralm_ppl: float | None
    num_tokens: int
    retrieved_fraction: float
    forward_tokens: int
    padded_tokens: int
    base_forward_tokens: int
    times: dict[str, float]
    retrieval: RetrievalSettings
    knn: KNNSettings | None = None
    windows: WindowSettings | None = None
    search: dict[str, Any] = field(default_factory=dict)
    stride_hit_rate: float = 0.0
    passage_hit_rate: float = 0.0
    context_tokens: int = 0


def _search(retriever: Retriever, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    parts = [
        retriever.search(queries[i : i + _SEARCH_CHUNK], k) for i in range(0, len(queries), _SEARCH_CHUNK)
    ]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Keyword overrides of the retrieval settings, the kNN-LM settings and the windows."""
    groups: tuple[dict[str, Any], dict[str, Any], dict[str, Any]] = ({}, {}, {})
    fields = (RetrievalSettings.__dataclass_fields__, KNNSettings.__dataclass_fields__)
    for name, value in overrides.items():
        target = groups[0] if name in fields[0] else groups[1] if name in fields[1] else groups[2]
        target[name] = value
    unknown = sorted(set(groups[2]) - set(WindowSettings.__dataclass_fields__))
    if unknown:
        raise TypeError(
            f"unexpected keyword argument(s) {unknown}; evaluate_retrieval_perplexity takes the fields of "
            "RetrievalSettings, KNNSettings and WindowSettings."
        )
    return groups


def _plan(model, tokenizer, data, datastore, retrieval, knn, windows, text_column, max_tokens) -> Plan:
    if datastore is not None and retrieval.num_documents != 1:
        raise ValueError(
            f"a datastore mixes kNN-LM into In-Context RALM, which reads one passage; got "
            f"num_documents={retrieval.num_documents}. Pass num_documents=1 or drop the datastore."
        )
    windows = windows.resolve(recorded_windows(datastore))
    # A passage is cut from the left so that passage + window fits the model.
    budget = min(retrieval.max_document_tokens, max_positions(model) - windows.max_length)
    if budget < 1:
        raise ValueError(
            f"max_length={windows.max_length} leaves no room for a passage in the {max_positions(model)} "
            "positions the model takes; lower max_length."
        )
    tokens = scored_tokens(model, tokenizer, data, datastore, text_column, max_tokens)
    knn = knn.resolve(datastore) if datastore is not None else None
    spans = list(sliding_windows(len(tokens), windows.max_length, windows.stride))
    plan = Plan(tokens, spans, windows, retrieval, knn, budget)
    plan.blocks = blocks_of(spans, retrieval.retrieval_stride)
    return plan


def _base_pass(model, plan: Plan, datastore, times: dict, progress) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) of the LM alone and of the kNN-LM alone (the LM's without a datastore)."""
    started = time.perf_counter()
    keep = datastore is not None  # queries kept, so that LM time and search time are measured apart
    batches = iter_scored_batches(
        model,
        plan.tokens,
        datastore,
        None,
        plan.window_settings,
        keep_queries=keep,
        disable_progress=progress,
    )
    scored = ScoredTokens.cat(list(batches))
    times["base_s"] = time.perf_counter() - started
    if datastore is None:
        return scored.lm_log_probs, scored.lm_log_probs
    started = time.perf_counter()
    knn_only = scored.search(datastore, plan.knn.k, plan.knn.recompute_dists).mixed(plan.knn)
    times["knn_s"] = time.perf_counter() - started
    return scored.lm_log_probs, knn_only


def _retrieve(tokenizer, retriever, plan: Plan, times: dict) -> tuple[np.ndarray, torch.Tensor]:
    started = time.perf_counter()
    length = plan.retrieval.query_length
    queries = [tokenizer.decode(plan.tokens[max(0, s - length) : s].tolist()) for _, s, _ in plan.blocks]
    scores, doc_ids = _search(retriever, queries, plan.retrieval.num_documents)
    log_weights = document_log_weights(scores, doc_ids, plan.retrieval.document_temperature)
    times["retrieval_s"] = time.perf_counter() - started
    return doc_ids, log_weights


def _combine(plan: Plan, base, log_weights, prefixed: Prefixed, found) -> torch.Tensor:
    """log sum_d w_d p_LM(t | d ⊕ x) for the targets of blocks that read a passage; base elsewhere."""
    mixed = base.clone()
    for b in found.nonzero()[0].tolist():
        _, start, end = plan.blocks[b]
        mixed[start - 1 : end - 1] = torch.logsumexp(
            log_weights[b, :, None] + prefixed.log_probs[b, :, : end - start], dim=0
        )
    return mixed


def _mix_knn(plan: Plan, datastore, prefixed: Prefixed, found, mixed, knn_only) -> torch.Tensor:
    """log(λ p_kNN + (1 - λ) p_RALM) for the targets of blocks that read a passage; kNN-LM elsewhere."""
    picks = [(b, start, end) for b, (_, start, end) in enumerate(plan.blocks) if found[b]]
    queries = torch.cat([prefixed.queries[b, : end - start] for b, start, end in picks])
    positions = torch.cat([torch.arange(start, end) for _, start, end in picks])
    targets = torch.from_numpy(plan.tokens[positions.numpy()].astype("int64"))
    neighbours = datastore.search(queries, plan.knn.k, plan.knn.recompute_dists)
    combined = knn_only.clone()
    combined[positions - 1] = mix_targets(neighbours, mixed[positions - 1], targets, plan.knn)
    return combined


def evaluate_retrieval_perplexity(
    model: torch.nn.Module,
    tokenizer,
    data: CorpusLike,
    retriever: Retriever,
    *,
    retrieval: RetrievalSettings | None = None,
    datastore: Datastore | None = None,
    knn: KNNSettings | None = None,
    windows: WindowSettings | None = None,
    row_batch_size: int = 4,
    text_column: str = "text",
    max_tokens: int | None = None,
    disable_progress: bool | None = None,
    **overrides: Any,
) -> RetrievalPerplexityOutput:
    """Sliding-window perplexity of the base LM and of In-Context RALM (``num_documents=1``) or REPLUG
    (``num_documents=k``); with a ``datastore`` (In-Context RALM only) also of the kNN-LM alone and of the
    kNN-LM mixed into In-Context RALM (its queries come from the document-prefixed pass).

    Args:
        retriever: any object with ``search(queries, k) -> (scores, doc_ids)``, ``titles`` and ``texts``.
        retrieval (`RetrievalSettings`, *optional*): num_documents,
            retrieval_stride, query_length, document_temperature, max_document_tokens.
        datastore, knn (`KNNSettings`, *optional*): the kNN-LM, as in
            ``evaluate_perplexity``.
        windows (`WindowSettings`, *optional*): the windows (default: the
            store's, as ``evaluate_perplexity``); text_column, max_tokens: as in ``evaluate_perplexity``.
        row_batch_size: document-prefixed rows per forward pass.
        overrides: single fields of any of the three settings objects, e.g. ``num_documents=4, k=64``.

    Returns:
        [`RetrievalPerplexityOutput`][hf_knnlm.rag.RetrievalPerplexityOutput]: the perplexities, token
        counts, times and every setting used.

    Examples:

    ```python
    >>> from hf_knnlm.lm.testing import tiny_causal_lm
    >>> model, tokenizer = tiny_causal_lm()  # a random 2-layer GPT-2, GPT-2's tokenizer
    >>> from hf_knnlm.rag import BM25Retriever, evaluate_retrieval_perplexity
    >>> text = "The cat sat on the mat. The dog ran in the park. " * 4
    >>> bm25 = BM25Retriever.build([{"text": "The cat sat on the mat."}, {"text": "The dog ran."}])
    >>> result = evaluate_retrieval_perplexity(model, tokenizer, [text], bm25, retrieval_stride=4,
    ...                                        query_length=8, max_length=32, stride=16,
    ...                                        disable_progress=True)
    >>> result["num_tokens"], round(result["retrieved_fraction"], 2)  # targets that read a passage
    (56, 0.93)
    >>> result["ppl"] != result["base_ppl"], result["knn_ppl"]  # In-Context RALM vs the LM; no datastore
    (True, None)
    ```
    """
    retrieval_changes, knn_changes, window_changes = _split_overrides(overrides)
    retrieval = (retrieval or RetrievalSettings()).replace(**retrieval_changes)
    knn = KNNSettings.merge(knn, **knn_changes)
    windows = (windows or WindowSettings()).replace(**window_changes)
    check_num_documents("num_documents", retrieval.num_documents, retriever)
    check_positive_int("row_batch_size", row_batch_size, "document-prefixed rows per forward pass")
    plan = _plan(model, tokenizer, data, datastore, retrieval, knn, windows, text_column, max_tokens)
    times: dict[str, float] = {}
    base, knn_only = _base_pass(model, plan, datastore, times, disable_progress)
    doc_ids, log_weights = _retrieve(tokenizer, retriever, plan, times)
    started = time.perf_counter()
    prefixed = run_rows(
        model, tokenizer, retriever, plan, doc_ids, datastore, row_batch_size, disable_progress
    )
    found = (doc_ids >= 0).any(axis=1)
    mixed = _combine(plan, base, log_weights, prefixed, found)
    times["prefixed_s"] = time.perf_counter() - started
    combined = knn_only
    if datastore is not None and found.any():
        started = time.perf_counter()
        combined = _mix_knn(plan, datastore, prefixed, found, mixed, knn_only)
        times["knn_s"] += time.perf_counter() - started
    return _output(plan, datastore, base, mixed, knn_only, combined, found, prefixed, times)


def _ppl(log_probs: torch.Tensor) -> float:
    return math.exp(-log_probs.double().sum().item() / len(log_probs))


def _output(
    plan, datastore, base, mixed, knn_only, combined, found, prefixed, times
) -> RetrievalPerplexityOutput:
    scored = sum(end - start for b, (_, start, end) in enumerate(plan.blocks) if found[b])
    with_store = datastore is not None
    return RetrievalPerplexityOutput(
        base_ppl=_ppl(base),
        ppl=_ppl(mixed),
        knn_ppl=_ppl(knn_only) if with_store else None,
        knn_ralm_ppl=_ppl(combined) if with_store else None,
        num_tokens=len(base),
        retrieved_fraction=scored / len(base),
        forward_tokens=prefixed.forward_tokens,
        padded_tokens=prefixed.padded_tokens,
        base_forward_tokens=sum(w.end - w.begin for w in plan.windows),
        stride_hit_rate=prefixed.stride_hit_rate,
        passage_hit_rate=prefixed.passage_hit_rate,
        context_tokens=prefixed.context_tokens,
        times={name: round(value, 3) for name, value in times.items()},
        retrieval=plan.retrieval,
        knn=plan.knn,
        windows=plan.window_settings,
        search=search_setup(datastore) if with_store else {},
    )


__all__ = ["RetrievalPerplexityOutput", "evaluate_retrieval_perplexity"]
