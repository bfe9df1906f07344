"""The neighbours of a batch of queries: entry ids, distances, values and (pruned stores) merge counts.

A faiss search, RetoMaton's pointer-following and attribution all produce or read this one
structure; p_kNN is computed from it the same way whichever produced it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..knnlm.mixture import knn_log_probs, knn_target_log_probs, neighbour_log_weights

if TYPE_CHECKING:
    from . import Datastore


@dataclass
class Neighbours:
    """``[Q, k]`` neighbours; a missing one has id -1 and distance ``inf``.

    Attributes:
        distances: squared L2 distances (float32).
        ids: datastore entry ids (int64).
        token_ids: the entries' values, next-token ids (int64).
        log_counts: log of each entry's merge count (pruned stores), or None when every count is 1.

    Examples:

    ```python
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config
    >>> tokenizer = AutoTokenizer.from_pretrained("gpt2")
    >>> model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2))  # any causal LM
    >>> import torch
    >>> from hf_knnlm import Datastore
    >>> store = Datastore.build(model, tokenizer, ["The cat sat on the mat."], "my-store",
    ...                         max_length=16, stride=8, disable_progress=True)
    >>> keys = torch.from_numpy(store.keys.take([0, 3]).astype("float32"))
    >>> found = store.search_entries(keys, 4)  # the Neighbours of two queries
    >>> found.ids[:, 0].tolist(), found.distances[:, 0].tolist()  # each stored key is its own nearest
    ([0, 3], [0.0, 0.0])
    >>> found.log_weights(temperature=1.0).exp().sum(dim=-1)  # softmax(-d / T) over the k neighbours
    tensor([1., 1.])
    ```
    """

    distances: torch.Tensor
    ids: torch.Tensor
    token_ids: torch.Tensor
    log_counts: torch.Tensor | None = None

    @classmethod
    def from_ids(cls, datastore: Datastore, distances: torch.Tensor, ids: torch.Tensor) -> Neighbours:
        """Look up the values (and merge counts) of entry ``ids`` in ``datastore``."""
        ids = ids.long()
        safe = ids.clamp(min=0)
        return cls(
            distances.float(),
            ids,
            datastore.token_ids(safe),
            datastore.provenance.log_counts(safe),
        )

    def log_weights(self, temperature: float) -> torch.Tensor:
        """log of each neighbour's share of p_kNN (softmax over -d / T + log count)."""
        return neighbour_log_weights(self.distances, temperature, self.log_counts)

    def log_probs(self, vocab_size: int, temperature: float) -> torch.Tensor:
        """log p_kNN over the vocabulary, ``[Q, vocab_size]``."""
        return knn_log_probs(self.distances, self.token_ids, vocab_size, temperature, self.log_counts)

    def target_log_probs(self, targets: torch.Tensor, temperature: float) -> torch.Tensor:
        """log p_kNN(target) of each row, ``[Q]``."""
        return knn_target_log_probs(self.distances, self.token_ids, targets, temperature, self.log_counts)

    def to(self, device: torch.device | str) -> Neighbours:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Neighbours(move(self.distances), move(self.ids), move(self.token_ids), move(self.log_counts))


def pad_rows(rows: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ragged ``(distances, ids)`` rows (each sorted by distance) into ``[Q, k]`` tensors."""
    distances = np.full((len(rows), k), np.inf, dtype=np.float32)
    ids = np.full((len(rows), k), -1, dtype=np.int64)
    for row, (d, i) in enumerate(rows):
        n = min(k, len(i))
        distances[row, :n], ids[row, :n] = d[:n], i[:n]
    return torch.from_numpy(distances), torch.from_numpy(ids)
