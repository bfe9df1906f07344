"""A bounded kNN memory: a faiss inner-product index of search vectors with aligned payload tensors.

Oldest-first eviction keeps the index and the payload rows aligned: faiss' flat index compacts
after ``remove_ids``, so row ``i`` of the index is row ``i`` of every payload tensor.
"""

from __future__ import annotations

import numpy as np
import torch

from ..utils.checks import check_positive_int
from ..utils.faiss_support import import_faiss


class KNNMemory:
    """Search vectors in a flat inner-product faiss index, each with payload rows (keys, values, ...).

    Args:
        dim (`int`): Size of the search vectors.
        max_size (`int | None`): Most entries kept; the oldest are evicted first. ``None``: no bound.

    Examples:

    ```python
    >>> import torch
    >>> from hf_knnlm.attention import KNNMemory
    >>> memory = KNNMemory(dim=2, max_size=2)
    >>> for step in range(3):
    ...     memory.add(torch.tensor([[1.0, float(step)]]), position=torch.tensor([step]))
    >>> len(memory), memory.payload["position"].tolist()  # step 0 was evicted
    (2, [1, 2])
    >>> scores, rows = memory.search(torch.tensor([[0.0, 1.0]]), k=1)
    >>> memory.payload["position"][rows].tolist()  # the best match for (0, 1) is (1, 2)
    [[2]]
    ```
    """

    def __init__(self, dim: int, max_size: int | None = None) -> None:
        check_positive_int("dim", dim, "size of the search vectors")
        if max_size is not None:
            check_positive_int("max_size", max_size, "entries kept; None for no bound")
        self.dim, self.max_size = dim, max_size
        self._faiss = import_faiss("a kNN attention memory")
        self.index = self._faiss.IndexFlatIP(dim)
        self.payload: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.index.ntotal

    def clear(self) -> None:
        """Forget every entry (a document boundary)."""
        self.index.reset()
        self.payload = {}

    def add(self, vectors: torch.Tensor, **payload: torch.Tensor) -> None:
        """Append ``vectors`` (n, dim) with payload tensors of n rows each, then evict the oldest."""
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"vectors of shape {tuple(vectors.shape)} must be (n, {self.dim}).")
        n = vectors.shape[0]
        if self.payload and set(payload) != set(self.payload):
            raise ValueError(f"payload names {sorted(payload)} must be the memory's {sorted(self.payload)}.")
        for name, rows in payload.items():
            if rows.shape[0] != n:
                raise ValueError(f"payload {name!r} has {rows.shape[0]} rows for {n} vectors.")
            rows = rows.detach()
            self.payload[name] = torch.cat([self.payload[name], rows]) if name in self.payload else rows
        self.index.add(np.ascontiguousarray(vectors.detach().float().cpu().numpy()))
        extra = len(self) - self.max_size if self.max_size is not None else 0
        if extra > 0:
            self.index.remove_ids(self._faiss.IDSelectorRange(0, extra))
            self.payload = {name: rows[extra:] for name, rows in self.payload.items()}

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inner-product scores and rows (m, min(k, len)) of the best entries for ``queries`` (m, dim)."""
        k = min(k, len(self))
        if k == 0:
            raise ValueError("search in an empty memory; check len(memory) first.")
        scores, rows = self.index.search(np.ascontiguousarray(queries.detach().float().cpu().numpy()), k)
        return torch.from_numpy(scores), torch.from_numpy(rows).long()


__all__ = ["KNNMemory"]
