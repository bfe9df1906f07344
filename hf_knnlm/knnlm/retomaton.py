"""RetoMaton (Alon et al., 2022): follow the corpus instead of searching it at every step.

Every datastore entry points to the entry that follows it in the corpus (entry ``i`` predicts
token ``i + 1``; its successor is the entry built at that token). After a step whose neighbours
were ``N``, the token actually produced (generated or observed) is ``y``; the neighbours that
predicted ``y`` were right, and their successors are the natural neighbours of the next step.
When at least ``threshold`` such pointers survive, the next step uses them (exact distances to
their stored keys) and skips the faiss search; otherwise it searches as plain kNN-LM does.

As in the paper, a pointer also stands for the cluster of entries its target belongs to: the
pointed entries are topped up with the other members of their clusters (the IVF lists of the
store's index, [`Clusters`][hf_knnlm.datastore.clusters.Clusters]) up to ``pool`` candidates (4k by
default), of which the ``k`` nearest by exact distance are kept, so that a few surviving pointers
give a neighbourhood of ``k`` entries, as a search would, rather than a peaked distribution over a
handful. ``clusters=False`` (or a ``Flat`` store, which has no lists) follows the pointers alone.

With ``threshold > k`` no step can skip (at most ``k`` pointers survive), which is plain kNN-LM
exactly. The automaton is stateful (one pointer set per sequence) and not thread-safe: use one
per thread / generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..datastore.neighbours import Neighbours, pad_rows
from .settings import check_retomaton

if TYPE_CHECKING:
    from ..datastore import Datastore
    from ..datastore.clusters import Clusters


# Pointer steps keep the k nearest of 4k candidates from the pointers' IVF lists: on the 40-speech
# SOTU store (docs/benchmarks.md, section 5) k candidates cost +1.38% perplexity at threshold 16
# and 4k cost +0.65% with more searches saved. The 4k exact distances are not free: on that small
# IVF-PQ store a pointer step took longer than the search it replaced.
POOL_FACTOR = 4


class RetoMaton:
    """Pointer state for a batch of sequences and the count of searches it saved.

    Args:
        datastore (`Datastore`): the store searched and followed.
        threshold (`int`): the fewest surviving pointers that replace a search.
        k (`int`): neighbours per step (pointer sets are cut to their ``k`` nearest).
        recompute_dists (`bool`, defaults to `False`): exact distances for searched neighbours too.
        clusters (`bool`, defaults to `True`): top pointer sets up with the members of their IVF lists.
        pool (`int`, *optional*): candidates gathered from the lists before keeping the ``k`` nearest
            (defaults to ``4 * k``).

    Examples:

    ```python
    >>> import torch
    >>> from hf_knnlm.datastore.testing import tiny_datastore
    >>> from hf_knnlm.knnlm.retomaton import RetoMaton
    >>> model, tokenizer, store = tiny_datastore("store")
    >>> automaton = RetoMaton(store, threshold=1, k=4)
    >>> queries = torch.from_numpy(store.keys[[0, 1]]).float()  # the FFN inputs at two corpus positions
    >>> nb = automaton.neighbours(queries[:1])  # first step: a search
    >>> nb = automaton.neighbours(queries[1:], prev_tokens=[int(store.values[0])])  # follows a pointer
    >>> automaton.stats()
    {'steps': 2, 'searches': 1, 'searches_saved': 0.5}
    ```
    """

    def __init__(
        self,
        datastore: Datastore,
        threshold: int,
        k: int,
        recompute_dists: bool = False,
        clusters: bool = True,
        pool: int | None = None,
    ):
        check_retomaton(threshold)
        self.datastore = datastore
        self.threshold = threshold
        self.k = datastore.clamp_k(k)
        self.recompute_dists = recompute_dists
        # A sharded store's clusters are all-gathered in a collective round: at the first pointer step,
        # when every rank is in a search loop, not here (a rank may build its automaton and never step).
        self.sharded = getattr(datastore, "sharded", None)
        self._use_clusters, self._clusters = clusters, None
        if clusters and self.sharded is None:
            self._clusters = datastore.clusters
        self.pool = POOL_FACTOR * self.k if pool is None else max(int(pool), self.k)
        self._buffers: tuple[np.ndarray, np.ndarray] | None = None
        self.steps = 0
        self.searches = 0
        self._prev: list[tuple[np.ndarray, np.ndarray] | None] = []  # (ids, values) of each row's last step

    @property
    def clusters(self) -> Clusters | None:
        """The store's IVF lists that pointer sets are topped up from (None: pointers alone)."""
        if self._use_clusters and self._clusters is None and self.sharded is not None:
            self._clusters = self.datastore.clusters
            self._use_clusters = self._clusters is not None
        return self._clusters

    @property
    def searches_saved(self) -> float:
        """Fraction of steps (queries) answered without a search so far."""
        return 1.0 - self.searches / self.steps if self.steps else 0.0

    def stats(self) -> dict[str, float | int]:
        return {"steps": self.steps, "searches": self.searches, "searches_saved": self.searches_saved}

    def reset(self) -> None:
        """Forget every sequence's pointers (the next step searches); counters are kept."""
        self._prev = []

    def pointers(
        self, row_ids: np.ndarray | None, token: int | None, values: np.ndarray | None = None
    ) -> np.ndarray:
        """Successors of the entries in ``row_ids`` whose value is ``token`` (unique, valid ids); ``values``:
        those entries' values when known (a search returned them), else they are read from the store."""
        if row_ids is None or token is None or not len(row_ids):
            return np.zeros(0, dtype=np.int64)
        values = self.datastore.values.take(row_ids) if values is None else values
        nxt = self.datastore.provenance.successors(row_ids[values == token])
        return np.unique(nxt[nxt >= 0])

    def _candidates(self, ptrs: np.ndarray) -> np.ndarray:
        """The entries a pointer step ranks: the pointers, topped up from their clusters."""
        clusters = self.clusters
        return ptrs if clusters is None else clusters.extend(ptrs, self.pool)

    def _pointer_row(self, query: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = self._candidates(ids)
        d = self._distances(query, ids)
        order = np.argsort(d, kind="stable")[: self.k]
        return d[order], ids[order]

    def _distances(self, query: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact squared L2 distances from ``query`` to the stored keys of ``ids``.

        The keys go through two buffers kept for the automaton's life: fresh multi-MB arrays of a
        different size at every step fragment glibc's heap (RSS grew by GBs over a long stream).
        """
        n = len(ids)
        if self._buffers is None or len(self._buffers[0]) < n:
            width = max(n, self.pool if self._use_clusters else self.k)
            dim = self.datastore.key_dim
            stored = self.datastore.keys.dtype
            self._buffers = (np.empty((width, dim), stored), np.empty((width, dim), np.float32))
        half, full = self._buffers
        self.datastore.keys.take(ids, out=half[:n])
        keys = full[:n]
        np.copyto(keys, half[:n])
        keys -= query
        return np.einsum("ij,ij->i", keys, keys)

    def neighbours(
        self,
        queries: torch.Tensor,
        prev_tokens: torch.Tensor | Sequence[int] | None = None,
        parents: Sequence[int] | None = None,
        precomputed: Neighbours | None = None,
    ) -> Neighbours:
        """The neighbours of one step for every row of ``queries`` (``[Q, hidden_size]``).

        Args:
            prev_tokens: the token each sequence produced at the previous step (None: first step).
            parents: for each row, the row of the previous step it continues (beam search reorders
                rows); defaults to the same row. ``-1`` starts afresh.
            precomputed: neighbours a search would return for these queries (evaluation caches);
                rows that must search take them instead of calling faiss.
        """
        q = queries.detach().float().cpu().numpy().reshape(len(queries), -1)
        if self.datastore.key_transform is not None:
            q = self.datastore.key_transform.apply(np.ascontiguousarray(q))
        tokens = None if prev_tokens is None else [int(t) for t in prev_tokens]
        follow: list[np.ndarray | None] = []  # each row's pointers, None where it must search
        for row in range(len(q)):
            parent = row if parents is None else int(parents[row])
            prev = self._prev[parent] if 0 <= parent < len(self._prev) else (None, None)
            ptrs = self.pointers(prev[0], None if tokens is None else tokens[row], prev[1])
            follow.append(ptrs if len(ptrs) >= self.threshold else None)
        todo = [row for row, c in enumerate(follow) if c is None]
        if self.sharded is not None:
            found = self._sharded_step(q, follow, todo, precomputed)
        else:
            found = self._local_step(queries, q, follow, todo, precomputed)
        self.steps += len(follow)
        self.searches += len(todo)
        valid = found.ids >= 0
        self._prev = [
            (i[v].numpy(), t[v].numpy()) for i, t, v in zip(found.ids, found.token_ids, valid, strict=True)
        ]
        return found

    def _local_step(self, queries, q, follow, todo, precomputed: Neighbours | None) -> Neighbours:
        rows = [None if c is None else self._pointer_row(q[row], c) for row, c in enumerate(follow)]
        if todo:
            if precomputed is not None:
                found_d = precomputed.distances[todo, : self.k].numpy()
                found_i = precomputed.ids[todo, : self.k].numpy()
            else:
                found_d, found_i = self.datastore.search_ids(queries[todo], self.k, self.recompute_dists)
            for j, row in enumerate(todo):
                rows[row] = (found_d[j], found_i[j])
        distances, ids = pad_rows(rows, self.k)
        return Neighbours.from_ids(self.datastore, distances, ids)

    def _sharded_step(self, q: np.ndarray, follow, todo, precomputed: Neighbours | None) -> Neighbours:
        """One collective round: the rows that search search, the others' candidates are looked up on
        the ranks that hold them (exact distances, values); the ``k`` nearest kept as ``_pointer_row``."""
        pointer_rows = [row for row, c in enumerate(follow) if c is not None]
        lookup = None
        if pointer_rows:
            candidates = [self._candidates(follow[row]) for row in pointer_rows]
            ids = np.full((len(pointer_rows), max(map(len, candidates))), -1, dtype=np.int64)
            for j, c in enumerate(candidates):
                ids[j, : len(c)] = c
            lookup = (np.ascontiguousarray(q[pointer_rows]), ids)
        search = q[todo] if precomputed is None else q[:0]
        found, looked = self.sharded.search_and_look_up(search, self.k, self.recompute_dists, lookup)
        out = Neighbours.empty(len(q), self.k)
        if todo:
            part = found if precomputed is None else precomputed[todo]
            out = _put_rows(out, todo, part, self.k)
        if pointer_rows:
            order = torch.from_numpy(np.argsort(looked.distances.numpy(), axis=1, kind="stable")[:, : self.k])
            out = _put_rows(out, pointer_rows, _take(looked, order), self.k)
        return out


def _take(found: Neighbours, order: torch.Tensor) -> Neighbours:
    """The columns ``order`` ``[Q, n]`` of every row of ``found``."""
    pick = lambda t: None if t is None else torch.take_along_dim(t, order, dim=1)  # noqa: E731
    return Neighbours(pick(found.distances), pick(found.ids), pick(found.token_ids), pick(found.log_counts))


def _put_rows(out: Neighbours, rows: list[int], part: Neighbours, k: int) -> Neighbours:
    """``out`` with ``part``'s rows (their first ``k`` columns) at ``rows``."""
    n = min(k, part.ids.shape[1])
    out.distances[rows, :n], out.ids[rows, :n] = part.distances[:, :n], part.ids[:, :n]
    out.token_ids[rows, :n] = part.token_ids[:, :n]
    if part.log_counts is not None:
        if out.log_counts is None:
            out.log_counts = torch.zeros_like(out.distances)
        out.log_counts[rows, :n] = part.log_counts[:, :n]
    return out


def stream_neighbours(
    automaton: RetoMaton,
    queries: torch.Tensor,
    prev_tokens: Sequence[int | None],
    precomputed: Neighbours | None = None,
) -> Neighbours:
    """Walk a token stream (teacher forcing) one query at a time: query ``i`` follows the pointers
    of query ``i - 1`` through ``prev_tokens[i]``, the token at query ``i``'s own position."""
    steps = []
    for i in range(len(queries)):
        token = prev_tokens[i]
        pre = None if precomputed is None else precomputed[i : i + 1]
        steps.append(automaton.neighbours(queries[i : i + 1], None if token is None else [token], None, pre))
    return Neighbours.cat(steps)


__all__ = ["POOL_FACTOR", "RetoMaton", "stream_neighbours"]
