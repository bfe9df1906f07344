"""Neighbours: the result of every search, and the one input of p_kNN.

A faiss search ([`search`][hf_knnlm.Datastore.search]), RetoMaton's pointer-following, the gate's
partial searches and a sharded search all produce this structure; p_kNN and the mixture are
computed from it by ``hf_knnlm.knnlm.mixture`` whichever produced it, so the merge counts of a
pruned store are never forgotten on one path and used on another.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .datastore import Datastore


def _move(t: torch.Tensor | None, device: torch.device | str) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def _pick(t: torch.Tensor | None, rows) -> torch.Tensor | None:
    return None if t is None else t[rows]


@dataclass
class Neighbours:
    """``[Q, k]`` neighbours of ``Q`` queries, nearest first; a missing one has id -1 and distance ``inf``.

    Attributes:
        distances: squared L2 distances (float32).
        ids: datastore entry ids (int64), or None in compact caches that only need the values.
        token_ids: the entries' values, the next-token ids (int64, or int32 in compact caches).
        log_counts: log of each entry's merge count (pruned stores), or None when every count is 1.

    Examples:

    ```python
    >>> from hf_knnlm.datastore.testing import tiny_datastore
    >>> import torch
    >>> from hf_knnlm import Neighbours
    >>> model, tokenizer, store = tiny_datastore("my-store")
    >>> keys = torch.from_numpy(store.keys.take([0, 3]).astype("float32"))
    >>> found = store.search(keys, 4)  # the Neighbours of two queries
    >>> found.ids[:, 0].tolist(), found.distances[:, 0].tolist()  # each stored key is its own nearest
    ([0, 3], [0.0, 0.0])
    >>> found.k, len(found), found.truncate(1).ids.tolist()
    (4, 2, [[0], [3]])
    >>> Neighbours.empty(2, 3).ids.tolist()  # rows that were not searched
    [[-1, -1, -1], [-1, -1, -1]]
    ```
    """

    distances: torch.Tensor
    ids: torch.Tensor | None
    token_ids: torch.Tensor
    log_counts: torch.Tensor | None = None

    @classmethod
    def from_ids(
        cls, datastore: Datastore, distances: torch.Tensor | np.ndarray, ids: torch.Tensor | np.ndarray
    ) -> Neighbours:
        """Look up the values (and merge counts) of entry ``ids`` in ``datastore``."""
        ids = torch.as_tensor(ids).long()
        safe = ids.clamp(min=0)
        return cls(
            torch.as_tensor(distances).float(),
            ids,
            datastore.token_ids(safe),
            datastore.provenance.log_counts(safe),
        )

    @classmethod
    def empty(cls, rows: int, k: int) -> Neighbours:
        """``rows`` rows without any neighbour (they carry no kNN mass)."""
        return cls(
            torch.full((rows, k), math.inf),
            torch.full((rows, k), -1, dtype=torch.long),
            torch.zeros((rows, k), dtype=torch.long),
        )

    @classmethod
    def cat(cls, parts: Sequence[Neighbours]) -> Neighbours:
        """The rows of ``parts`` one after the other (equal ``k``)."""
        if not parts:
            raise ValueError("no neighbours to concatenate.")

        def join(name: str) -> torch.Tensor | None:
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else torch.cat(values)

        return cls(join("distances"), join("ids"), join("token_ids"), join("log_counts"))

    @property
    def k(self) -> int:
        return int(self.distances.shape[-1])

    def __len__(self) -> int:
        return int(self.distances.shape[0])

    def __getitem__(self, rows) -> Neighbours:
        """The neighbours of some rows (an index, a slice, a mask or a list of rows)."""
        return Neighbours(
            self.distances[rows], _pick(self.ids, rows), self.token_ids[rows], _pick(self.log_counts, rows)
        )

    def truncate(self, k: int) -> Neighbours:
        """The ``k`` nearest of every row (the rows are sorted)."""
        cut = (slice(None), slice(None, k))
        return Neighbours(
            self.distances[cut], _pick(self.ids, cut), self.token_ids[cut], _pick(self.log_counts, cut)
        )

    def scatter(self, rows: torch.Tensor, total: int) -> Neighbours:
        """These neighbours placed at ``rows`` of ``total`` rows; the other rows are empty."""
        out = Neighbours.empty(total, self.k)
        out.distances[rows], out.ids[rows], out.token_ids[rows] = self.distances, self.ids, self.token_ids
        if self.log_counts is not None:
            out.log_counts = torch.zeros((total, self.k), dtype=self.log_counts.dtype)
            out.log_counts[rows] = self.log_counts
        return out

    def compact(self) -> Neighbours:
        """Without entry ids and with int32 values: what a cache of p_kNN needs, in 8 bytes a neighbour."""
        return Neighbours(self.distances, None, self.token_ids.to(torch.int32), self.log_counts)

    def to(self, device: torch.device | str) -> Neighbours:
        return Neighbours(
            self.distances.to(device),
            _move(self.ids, device),
            self.token_ids.to(device),
            _move(self.log_counts, device),
        )


def pad_rows(rows: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ragged ``(distances, ids)`` rows (each sorted by distance) into ``[Q, k]`` tensors."""
    distances = np.full((len(rows), k), np.inf, dtype=np.float32)
    ids = np.full((len(rows), k), -1, dtype=np.int64)
    for row, (d, i) in enumerate(rows):
        n = min(k, len(i))
        distances[row, :n], ids[row, :n] = d[:n], i[:n]
    return torch.from_numpy(distances), torch.from_numpy(ids)


__all__ = ["Neighbours", "pad_rows"]
