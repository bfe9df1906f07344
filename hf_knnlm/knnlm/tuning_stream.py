"""The tuning sweep as a stream: summed NLL of every (k, temperature, lmbda) point, batch by batch.

[`tune`][hf_knnlm.tune] sweeps each batch of scored tokens as it arrives and drops it, so that its memory
does not grow with the text. Default temperatures are multiples of the median nearest-neighbour distance,
which must be known before the bulk is swept: it is taken from the first
``TuningGrid.max_cache_bytes // (8 k)`` tokens of the text (the scale sample), whose batches are held
until they have all arrived. A text shorter than that is swept in one piece, as
[`sweep`][hf_knnlm.knnlm.tuning.sweep] sweeps a cache, and gives the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..datastore.sharded import ShardedSearch
from ..utils.outputs import Output
from .mixture import interpolate, knn_target_log_probs
from .scored import ScoredTokens
from .tuning_grid import TuningGrid

PLAIN_TEMPERATURES = (1.0, 10.0)
_ROWS = 4096  # rows per softmax block: bounds the temporaries of a sweep point to ~_ROWS * k * 12 bytes


@dataclass
class TuningPoint(Output):
    k: int
    temperature: float
    lmbda: float
    knn_ppl: float


def sample_rows(max_cache_bytes: int, k: int) -> int:
    """How many tokens' ``k`` neighbours (8 bytes each) fit in ``max_cache_bytes``; at least one."""
    rows = max_cache_bytes // (8 * k)
    if rows < 1:
        raise ValueError(
            f"max_cache_bytes={max_cache_bytes} cannot hold one token's {k} neighbours ({8 * k} bytes); "
            f"raise it to at least {8 * k} or lower k."
        )
    return rows


def cached_knn_log_probs(cache: ScoredTokens, temperature: float, k: int) -> torch.Tensor:
    """log p_kNN(target) of every cached token with the first ``k`` neighbours, ``[n]``."""
    blocks = range(0, len(cache), _ROWS)
    return torch.cat(
        [
            knn_target_log_probs(
                cache.neighbours[i : i + _ROWS].truncate(k), cache.targets[i : i + _ROWS], temperature
            )
            for i in blocks
        ]
    )


def median_distance(first: torch.Tensor) -> float:
    """Median of the finite nearest-neighbour distances ``first`` (``[n]``): the temperature scale."""
    first = first[torch.isfinite(first)]
    if not len(first):
        raise ValueError("no token of the tuning text has a neighbour; is the datastore empty?")
    return float(np.median(first.numpy()))  # the mean of the middle two, unlike torch.median


def temperatures_for(
    scale: float, multiples: Sequence[float], plain: Sequence[float] = PLAIN_TEMPERATURES
) -> list[float]:
    """``multiples`` x ``scale``, plus the ``plain`` temperatures, sorted and without repeats."""
    grid = {float(f"{m * scale:.6g}") for m in multiples if m * scale > 0} | {float(t) for t in plain}
    return sorted(grid)


class SweepAccumulator:
    """Summed NLL (float64) of every (k, temperature, lmbda) point over the batches ``add``-ed so far.

    Examples:

    ```python
    >>> import torch
    >>> from hf_knnlm import Neighbours
    >>> from hf_knnlm.knnlm import ScoredTokens
    >>> from hf_knnlm.knnlm.tuning_stream import SweepAccumulator
    >>> nb = Neighbours(torch.tensor([[0.0, 1.0]]), None, torch.tensor([[3, 4]], dtype=torch.int32))
    >>> acc = SweepAccumulator(lmbdas=[0.0, 1.0], temperatures=[1.0], ks=[1])
    >>> for _ in range(2):  # two batches of one token whose nearest neighbour says its target
    ...     acc.add(ScoredTokens(torch.tensor([0.25]).log(), torch.tensor([3]), nb))
    >>> acc.count, [round(p.knn_ppl, 6) for p in acc.points()]  # lmbda 0: the LM; lmbda 1: p_kNN = 1
    (2, [4.0, 1.0])
    >>> acc.points()[0].knn_ppl == acc.base_ppl()
    True
    ```
    """

    def __init__(self, lmbdas: Sequence[float], temperatures: Sequence[float], ks: Sequence[int]) -> None:
        self.lmbdas, self.temperatures, self.ks = tuple(lmbdas), tuple(temperatures), tuple(ks)
        self.nll = torch.zeros((len(self.ks), len(self.temperatures), len(self.lmbdas)), dtype=torch.float64)
        self.lm_nll = torch.zeros((), dtype=torch.float64)
        self.count = 0

    def add(self, scored: ScoredTokens) -> None:
        """Add the NLL of every point over ``scored`` (compact neighbours of at least ``max(ks)``)."""
        for i, k in enumerate(self.ks):
            for j, temperature in enumerate(self.temperatures):
                knn = cached_knn_log_probs(scored, temperature, k)
                for m, lmbda in enumerate(self.lmbdas):
                    self.nll[i, j, m] -= interpolate(scored.lm_log_probs, knn, lmbda).double().sum()
        self.lm_nll -= scored.lm_log_probs.double().sum()
        self.count += len(scored)

    def all_reduce(self, sharded: ShardedSearch) -> None:
        """The sums over every rank's share (after it has been added), on every rank."""
        mine = torch.cat([self.nll.flatten(), self.lm_nll.reshape(1), torch.tensor([float(self.count)])])
        total = sharded.all_reduce_sum(mine)
        self.nll = total[: self.nll.numel()].reshape(self.nll.shape)
        self.lm_nll, self.count = total[-2], int(total[-1])

    def base_ppl(self) -> float:
        return math.exp(self.lm_nll.item() / self.count)

    def points(self) -> list[TuningPoint]:
        """Perplexity at every point, k-major then temperature then lmbda (the order of the grid)."""
        return [
            TuningPoint(k, temperature, lmbda, math.exp(self.nll[i, j, m].item() / self.count))
            for i, k in enumerate(self.ks)
            for j, temperature in enumerate(self.temperatures)
            for m, lmbda in enumerate(self.lmbdas)
        ]


class _Stream:
    """Holds batches until the temperatures are known, then sweeps each batch as it comes.

    One process knows them once the scale sample has arrived. On a sharded store the sample is the
    first tokens of the corpus, which other ranks score: a rank cannot ask for them while the ranks
    serve each other's searches, so with default temperatures it holds its whole share until the end.
    """

    def __init__(self, grid: TuningGrid, searched: int, sharded: ShardedSearch | None) -> None:
        self.grid, self.ks, self.sharded = grid, grid.ks_for(searched), sharded
        self.rows = sample_rows(grid.max_cache_bytes, searched)
        self.first: list[torch.Tensor] = []  # the first neighbour's distance of the sample's tokens
        self.sampled = 0
        self.held: list[ScoredTokens] = []
        self.acc: SweepAccumulator | None = None

    def add(self, batch: ScoredTokens) -> None:
        if self.sampled < self.rows:
            part = batch.neighbours.distances[: self.rows - self.sampled, 0].clone()  # not a view
            self.first.append(part)
            self.sampled += len(part)
        if self.acc is not None:
            self.acc.add(batch)
            return
        self.held.append(batch)
        if self.sampled >= self.rows and (self.grid.temperatures is not None or self.sharded is None):
            self._start(self._sample())

    def _sample(self) -> torch.Tensor:
        return torch.cat(self.first) if self.first else torch.zeros(0)

    def _start(self, sample: torch.Tensor) -> None:
        temperatures = self.grid.temperatures
        if temperatures is None:
            temperatures = temperatures_for(median_distance(sample), self.grid.temperature_multiples)
        self.acc = SweepAccumulator(self.grid.lmbdas, temperatures, self.ks)
        if self.held and sum(len(b) for b in self.held) <= self.rows:
            self.acc.add(ScoredTokens.cat(self.held))  # a short text in one piece, as sweep() does
            self.held = []
        while self.held:
            self.acc.add(self.held.pop(0))  # each batch dropped once it is swept

    def finish(self) -> tuple[SweepAccumulator, float]:
        sample = self._sample()
        if self.sharded is not None:
            sample = self.sharded.all_gather_rows(sample)[: self.rows]  # rank order is corpus order
        if not len(sample):
            raise ValueError("no scored tokens: the tuning text is empty.")
        scale = median_distance(sample)
        if self.acc is None:
            self._start(sample)
        if self.sharded is not None:
            self.acc.all_reduce(self.sharded)
        return self.acc, scale


def sweep_stream(
    batches: Iterable[ScoredTokens], grid: TuningGrid, searched: int, sharded: ShardedSearch | None = None
) -> tuple[SweepAccumulator, float]:
    """Sweep ``grid`` over ``batches`` (neighbours of ``searched`` k) without keeping them all.

    Returns the accumulator over every batch (on a sharded store: every rank's) and the temperature
    scale, the median nearest-neighbour distance of the first ``grid.max_cache_bytes // (8 searched)``
    tokens. Apart from that sample, at most that many tokens' neighbours and one batch are held at once
    (on a sharded store with default temperatures: this rank's share).
    """
    stream = _Stream(grid, searched, sharded)
    for batch in batches:
        batch.neighbours = batch.neighbours.compact()
        stream.add(batch)
    return stream.finish()


__all__ = ["SweepAccumulator", "TuningPoint", "sweep_stream"]
