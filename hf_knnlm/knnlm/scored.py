"""A text scored by the LM and its datastore: per target token, log p_LM(target) and the neighbours.

Evaluation, tuning, gate training and the retrieval-augmented LMs read a text the same way: the sliding
windows of ``hf_knnlm.lm.windows``, one forward pass and one policy call (a search, or RetoMaton / the gate)
per batch of windows, yielding [`ScoredTokens`][hf_knnlm.knnlm.ScoredTokens] in corpus order. Nothing of size
``[tokens x vocab]`` is kept: the LM's log-prob of each target is gathered per batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..datastore.datastore import Datastore
from ..datastore.neighbours import Neighbours
from ..datastore.sharded import ShardedSearch
from ..lm.corpus import CorpusLike, tokenize_corpus
from ..lm.forward import WindowBatch, check_forward_args, iter_window_batches
from ..lm.windows import WindowSettings, sliding_windows
from ..utils.checks import is_int
from .mixture import mix_targets
from .policies import SearchPolicy, Step
from .settings import KNNSettings


def _join(parts: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    return None if any(p is None for p in parts) else torch.cat(list(parts))


@dataclass
class ScoredTokens:
    """What the mixture needs per scored token, in corpus order (``n`` tokens).

    Attributes:
        lm_log_probs: ``[n]`` log p_LM(target), float32.
        targets: ``[n]`` the target token ids.
        neighbours: the targets' [`Neighbours`][hf_knnlm.Neighbours] (None before a search).
        lmbda: ``[n]`` per-token weights of a gate (0 = not searched), or None.
        queries: ``[n, d]`` the FFN inputs, when kept (to search several stores with one model pass).
        lm_features: ``[n, F]`` LM features (a gate's inputs), when asked for.

    Examples:

    ```python
    >>> import torch
    >>> from hf_knnlm import KNNSettings, Neighbours
    >>> from hf_knnlm.knnlm import ScoredTokens
    >>> nb = Neighbours(torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.tensor([[3, 4], [5, 6]]),
    ...                 torch.tensor([[1, 2], [2, 2]]))
    >>> scored = ScoredTokens(torch.tensor([0.5, 0.1]).log(), targets=torch.tensor([1, 2]), neighbours=nb)
    >>> settings = KNNSettings(k=2, lmbda=0.5, temperature=1.0)
    >>> scored.mixed(settings).exp()  # 0.5 * p_kNN(y) + 0.5 * p_LM(y) of each target
    tensor([0.6155, 0.5500])
    >>> torch.equal(scored.mixed(settings.replace(lmbda=0.0)), scored.lm_log_probs)
    True
    >>> len(ScoredTokens.cat([scored, scored]))
    4
    ```
    """

    lm_log_probs: torch.Tensor
    targets: torch.Tensor
    neighbours: Neighbours | None = None
    lmbda: torch.Tensor | None = None
    queries: torch.Tensor | None = None
    lm_features: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.targets)

    @classmethod
    def cat(cls, parts: Sequence[ScoredTokens]) -> ScoredTokens:
        if not parts:
            raise ValueError("no scored tokens: the text is empty.")
        neighbours = [p.neighbours for p in parts]
        return cls(
            torch.cat([p.lm_log_probs for p in parts]),
            torch.cat([p.targets for p in parts]),
            None if any(n is None for n in neighbours) else Neighbours.cat(neighbours),
            _join([p.lmbda for p in parts]),
            _join([p.queries for p in parts]),
            _join([p.lm_features for p in parts]),
        )

    def mixed(self, settings: KNNSettings) -> torch.Tensor:
        """log(lmbda p_kNN(y) + (1 - lmbda) p_LM(y)) of every target ``y`` (the gate's lmbda if any)."""
        return mix_targets(self.neighbours, self.lm_log_probs, self.targets, settings, self.lmbda)

    def search(self, datastore: Datastore, k: int, recompute_dists: bool = False) -> ScoredTokens:
        """These tokens with the neighbours of their kept ``queries`` in ``datastore`` (no model run)."""
        if self.queries is None:
            raise ValueError("these scored tokens kept no queries; collect them with collect_queries().")
        found = datastore.search(self.queries, datastore.clamp_k(k), recompute_dists)
        return ScoredTokens(self.lm_log_probs, self.targets, found.compact(), queries=self.queries)


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


class _TokenStream:
    """The token before each batch's targets, so that a policy can follow one stream across batches."""

    def __init__(self) -> None:
        self.last: int | None = None

    def tokens(self, targets: torch.Tensor) -> list[int | None]:
        values = targets.tolist()
        previous, self.last = self.last, values[-1]
        return [previous, *values[:-1]]


def _neighbours(
    batch: WindowBatch, datastore: Datastore, policy: SearchPolicy, stream: _TokenStream
) -> tuple[Neighbours, torch.Tensor | None]:
    tokens = stream.tokens(batch.targets) if policy.follows_tokens else None
    found, lmbda = policy(Step(batch.hidden, lm_features=batch.lm_features, tokens=tokens))
    return found.to("cpu"), lmbda


def iter_scored_batches(
    model: torch.nn.Module,
    tokens: np.ndarray,
    datastore: Datastore | None,
    policy: SearchPolicy | None,
    windows: WindowSettings,
    *,
    keep_queries: bool = False,
    lm_features: Callable[[torch.Tensor], torch.Tensor] | None = None,
    disable_progress: bool | None = None,
    desc: str = "scoring",
) -> Iterator[ScoredTokens]:
    """One forward pass and one ``policy`` call per batch of (resolved) ``windows``.

    Without a ``policy`` nothing is searched (the LM alone, or queries kept for later searches).
    ``lm_features`` (or the policy's) maps each batch's ``[n, V]`` LM log-probs to per-token features.
    With a policy over a sharded store each rank scores its own contiguous share of the windows
    (its batches in corpus order) and serves the other ranks' searches once its own are done.
    """
    spans = list(sliding_windows(len(tokens), windows.max_length, windows.stride))
    sharded = getattr(datastore, "sharded", None) if policy is not None else None
    if sharded is not None:
        spans = sharded.share(spans)
    hook = datastore.config.hook_module if datastore is not None else None
    features = lm_features or (policy.lm_features if policy is not None else None)
    stream = _TokenStream()
    model.eval()
    with sharded.serving() if sharded is not None else contextlib.nullcontext():
        for batch in iter_window_batches(
            model,
            tokens,
            spans,
            batch_size=windows.batch_size,
            hook_module=hook,
            with_log_probs=True,
            desc=desc,
            disable_progress=disable_progress,
            lm_features=features,
        ):
            scored = ScoredTokens(batch.lm_log_probs.float().cpu(), batch.targets.cpu())
            if policy is not None:
                scored.neighbours, scored.lmbda = _neighbours(batch, datastore, policy, stream)
            if keep_queries:
                scored.queries = batch.hidden.float().cpu()
            if batch.lm_features is not None:
                scored.lm_features = batch.lm_features.cpu()
            yield scored


def gather_scored(parts: Sequence[ScoredTokens], sharded: ShardedSearch, k: int) -> ScoredTokens:
    """Every rank's compact scored tokens (``parts``: this rank's), in rank order: the windows are split
    contiguously, so this is the corpus order and the cache a one-process pass makes."""
    n_k = (0, k)
    mine = {
        "lm": torch.cat([p.lm_log_probs for p in parts]) if parts else torch.zeros(0),
        "targets": torch.cat([p.targets for p in parts]) if parts else torch.zeros(0, dtype=torch.long),
        "distances": torch.cat([p.neighbours.distances for p in parts]) if parts else torch.zeros(n_k),
        "values": torch.cat([p.neighbours.token_ids for p in parts])
        if parts
        else torch.zeros(n_k, dtype=torch.int32),
    }
    if sharded.shard.log_counts is not None:
        mine["counts"] = torch.cat([p.neighbours.log_counts for p in parts]) if parts else torch.zeros(n_k)
    full = {name: sharded.all_gather_rows(t) for name, t in mine.items()}
    found = Neighbours(full["distances"], None, full["values"], full.get("counts"))
    return ScoredTokens(full["lm"], full["targets"], found)


def collect_queries(
    model: torch.nn.Module,
    tokenizer,
    data: CorpusLike,
    datastore: Datastore,
    *,
    windows: WindowSettings | None = None,
    text_column: str = "text",
    max_tokens: int | None = None,
    disable_progress: bool | None = None,
    **window_overrides: int,
) -> ScoredTokens:
    """Run the model once over ``data`` (the windows of [`evaluate_perplexity`][hf_knnlm.evaluate_perplexity])
    and keep the queries and LM target log-probs, so that several stores or settings can be searched without
    the model ([`ScoredTokens.search`][hf_knnlm.knnlm.ScoredTokens.search]); memory is
    ``num_tokens * (hidden_size + 3) * 4`` bytes.

    Args:
        model (`torch.nn.Module`): the model that built ``datastore``.
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer.
        data: a list of strings, a text file or a `datasets.Dataset` (``text_column``).
        datastore (`Datastore`): says which FFN module to hook and is checked
            for compatibility; it is not searched.
        windows (`WindowSettings`, *optional*): max_length / stride
            (default: the store's) and batch_size; ``window_overrides`` change single fields.
        max_tokens (`int`, *optional*): keep only the first ``max_tokens`` tokens.

    Returns:
        [`ScoredTokens`][hf_knnlm.knnlm.ScoredTokens]: ``lm_log_probs``, ``targets`` and ``queries``
        of every scored token, without neighbours.

    Examples:

    ```python
    >>> import math
    >>> from hf_knnlm.datastore.testing import tiny_datastore
    >>> from hf_knnlm import KNNSettings, evaluate_perplexity
    >>> from hf_knnlm.knnlm import collect_queries
    >>> text = ["The cat sat on the mat. The dog sat on the log."]
    >>> model, tokenizer, store = tiny_datastore("queries-store", text)
    >>> cache = collect_queries(model, tokenizer, text, store, disable_progress=True)
    >>> cache.queries.shape, cache.neighbours  # 13 scored tokens, 32-wide queries, nothing searched
    (torch.Size([13, 32]), None)
    >>> settings = KNNSettings(k=4, lmbda=0.5).resolve(store)
    >>> searched = cache.search(store, k=4)  # no model run
    >>> ppl = math.exp(-searched.mixed(settings).double().mean().item())
    >>> result = evaluate_perplexity(model, tokenizer, text, store, settings=settings, disable_progress=True)
    >>> math.isclose(ppl, result.knn_ppl, rel_tol=1e-6)  # what a full evaluation gives
    True
    ```
    """
    windows = (windows or WindowSettings()).replace(**window_overrides)
    windows = windows.resolve((datastore.config.max_length, datastore.config.stride))
    check_forward_args(model, windows.max_length, windows.stride, windows.batch_size)
    tokens = scored_tokens(model, tokenizer, data, datastore, text_column, max_tokens)
    batches = iter_scored_batches(
        model,
        tokens,
        datastore,
        None,
        windows,
        keep_queries=True,
        disable_progress=disable_progress,
        desc="queries",
    )
    return ScoredTokens.cat(list(batches))


__all__ = ["ScoredTokens", "collect_queries", "gather_scored", "iter_scored_batches", "scored_tokens"]
