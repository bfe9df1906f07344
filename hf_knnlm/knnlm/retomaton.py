"""RetoMaton (Alon et al., 2022): follow the corpus instead of searching it at every step.

Every datastore entry points to the entry that follows it in the corpus (entry ``i`` predicts
token ``i + 1``; its successor is the entry built at that token). After a step whose neighbours
were ``N``, the token actually produced (generated or observed) is ``y``; the neighbours that
predicted ``y`` were right, and their successors are the natural neighbours of the next step.
When at least ``threshold`` such pointers survive, the next step uses them and skips the faiss
search; otherwise it searches as plain kNN-LM does.

As in the paper, a pointer also stands for the cluster of entries its target belongs to (the IVF
lists of the store's index, [`Clusters`][hf_knnlm.datastore.clusters.Clusters]), so that a few
surviving pointers give a neighbourhood of ``k`` entries, as a search would, rather than a peaked
distribution over a handful. With ``pointer_step="index"`` (the default) the index scans the lists
of the pointers, most pointed first, up to ``pool`` entries' worth (4k by default), and keeps the
``k`` nearest by its own distances (exact ones with ``recompute_dists``); with ``"exact"`` the
pointers are topped up with their lists' members to ``pool`` candidates and the ``k`` nearest by
exact distance to the stored keys are kept. ``clusters=False`` (or a ``Flat`` store, which has no
lists) follows the pointers alone, by exact distance.

Teacher forcing ([`stream`][hf_knnlm.RetoMaton.stream]) walks a call's queries as
``segments`` contiguous parts side by side, so that the searches of several parts are one faiss call.

On a ``distributed="shard"`` store each step is one collective round, one query at a time, by exact
distance (``pointer_step`` does not apply): see [`sharded_step`][hf_knnlm.knnlm.retomaton_shard.sharded_step].

With ``threshold > k`` no step can skip (at most ``k`` pointers survive), which is plain kNN-LM
exactly. The automaton is stateful (one pointer set per sequence) and not thread-safe: use one
per thread / generation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..datastore.neighbours import Neighbours
from ..datastore.search_index import exact_order
from ..utils.checks import check_positive_int
from .pointer_distances import PointerDistances, nearest_columns
from .retomaton_shard import sharded_step, walk_one_by_one
from .settings import check_retomaton

if TYPE_CHECKING:
    from ..datastore import Datastore
    from ..datastore.clusters import Clusters


# Pointer steps keep the k nearest of 4k candidates from the pointers' IVF lists: on the 40-speech
# SOTU store (docs/benchmarks.md, section 5) k candidates cost +1.38% perplexity at threshold 16
# and 4k cost +0.65% with more searches saved. The 4k exact distances are not free: on that small
# IVF-PQ store a pointer step took longer than the search it replaced.
POOL_FACTOR = 4

# Parts of a teacher-forced call walked side by side (RetoMaton.stream); each part's first query
# searches, so parts shorter than MIN_SEGMENT_LENGTH would search more than they save. On a
# 97,558-entry Flat store of SmolLM2 keys (3,038 tokens, k 1024, threshold 16) the walk took 55.7 s
# as one part and 15.8 s as 64 parts, at -0.4% perplexity (bench/retomaton_speed.py --segments 1 64).
SEGMENTS = 64
MIN_SEGMENT_LENGTH = 16

# How a pointer step scores its candidates. "index" (the default where the store's index is IVF):
# the index itself scans the pointed lists, the distances a search gives; on a 97,558-entry
# IVF1024,PQ64 store of SmolLM2 keys (nprobe 32, k 1024, threshold 16) a stream of 3,038 tokens took
# 6.8 s of pointer steps and searches instead of 10.8 s with "exact", at +0.51% / +0.41% perplexity
# over plain kNN-LM (bench/retomaton_speed.py). "exact": exact distances to the stored keys of the
# pointers and their lists' members up to the pool (what a store without lists, e.g. Flat, uses).
POINTER_STEPS = ("exact", "index")


class RetoMaton:
    """Pointer state for a batch of sequences and the count of searches it saved.

    Args:
        datastore (`Datastore`): the store searched and followed.
        threshold (`int`): the fewest surviving pointers that replace a search.
        k (`int`): neighbours per step (pointer sets are cut to their ``k`` nearest).
        recompute_dists (`bool`, defaults to `False`): exact distances for searched neighbours too.
        clusters (`bool`, defaults to `True`): top pointer sets up with the members of their IVF lists.
        pool (`int`, *optional*): entries of the pointed lists scored before keeping the ``k`` nearest
            (defaults to ``4 * k``).
        segments (`int`, defaults to `SEGMENTS`): a teacher-forced stream of queries
            ([`stream`][hf_knnlm.RetoMaton.stream]) is walked as up to this many
            contiguous parts (of at least ``MIN_SEGMENT_LENGTH`` queries) side by side.
        pointer_step (`str`, defaults to `"index"`): ``"index"`` scores a pointer step with the
            store's IVF index over the pointed lists, ``"exact"`` by exact distances to the stored keys
            (a store without IVF lists always uses ``"exact"``).

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
        segments: int = SEGMENTS,
        pointer_step: str = "index",
    ):
        check_retomaton(threshold)
        check_positive_int("segments", segments, "contiguous parts of a stream walked in lockstep, e.g. 64")
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
        self.segments = segments
        if pointer_step not in POINTER_STEPS:
            raise ValueError(f"pointer_step={pointer_step!r} must be one of {POINTER_STEPS}.")
        self.pointer_step = pointer_step
        self._distances = PointerDistances(datastore, self.pool if clusters else self.k)
        self.steps = 0
        self.searches = 0
        self._state: np.ndarray | None = None  # [rows, k] entry ids of the last step (-1: none)
        self._values: np.ndarray | None = None  # their values, on a sharded store (not readable locally)

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
        self._state = self._values = None

    def pointers(self, row_ids: np.ndarray | None, token: int | None) -> np.ndarray:
        """Successors of the entries in ``row_ids`` whose value is ``token`` (unique, valid ids)."""
        if row_ids is None or token is None or not len(row_ids):
            return np.zeros(0, dtype=np.int64)
        ptrs, counts = self.pointer_sets(np.asarray(row_ids, np.int64)[None], np.array([token]))
        return ptrs[0, : counts[0]]

    def pointer_sets(
        self, prev: np.ndarray, tokens: np.ndarray, values: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The pointers of many rows at once.

        Args:
            prev (`np.ndarray`): ``[R, K]`` entry ids of each row's previous step (-1: none).
            tokens (`np.ndarray`): ``[R]`` the token each row produced (-1: none).
            values (`np.ndarray`, *optional*): ``[R, K]`` the values of ``prev`` when known (a search
                returned them), else they are read from the store.

        Returns:
            ``([R, K] successors of the entries whose value is the row's token, unique and ascending,
            then -1, [R] how many)``.
        """
        valid = prev >= 0
        safe = np.where(valid, prev, 0).reshape(-1)
        values = self.datastore.values.take(safe).reshape(prev.shape) if values is None else values
        right = valid & (values == np.asarray(tokens, np.int64)[:, None])
        nxt = np.where(right, self.datastore.provenance.successors(safe).reshape(prev.shape), -1)
        nxt.sort(axis=1)
        keep = nxt >= 0
        keep[:, 1:] &= nxt[:, 1:] != nxt[:, :-1]
        order = np.argsort(~keep, axis=1, kind="stable")  # the kept ones first, still ascending
        return np.take_along_axis(np.where(keep, nxt, -1), order, 1), keep.sum(1)

    def _candidates(self, ptrs: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
        rows = [row[:n] for row, n in zip(ptrs, counts, strict=True)]
        if self.clusters is None:
            return rows
        return [self.clusters.extend(row, self.pool) for row in rows]

    def _follow(self, q: np.ndarray, ptrs: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[P, k]`` distances and ids of pointer steps."""
        if self.pointer_step == "index" and self.clusters is not None and self.clusters.searchable:
            return self._follow_lists(q, ptrs, counts)
        return self._follow_exact(q, ptrs, counts)

    def _follow_lists(
        self, q: np.ndarray, ptrs: np.ndarray, counts: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest members of the pointers' lists (up to ``pool`` entries' worth, most pointed
        first) by the index's own distances: one ``search_preassigned`` call for every row."""
        lists = [self.clusters.pointed(row[:n], self.pool) for row, n in zip(ptrs, counts, strict=True)]
        assign = np.full((len(lists), max(len(c) for c in lists)), -1, np.int64)
        for row, chosen in enumerate(lists):
            assign[row, : len(chosen)] = chosen
        dist, ids = self.clusters.search(q, assign, self.k)
        if self.recompute_dists:
            dist, ids = exact_order(self.datastore.keys, q, dist, ids)
        return dist, ids

    def _follow_exact(
        self, q: np.ndarray, ptrs: np.ndarray, counts: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest of the pointers (topped up from their lists to ``pool``) by exact distance."""
        cands = self._candidates(ptrs, counts)
        sizes = np.array([len(c) for c in cands])
        width = max(self.k, int(sizes.max()))
        ids = np.full((len(cands), width), -1, np.int64)
        ids[np.arange(width) < sizes[:, None]] = np.concatenate(cands)
        dist = self._distances(q, ids, sizes)
        order = nearest_columns(dist, self.k)
        return np.take_along_axis(dist, order, 1), np.take_along_axis(ids, order, 1)

    def _queries(self, queries: torch.Tensor) -> np.ndarray:
        q = queries.detach().float().cpu().numpy().reshape(len(queries), -1)
        if self.datastore.key_transform is not None:
            q = self.datastore.key_transform.apply(np.ascontiguousarray(q))
        return q

    def _step(
        self, q: np.ndarray, prev: np.ndarray, tokens: np.ndarray, search
    ) -> tuple[np.ndarray, np.ndarray]:
        """One step of ``R`` rows: pointer steps where enough pointers survive, one batched search else.

        ``search(rows)`` returns the ``(distances, ids)`` a search gives for those rows.
        """
        ptrs, counts = self.pointer_sets(prev, tokens)
        follow = counts >= self.threshold
        dist = np.full((len(q), self.k), np.inf, np.float32)
        ids = np.full((len(q), self.k), -1, np.int64)
        if follow.any():
            dist[follow], ids[follow] = self._follow(q[follow], ptrs[follow], counts[follow])
        todo = np.flatnonzero(~follow)
        if len(todo):
            found_d, found_i = search(todo)
            width = min(self.k, found_i.shape[1])
            dist[todo, :width], ids[todo, :width] = found_d[:, :width], found_i[:, :width]
        self.steps += len(q)
        self.searches += len(todo)
        return dist, ids

    def _searcher(self, queries: torch.Tensor, positions: np.ndarray, precomputed: Neighbours | None):
        def search(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            at = positions[rows]
            if precomputed is not None:
                return precomputed.distances[at].numpy(), precomputed.ids[at].numpy()
            return self.datastore.search_ids(queries[torch.from_numpy(at)], self.k, self.recompute_dists)

        return search

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
        rows = len(queries)
        parents = np.arange(rows) if parents is None else np.asarray([int(p) for p in parents], np.int64)
        prev, values = np.full((rows, self.k), -1, np.int64), np.full((rows, self.k), -1, np.int64)
        if self._state is not None:
            known = (parents >= 0) & (parents < len(self._state))
            prev[known] = self._state[parents[known]]
            if self._values is not None:
                values[known] = self._values[parents[known]]
        tokens = np.full(rows, -1) if prev_tokens is None else np.asarray([int(t) for t in prev_tokens])
        if self.sharded is not None:
            found = self._sharded_step(self._queries(queries), prev, values, tokens, precomputed)
            self._state, self._values = found.ids.numpy(), found.token_ids.numpy()
            return found
        search = self._searcher(queries, np.arange(rows), precomputed)
        dist, ids = self._step(self._queries(queries), prev, tokens, search)
        self._state = ids
        return Neighbours.from_ids(self.datastore, dist, ids)

    def _sharded_step(self, q, prev, values, tokens, precomputed: Neighbours | None) -> Neighbours:
        """A step on a sharded store: pointers from the values the last round returned, one round."""
        ptrs, counts = self.pointer_sets(prev, tokens, values)
        follow = counts >= self.threshold
        rows = np.flatnonzero(follow).tolist()
        candidates = dict(zip(rows, self._candidates(ptrs[follow], counts[follow]), strict=True))
        todo = np.flatnonzero(~follow).tolist()
        found = sharded_step(self.sharded, q, self.k, self.recompute_dists, candidates, todo, precomputed)
        self.steps += len(q)
        self.searches += len(todo)
        return found

    def stream(
        self,
        queries: torch.Tensor,
        prev_tokens: Sequence[int | None],
        precomputed: Neighbours | None = None,
        segments: int | None = None,
    ) -> Neighbours:
        """Walk a token stream (teacher forcing): query ``i`` follows the pointers of query ``i - 1``
        through ``prev_tokens[i]``, the token at query ``i``'s own position.

        The stream is cut into ``segments`` (default: the automaton's) contiguous parts walked side
        by side: the parts follow their pointers together (one key gather for all) and a part whose
        pointers die waits; when every part waits, their searches are one faiss call (a Flat search
        of many queries costs little more than one). The first part continues the last step of the
        previous call; the others start with a search, so a part gives exactly what walking it alone
        gives.
        """
        n = len(queries)
        if self.sharded is not None:  # every rank takes part in every round: one query at a time
            return walk_one_by_one(self.neighbours, queries, prev_tokens, precomputed)
        if self.threshold > self.k:  # no pointer step is possible: plain kNN-LM's one search, exactly
            return self._search_all(queries, precomputed)
        wanted = min(self.segments, n // MIN_SEGMENT_LENGTH) if segments is None else segments
        parts = max(1, min(wanted, n))
        lengths = np.full(parts, n // parts)
        lengths[: n % parts] += 1
        starts = np.cumsum(lengths) - lengths
        tokens = np.asarray([-1 if t is None else int(t) for t in prev_tokens], np.int64)
        out = (np.full((n, self.k), np.inf, np.float32), np.full((n, self.k), -1, np.int64))
        state = np.full((parts, self.k), -1, np.int64)
        if self._state is not None and len(self._state):
            state[0] = self._state[-1]
        search = self._searcher(queries, np.arange(n), precomputed)
        self._walk(self._queries(queries), tokens, starts, starts + lengths, state, search, out)
        self._state = out[1][-1:] if n else self._state
        return Neighbours.from_ids(self.datastore, torch.from_numpy(out[0]), torch.from_numpy(out[1]))

    def _walk(
        self,
        q: np.ndarray,
        tokens: np.ndarray,
        pos: np.ndarray,
        ends: np.ndarray,
        state: np.ndarray,
        search: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
        out: tuple[np.ndarray, np.ndarray],
    ) -> None:
        """Advance every part (row) from ``pos`` to ``ends``: pointer steps of the rows that can take
        one, together; a row whose pointers die waits; when all wait, one search for them all."""
        dist, ids = out
        waiting = np.zeros(len(pos), bool)
        while True:
            active = pos < ends
            walking = np.flatnonzero(active & ~waiting)
            if len(walking):
                ptrs, counts = self.pointer_sets(state[walking], tokens[pos[walking]])
                follow = counts >= self.threshold
                waiting[walking[~follow]] = True
                rows = walking[follow]
                if len(rows):
                    at = pos[rows]
                    dist[at], ids[at] = self._follow(q[at], ptrs[follow], counts[follow])
                    state[rows], pos[rows] = ids[at], at + 1
                    self.steps += len(rows)
                continue
            rows = np.flatnonzero(active & waiting)
            if not len(rows):
                return
            at = pos[rows]
            found_d, found_i = search(at)
            width = min(self.k, found_i.shape[1])
            dist[at, :width], ids[at, :width] = found_d[:, :width], found_i[:, :width]
            state[rows], pos[rows], waiting[rows] = ids[at], at + 1, False
            self.steps += len(rows)
            self.searches += len(rows)

    def _search_all(self, queries: torch.Tensor, precomputed: Neighbours | None) -> Neighbours:
        rows = np.arange(len(queries))
        dist, ids = self._step(self._queries(queries), np.full((len(rows), 1), -1), rows * 0 - 1,
                               self._searcher(queries, rows, precomputed))  # fmt: skip
        self._state = ids[-1:] if len(ids) else self._state
        return Neighbours.from_ids(self.datastore, torch.from_numpy(dist), torch.from_numpy(ids))


def stream_neighbours(
    automaton: RetoMaton,
    queries: torch.Tensor,
    prev_tokens: Sequence[int | None],
    precomputed: Neighbours | None = None,
    segments: int = 1,
) -> Neighbours:
    """Walk a token stream (teacher forcing) as ``segments`` contiguous parts in lockstep (default one:
    query ``i`` follows the pointers of query ``i - 1`` for every ``i``); see ``RetoMaton.stream``."""
    return automaton.stream(queries, prev_tokens, precomputed, segments)


__all__ = [
    "MIN_SEGMENT_LENGTH",
    "POINTER_STEPS",
    "POOL_FACTOR",
    "SEGMENTS",
    "RetoMaton",
    "stream_neighbours",
]
