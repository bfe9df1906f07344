"""Perplexity of the base LM and of the kNN-LM over the same sliding windows as the build."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ..datastore.datastore import Datastore
from ..datastore.neighbours import Neighbours
from ..lm.corpus import CorpusLike, tokenize_corpus
from ..lm.forward import WindowBatch, check_forward_args, iter_window_batches
from ..lm.windows import sliding_windows, window_settings
from ..utils.checks import is_int
from .mixture import KNNSettings, interpolate, knn_target_log_probs
from .policies import search_skipper


class Retrieval(Protocol):
    """What replaces the plain per-batch search: RetoMaton, an adaptive-retrieval gate."""

    lm_features: Callable[[torch.Tensor], torch.Tensor] | None  # what it needs from the LM

    def __call__(self, batch: WindowBatch) -> tuple[Neighbours, torch.Tensor | None]: ...

    def stats(self) -> dict[str, float | int]: ...


@dataclass
class ScoredBatch:
    """What the mixture needs per scored token: LM log-prob of the target and the neighbours."""

    lm_log_probs: torch.Tensor  # [n]
    targets: torch.Tensor  # [n]
    distances: torch.Tensor | None  # [n, k]
    neighbour_tokens: torch.Tensor | None  # [n, k]
    neighbour_log_counts: torch.Tensor | None = None  # [n, k] merge counts of a pruned store
    lmbda: torch.Tensor | None = None  # [n] per-token weights (a retrieval gate); 0 = not searched


def scored_tokens(
    model: torch.nn.Module,
    tokenizer,
    data: CorpusLike,
    datastore: Datastore | None,
    text_column: str = "text",
    max_tokens: int | None = None,
) -> np.ndarray:
    """The token stream to score, after checking that ``datastore`` fits ``model`` and ``tokenizer``."""
    if max_tokens is not None and (not is_int(max_tokens) or max_tokens < 2):
        raise ValueError(
            f"max_tokens={max_tokens!r} leaves nothing to score: it needs at least 2 tokens (a context and a "
            f"target); pass max_tokens >= 2, or None for the whole text."
        )
    if datastore is not None:
        datastore.check_compatible(model, tokenizer)
    tokens = tokenize_corpus(tokenizer, data, text_column)
    return tokens if max_tokens is None else tokens[:max_tokens]


def iter_scored_batches(
    model: torch.nn.Module,
    tokens: np.ndarray,
    datastore: Datastore | None,
    *,
    k: int,
    max_length: int,
    stride: int,
    batch_size: int,
    recompute_dists: bool = False,
    disable_progress: bool | None = None,
    retrieval: Retrieval | None = None,
) -> Iterator[ScoredBatch]:
    """One forward pass and one batched neighbour search per batch of windows.

    ``retrieval`` replaces the plain search (RetoMaton, a retrieval gate): it maps each
    :class:`~hf_knnlm.lm.forward.WindowBatch` to its neighbours and optional per-token lmbda.
    """
    windows = list(sliding_windows(len(tokens), max_length, stride))
    hook = datastore.config.hook_module if datastore is not None else None
    model.eval()
    for batch in iter_window_batches(
        model,
        tokens,
        windows,
        batch_size=batch_size,
        hook_module=hook,
        with_log_probs=True,
        desc="scoring",
        disable_progress=disable_progress,
        lm_features=None if retrieval is None else retrieval.lm_features,
    ):
        scored = ScoredBatch(batch.lm_log_probs.float().cpu(), batch.targets.cpu(), None, None)
        if datastore is not None:
            if retrieval is None:
                found, scored.lmbda = datastore.search_entries(batch.hidden, k, recompute_dists), None
            else:
                found, scored.lmbda = retrieval(batch)
            found = found.to("cpu")
            scored.distances, scored.neighbour_tokens = found.distances, found.token_ids
            scored.neighbour_log_counts = found.log_counts
        yield scored


def mixed_target_log_probs(
    batch: ScoredBatch, lmbda: float, temperature: float, k: int | None = None
) -> torch.Tensor:
    """log(lmbda p_kNN(y) + (1 - lmbda) p_LM(y)) for each target y, from (a prefix of) the neighbours."""
    distances, neighbours = batch.distances[:, :k], batch.neighbour_tokens[:, :k]
    counts = None if batch.neighbour_log_counts is None else batch.neighbour_log_counts[:, :k]
    knn = knn_target_log_probs(distances, neighbours, batch.targets, temperature, counts)
    return interpolate(batch.lm_log_probs, knn, lmbda if batch.lmbda is None else batch.lmbda)


def recorded_windows(datastore: Datastore | None) -> tuple[int | None, int | None]:
    """``(max_length, stride)`` a datastore was built with (None for stores that did not record them)."""
    if datastore is None:
        return None, None
    return datastore.config.max_length, datastore.config.stride


def evaluate_perplexity(
    model: torch.nn.Module,
    tokenizer,
    data: CorpusLike,
    datastore: Datastore | None = None,
    *,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    k: int = 1024,
    lmbda: float = 0.25,
    temperature: float = 1.0,
    recompute_dists: bool = False,
    text_column: str = "text",
    max_tokens: int | None = None,
    disable_progress: bool | None = None,
    retomaton: int | None = None,
    gate=None,
) -> dict[str, float | int | None]:
    """Sliding-window perplexity of ``model`` and, with a datastore, of the kNN-LM.

    Every token but the first is scored exactly once with at least ``max_length - stride`` tokens
    of context (the protocol used to build datastores).

    Args:
        max_length (`int`, *optional*) / stride (`int`, *optional*): the sliding windows; default to
            those the datastore was built with (else 1024 / 512).
        retomaton (`int`, *optional*): follow corpus pointers (RetoMaton) and search only when fewer
            than this many survive; the result then has ``searches_saved``.
        gate (`RetrievalGate` or `True`, *optional*): per-token lmbda from an adaptive-retrieval gate
            (`True`: the one saved with the store); skipped tokens are not searched.

    Returns:
        `dict` with ``base_ppl``, ``knn_ppl`` (None without a datastore) and ``num_tokens``, plus
        ``steps`` / ``searches`` / ``searches_saved`` with ``retomaton`` or ``gate``.
    """
    settings = KNNSettings(k=k, lmbda=lmbda, temperature=temperature, recompute_dists=recompute_dists)
    max_length, stride = window_settings(max_length, stride, recorded_windows(datastore))
    check_forward_args(model, max_length, stride, batch_size)
    tokens = scored_tokens(model, tokenizer, data, datastore, text_column, max_tokens)
    retrieval = None
    if datastore is not None:
        settings.k = datastore.clamp_k(k)
        retrieval = search_skipper(datastore, settings, retomaton, gate, stream=True)
    base_nll = knn_nll = 0.0
    count = 0
    for batch in iter_scored_batches(
        model,
        tokens,
        datastore,
        k=settings.k,
        max_length=max_length,
        stride=stride,
        batch_size=batch_size,
        recompute_dists=settings.recompute_dists,
        disable_progress=disable_progress,
        retrieval=retrieval,
    ):
        base_nll -= batch.lm_log_probs.double().sum().item()
        if datastore is not None:
            mixed = mixed_target_log_probs(batch, settings.lmbda, settings.temperature)
            knn_nll -= mixed.double().sum().item()
        count += len(batch.targets)
    return {
        "base_ppl": math.exp(base_nll / count),
        "knn_ppl": math.exp(knn_nll / count) if datastore is not None else None,
        "num_tokens": count,
        **(retrieval.stats() if retrieval is not None else {}),
    }


@dataclass
class ScoredQueries:
    """One forward pass over a text, kept so that several indexes can be searched without the model."""

    lm_log_probs: torch.Tensor  # [n] float32
    targets: torch.Tensor  # [n] int64
    queries: torch.Tensor  # [n, d] FFN inputs, float32

    def search(self, datastore: Datastore, k: int, recompute_dists: bool = False) -> ScoredBatch:
        """Neighbours of every stored query: a :class:`ScoredBatch` covering the whole text."""
        k = datastore.clamp_k(k)
        found = datastore.search_entries(self.queries, k, recompute_dists)
        tokens = found.token_ids.to(torch.int32)
        return ScoredBatch(self.lm_log_probs, self.targets, found.distances, tokens, found.log_counts)


def collect_queries(
    model: torch.nn.Module,
    tokenizer,
    data: CorpusLike,
    datastore: Datastore,
    *,
    max_length: int = 1024,
    stride: int = 512,
    batch_size: int = 8,
    text_column: str = "text",
    max_tokens: int | None = None,
    disable_progress: bool | None = None,
) -> ScoredQueries:
    """Run the model once over ``data`` (same windows as :func:`evaluate_perplexity`) and keep the
    queries and LM target log-probs; memory is ``num_tokens * (hidden_size + 3) * 4`` bytes.

    ``datastore`` only says which FFN module to hook and is checked for compatibility.
    """
    check_forward_args(model, max_length, stride, batch_size)
    tokens = scored_tokens(model, tokenizer, data, datastore, text_column, max_tokens)
    windows = list(sliding_windows(len(tokens), max_length, stride))
    log_probs, targets, queries = [], [], []
    model.eval()
    for batch in iter_window_batches(
        model,
        tokens,
        windows,
        batch_size=batch_size,
        hook_module=datastore.config.hook_module,
        with_log_probs=True,
        desc="queries",
        disable_progress=disable_progress,
    ):
        log_probs.append(batch.lm_log_probs.float().cpu())
        targets.append(batch.targets.cpu())
        queries.append(batch.hidden.float().cpu())
    return ScoredQueries(torch.cat(log_probs), torch.cat(targets), torch.cat(queries))
