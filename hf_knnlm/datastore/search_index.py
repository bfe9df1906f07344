"""The faiss index a datastore searches: the CPU index, its GPU clone, and ``nprobe`` per search.

Several threads may search one store while another changes ``nprobe`` or replaces the index: a CPU
search reads ``nprobe`` once and passes it as a per-search parameter; a GPU clone takes no
per-search parameters, so it is set and searched under one lock. Either way a change applies to
the next search, never inside a running one.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np

from ..utils.checks import check_positive_int
from ..utils.faiss_support import use_blas_from
from .index import GPU_MAX_K, index_to_gpus, search_parameters, set_nprobe
from .storage import ShardedArray, exact_sq_distances

if TYPE_CHECKING:
    import faiss


class SearchIndex:
    """A CPU faiss index, cloned to the GPUs on first use when faiss-gpu sees any (and ``gpu`` allows).

    Args:
        index (`faiss.Index`): the CPU index (memory-mapped or in RAM).
        nprobe (`int`): IVF lists probed per query.
        gpu (`str` or `bool`): ``"auto"``, ``"replicate"``, ``"shard"`` or ``"none"``
            (see ``hf_knnlm.datastore.index.index_to_gpus``).
        device (`int`, *optional*): the one GPU to clone onto (a rank of a sharded store).
    """

    def __init__(
        self, index: faiss.Index, *, nprobe: int, gpu: str | bool, device: int | None = None
    ) -> None:
        self._lock = threading.Lock()
        self.gpu, self.device = gpu, device
        self.cpu = index
        self.nprobe = nprobe
        set_nprobe(index, nprobe)  # for code that searches the CPU index directly

    @property
    def cpu(self) -> faiss.Index:
        """The CPU index; saving and rebuilding work on this one."""
        return self._cpu

    @cpu.setter
    def cpu(self, index: faiss.Index) -> None:
        self._cpu = index
        self._gpu = None  # a new CPU index invalidates its GPU clone

    @property
    def nprobe(self) -> int:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        check_positive_int("nprobe", value, "IVF lists probed per query")
        with self._lock:
            self._nprobe = value
            if self._gpu is not None:
                set_nprobe(self._gpu, value, on_gpu=True)

    @property
    def active(self) -> faiss.Index:
        """The index queries go to: the GPU clone when there is one, else ``cpu``."""
        if self._gpu is None and self.gpu not in ("none", False, None):
            clone = index_to_gpus(self._cpu, self.gpu, device=self.device)
            if clone is not self._cpu:
                set_nprobe(clone, self.nprobe, on_gpu=True)
                self._gpu = clone
        return self._cpu if self._gpu is None else self._gpu

    @property
    def on_gpu(self) -> bool:
        return self._gpu is not None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(squared distances, ids)`` of the ``k`` nearest keys of float32 ``queries``."""
        index = self.active
        if index is not self._cpu:
            with self._lock:
                return index.search(queries, k)
        nprobe = self._nprobe  # read once: the whole search uses one value
        use_blas_from(index.d, index.ntotal)  # BLAS for small batches too: see faiss_support
        return index.search(queries, k, params=search_parameters(index, nprobe))


def prepare_queries(queries, width: int, transform=None, gpu_k: int | None = None) -> np.ndarray:
    """``queries`` (a tensor or array ``[Q, width]``) as contiguous float32 numpy, through ``transform``
    (a PCA-compressed store's); ``gpu_k`` is the k of a search on a GPU index, checked against faiss's cap."""
    q = queries.detach().float().cpu().numpy() if hasattr(queries, "detach") else queries
    q = np.ascontiguousarray(q, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != width:
        raise ValueError(
            f"queries have shape {list(q.shape)}; this store takes queries of width {width}, "
            f"so pass [num_queries, {width}]: the FFN inputs of the model that built it."
        )
    if transform is not None:
        q = transform.apply(q)
    if gpu_k is not None and gpu_k > GPU_MAX_K:
        raise ValueError(
            f"k={gpu_k} is more than faiss GPU indexes return ({GPU_MAX_K}); use "
            f"k <= {GPU_MAX_K} or open the datastore with gpu='none'."
        )
    return q


def search_keys(
    searcher: SearchIndex,
    keys: ShardedArray,
    queries: np.ndarray,
    k: int,
    recompute_dists: bool = False,
    first_id: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """``(squared distances, ids)`` of the ``k`` nearest of ``keys``; missing neighbours are inf / -1.

    ``first_id`` is the id the index gives to ``keys[0]`` (0 for a whole store; a rank's first entry
    for the slice of a shared IVF index, whose lists keep the store's ids).
    """
    distances, ids = searcher.search(queries, k)
    if recompute_dists:
        return exact_order(keys, queries, distances, ids, first_id)
    return np.where(ids < 0, np.inf, distances).astype(np.float32), ids


def exact_order(
    keys: ShardedArray, queries: np.ndarray, distances: np.ndarray, ids: np.ndarray, first_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate neighbours ``(distances, ids)`` ``[Q, k]`` with exact distances instead, reordered."""
    missing = ids < 0
    distances = exact_sq_distances(keys, queries, np.where(missing, 0, ids - first_id))
    # Approximate search orders by approximate distance; exact ones may reorder.
    order = np.argsort(np.where(missing, np.inf, distances), axis=1, kind="stable")
    distances, ids, missing = (np.take_along_axis(a, order, 1) for a in (distances, ids, missing))
    return np.where(missing, np.inf, distances).astype(np.float32), ids


__all__ = ["SearchIndex", "exact_order", "prepare_queries", "search_keys"]
