"""RetoMaton's step on a store opened with ``distributed="shard"``: pointers point into every rank.

A rank holds only its own entries' keys and values, so a pointer step cannot gather the pointed
keys itself: the rows that search and the rows that follow pointers go into one collective round
([`ShardedSearch.search_and_look_up`][hf_knnlm.datastore.sharded.ShardedSearch.search_and_look_up]),
where each candidate is looked up (exact distance, value) on the rank that owns it. The ``k``
nearest candidates of a pointer row are kept, as a one-process exact pointer step keeps them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..datastore.neighbours import Neighbours

if TYPE_CHECKING:
    from ..datastore.sharded import ShardedSearch


def sharded_step(
    sharded: ShardedSearch,
    q: np.ndarray,
    k: int,
    recompute_dists: bool,
    candidates: dict[int, np.ndarray],
    todo: list[int],
    precomputed: Neighbours | None = None,
) -> Neighbours:
    """One collective round for the rows of ``q``: rows ``todo`` search (or take ``precomputed``'s
    rows), row ``r`` of ``candidates`` keeps the ``k`` nearest of ``candidates[r]``.

    Args:
        sharded (`ShardedSearch`): the store's collective search.
        q (`np.ndarray`): ``[Q, d]`` queries in the index's space.
        k (`int`): neighbours per row.
        recompute_dists (`bool`): exact distances for searched neighbours too.
        candidates (`dict[int, np.ndarray]`): the entry ids each pointer row ranks.
        todo (`list[int]`): the rows that search.
        precomputed (`Neighbours`, *optional*): what a search gives for every row of ``q``.

    Returns:
        `Neighbours` ``[Q, k]``.
    """
    pointer_rows = sorted(candidates)
    lookup = None
    if pointer_rows:
        ids = np.full((len(pointer_rows), max(len(c) for c in candidates.values())), -1, dtype=np.int64)
        for j, row in enumerate(pointer_rows):
            ids[j, : len(candidates[row])] = candidates[row]
        lookup = (np.ascontiguousarray(q[pointer_rows]), ids)
    search = q[todo] if precomputed is None else q[:0]
    found, looked = sharded.search_and_look_up(search, k, recompute_dists, lookup)
    out = Neighbours.empty(len(q), k)
    if todo:
        out = _put_rows(out, todo, found if precomputed is None else precomputed[todo], k)
    if pointer_rows:
        order = torch.from_numpy(np.argsort(looked.distances.numpy(), axis=1, kind="stable")[:, :k])
        out = _put_rows(out, pointer_rows, _take(looked, order), k)
    return out


def walk_one_by_one(
    step: Callable[..., Neighbours],
    queries: torch.Tensor,
    prev_tokens: Sequence[int | None],
    precomputed: Neighbours | None = None,
) -> Neighbours:
    """A teacher-forced stream walked one query at a time with ``step`` (``RetoMaton.neighbours``):
    query ``i`` follows query ``i - 1``'s pointers through ``prev_tokens[i]``. A sharded step is a
    collective round, and lockstep parts would make the ranks' rounds differ in kind."""
    steps = []
    for i, token in enumerate(prev_tokens):
        pre = None if precomputed is None else precomputed[i : i + 1]
        steps.append(step(queries[i : i + 1], None if token is None else [token], None, pre))
    return Neighbours.cat(steps)


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


__all__ = ["sharded_step", "walk_one_by_one"]
