"""Clusters of datastore entries, read from the IVF lists of the store's own faiss index.

RetoMaton (Alon et al., 2022) groups entries whose keys are close and, when it follows a pointer,
also takes the other members of the pointed entry's group: a handful of surviving pointers then
stands for a whole neighbourhood, as a search would return, rather than a few entries. The paper
clusters the keys with k-means; an IVF index has already done exactly that (its coarse quantizer
is a k-means over the keys and every entry sits in the list of its nearest centroid), so the lists
are the clusters, at no extra training and no extra file. A store without IVF lists (``Flat``)
has no clusters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..utils.faiss_support import import_faiss

if TYPE_CHECKING:
    import faiss

# Above these, Clusters' lookups sort instead of scanning a table as long as the store or its cluster list.
TABLE_RANGE = 1 << 24
BINCOUNT_CLUSTERS = 1 << 16


class Clusters:
    """Which cluster each entry is in, and the members of each cluster.

    Args:
        assignment (`np.ndarray`): cluster id of every entry, ``[N]``, ids in ``[0, num_clusters)``.
        num_clusters (`int`): number of clusters.
    """

    def __init__(self, assignment: np.ndarray, num_clusters: int, ivf: faiss.IndexIVF | None = None):
        self.assignment = np.asarray(assignment, dtype=np.int32)
        self._members = np.argsort(self.assignment, kind="stable")
        self._starts = np.searchsorted(self.assignment[self._members], np.arange(num_clusters + 1))
        self._ivf = ivf  # the index whose lists these are, when queries reach it untransformed
        self._centroids: np.ndarray | None = None

    @property
    def num_clusters(self) -> int:
        return len(self._starts) - 1

    @classmethod
    def from_index(cls, index: faiss.Index, num_entries: int) -> Clusters | None:
        """The IVF lists of ``index`` as clusters; None when it has none or misses entries."""
        assignment = list_assignment(index, 0, num_entries)
        if (assignment < 0).any():  # no lists, or a partial index (entries not added): no reliable clusters
            return None
        faiss = import_faiss()
        ivf = faiss.extract_index_ivf(index)
        return cls(assignment, ivf.nlist, ivf if isinstance(index, faiss.IndexIVF) else None)

    def members(self, clusters: np.ndarray) -> np.ndarray:
        """The entries of ``clusters``, cluster after cluster in the order given."""
        parts = [self._members[self._starts[c] : self._starts[c + 1]] for c in clusters]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _most_pointed(self, ids: np.ndarray) -> np.ndarray:
        """The clusters of ``ids``, those holding more of them first (ties: lower cluster id first)."""
        if self.num_clusters <= BINCOUNT_CLUSTERS:  # a count per cluster is cheaper than unique's sort
            counts = np.bincount(self.assignment[ids], minlength=self.num_clusters)
            clusters = np.flatnonzero(counts)
            counts = counts[clusters]
        else:  # but scanning that many clusters for each pointer row is not
            clusters, counts = np.unique(self.assignment[ids], return_counts=True)
        return clusters[np.argsort(-counts, kind="stable")]

    def extend(self, ids: np.ndarray, limit: int) -> np.ndarray:
        """``ids`` followed by the other members of their clusters, up to ``limit`` entries in all.

        Clusters holding more of ``ids`` come first: they are where the pointers agree.
        """
        if len(ids) >= limit or not len(ids):
            return ids[:limit]
        clusters = self._most_pointed(ids)
        sizes = self._starts[clusters + 1] - self._starts[clusters]
        # Enough clusters to fill the limit even if every given id is among their members.
        enough = int(np.searchsorted(np.cumsum(sizes), limit + len(ids))) + 1
        members = self.members(clusters[:enough])
        # A lookup table over the ids' range (when that fits in 16 MB): a RetoMaton step calls this per row,
        # and numpy's sorting isin cost as much as the distances it feeds.
        kind = "table" if int(np.ptp(ids)) < TABLE_RANGE else None
        extra = members[~np.isin(members, ids, kind=kind)][: limit - len(ids)]
        return np.concatenate([ids, extra])

    def pointed(self, ids: np.ndarray, limit: int) -> np.ndarray:
        """The clusters of ``ids``, most-shared first, as many as it takes to hold ``limit`` entries."""
        clusters = self._most_pointed(ids)
        sizes = self._starts[clusters + 1] - self._starts[clusters]
        return clusters[: int(np.searchsorted(np.cumsum(sizes), limit)) + 1]

    @property
    def searchable(self) -> bool:
        """Whether ``search`` can score members with the index (its queries need no transform)."""
        return self._ivf is not None

    def search(self, queries: np.ndarray, clusters: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest members of the given clusters by the index's own (e.g. PQ) distances.

        A plain search scans the lists of the ``nprobe`` centroids nearest each query; this scans
        the lists chosen for each row instead (faiss ``search_preassigned``), the same distances.

        Args:
            queries (`np.ndarray`): ``[Q, d]`` float32, in the index's space.
            clusters (`np.ndarray`): ``[Q, m]`` cluster ids per row, ``-1`` for none.
            k (`int`): neighbours per row.

        Returns:
            ``(distances [Q, k], ids [Q, k])``; missing neighbours are inf / -1.
        """
        faiss = import_faiss()
        if self._centroids is None:
            self._centroids = self._ivf.quantizer.reconstruct_n(0, self._ivf.nlist)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        assign = np.ascontiguousarray(clusters, dtype=np.int64)
        diff = self._centroids[np.where(assign >= 0, assign, 0)] - queries[:, None]
        coarse = np.ascontiguousarray(np.einsum("qmd,qmd->qm", diff, diff), dtype=np.float32)
        params = faiss.SearchParametersIVF()
        params.nprobe = assign.shape[1]  # per call, not on the shared index: other threads search it
        n = len(queries)
        distances, ids = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
        ptr = faiss.swig_ptr
        self._ivf.search_preassigned_c(
            n, ptr(queries), k, ptr(assign), ptr(coarse), ptr(distances), ptr(ids), False, params
        )
        return np.where(ids < 0, np.inf, distances).astype(np.float32), ids


def list_assignment(index: faiss.Index, start: int, end: int) -> np.ndarray:
    """The IVF list of each entry ``start .. end - 1`` in ``index`` (-1: in no list, or no lists at all)."""
    faiss = import_faiss()
    assignment = np.full(end - start, -1, dtype=np.int64)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return assignment
    lists = ivf.invlists
    for cluster in range(ivf.nlist):
        size = lists.list_size(cluster)
        if size:
            ptr = lists.get_ids(cluster)
            ids = faiss.rev_swig_ptr(ptr, size).copy()
            lists.release_ids(cluster, ptr)
            assignment[ids[(ids >= start) & (ids < end)] - start] = cluster
    return assignment
