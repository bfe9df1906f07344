"""k-means clusters for a store whose index has no lists (``Flat``), kept in the store.

RetoMaton tops a step's surviving pointers up with the other members of their clusters, so that a
few pointers stand for a neighbourhood of ``k`` entries as a search would return. An IVF index's
lists are such clusters already (``Clusters.from_index``); a Flat store has none, and its pointers
alone cost perplexity (97,558 SmolLM2 keys, k 1024: +1.67% at threshold 16, +1.01% at 64, see
docs/benchmarks). ``add_clusters`` runs faiss k-means over a sample of the keys once, assigns every
entry to its nearest centroid and keeps both in ``clusters.safetensors``, hashed in the store's
config like every optional file.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..utils.checks import check_positive_int
from ..utils.faiss_support import import_faiss
from .clusters import Clusters
from .config import DatastoreConfig
from .extras import CLUSTERS_NAME, add_files

logger = logging.getLogger(__name__)

# Points k-means trains on per cluster (faiss warns below 39; its own cap is 256).
TRAIN_POINTS_PER_CLUSTER = 64
ASSIGN_BATCH = 65536  # entries assigned per faiss call (float32 copies of that many keys)


def default_num_clusters(num_entries: int) -> int:
    """faiss's rule of thumb for IVF lists, 4 sqrt(N): clusters of about sqrt(N) / 4 entries."""
    return max(1, min(num_entries, round(4 * math.sqrt(num_entries))))


def kmeans_clusters(
    keys: Any, num_clusters: int, *, train_size: int | None = None, seed: int = 0, niter: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """``(assignment [N] int32, centroids [C, d] float32)``: faiss k-means over a sample of ``keys``
    (anything with ``shape`` and ``take(ids)``, e.g. ``Datastore.keys``), then every key's nearest
    centroid."""
    faiss = import_faiss("k-means clusters")
    n, d = int(keys.shape[0]), int(keys.shape[1])
    size = min(n, train_size or TRAIN_POINTS_PER_CLUSTER * num_clusters)
    sample = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    kmeans = faiss.Kmeans(d, num_clusters, niter=niter, seed=seed, verbose=False)
    kmeans.train(np.ascontiguousarray(keys.take(sample), dtype=np.float32))
    assignment = np.empty(n, np.int32)
    for start in range(0, n, ASSIGN_BATCH):
        chunk = np.ascontiguousarray(keys.take(np.arange(start, min(n, start + ASSIGN_BATCH))), np.float32)
        assignment[start : start + len(chunk)] = kmeans.index.search(chunk, 1)[1][:, 0]
    return assignment, kmeans.centroids.astype(np.float32)


def add_clusters(datastore: Any, num_clusters: int | None = None, *, train_size: int | None = None,
                 seed: int = 0) -> Clusters:  # fmt: skip
    """Fit k-means clusters of a Flat store's keys and keep them in the store; returns them.

    Args:
        datastore (`Datastore`): a store whose index has no IVF lists (an IVF index's lists are its
            clusters already).
        num_clusters (`int`, *optional*): defaults to ``4 sqrt(N)`` (clusters of ~sqrt(N) / 4 entries).
        train_size (`int`, *optional*): keys k-means trains on (default 64 per cluster).
        seed (`int`): the sample's and k-means' seed.

    Examples:

    ```python
    >>> from hf_knnlm import Datastore
    >>> from hf_knnlm.datastore.kmeans_clusters import add_clusters
    >>> from hf_knnlm.datastore.testing import tiny_datastore
    >>> _, _, store = tiny_datastore("flat-store")
    >>> store.clusters is None  # a Flat index has no lists
    True
    >>> clusters = add_clusters(store, num_clusters=2)
    >>> Datastore.from_pretrained("flat-store").clusters.num_clusters
    2
    ```
    """
    _check_clusterable(datastore)
    count = default_num_clusters(len(datastore)) if num_clusters is None else num_clusters
    check_positive_int("num_clusters", count, f"at most the store's {len(datastore)} entries, e.g. 1024")
    if count > len(datastore):
        raise ValueError(f"num_clusters={count} is more than the {len(datastore)} entries: pass fewer.")
    assignment, centroids = kmeans_clusters(datastore.keys, count, train_size=train_size, seed=seed)

    def write(folder: Path) -> list[str]:
        tensors = {"assignment": torch.from_numpy(assignment), "centroids": torch.from_numpy(centroids)}
        metadata = {"format": "hf_knnlm.clusters", "seed": str(seed)}
        save_file(tensors, str(folder / CLUSTERS_NAME), metadata=metadata)
        return [CLUSTERS_NAME]

    add_files(datastore, write)
    return datastore.clusters  # read back from the file just written


def _check_clusterable(datastore: Any) -> None:
    if getattr(datastore, "sharded", None) is not None:
        raise ValueError("add_clusters works on a whole store: open it without distributed='shard'.")
    if Clusters.from_index(datastore.index, len(datastore)) is not None:
        raise ValueError(
            f"the store in {datastore.folder} is indexed as {datastore.config.index_factory!r}, whose IVF "
            "lists are its clusters already; add_clusters is for a store without lists (Flat)."
        )


def read_clusters(folder: str | Path, config: DatastoreConfig, num_entries: int) -> Clusters | None:
    """The clusters ``add_clusters`` kept in a store (None: none, or written for other entries)."""
    if CLUSTERS_NAME not in config.files:
        return None
    with safe_open(str(Path(folder) / CLUSTERS_NAME), framework="pt") as f:
        assignment, num_clusters = f.get_tensor("assignment").numpy(), f.get_slice("centroids").get_shape()[0]
    if len(assignment) != num_entries:
        logger.warning(
            "%s covers %d entries, the store has %d: not used (add_clusters again).",
            CLUSTERS_NAME, len(assignment), num_entries,
        )  # fmt: skip
        return None
    return Clusters(assignment, num_clusters)


def clusters_of(datastore: Any) -> Clusters | None:
    """A whole store's clusters: its index's IVF lists, else those ``add_clusters`` kept, else None."""
    n = len(datastore)
    return Clusters.from_index(datastore.index, n) or read_clusters(datastore.folder, datastore.config, n)


__all__ = ["add_clusters", "clusters_of", "default_num_clusters", "kmeans_clusters", "read_clusters"]
