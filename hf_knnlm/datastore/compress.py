"""Smaller datastores: PCA of the keys and pruning by merging near-duplicate entries.

- **PCA** (faiss ``PCAMatrix``, trained on a sample of keys): keys are stored with ``pca_dim``
  dimensions and every query goes through the same transform (``key_transform.faiss``). The
  component of a query outside the kept subspace adds the same amount to the distance of every
  neighbour, which softmax ignores; what is lost is the keys' own residual.
- **Pruning** (greedy merging, He et al., 2021): each entry's ``merge_k`` nearest neighbours are
  searched; neighbours with the same value are merged into one entry whose weight (``counts``) is
  the number merged, closest pairs first, until ``prune_to`` of the entries are left (or no pair is
  left). p_kNN then weighs each neighbour by its count, so merging near-duplicates changes little.

The result is a new store (the source is read, never modified) whose ``entries.safetensors``
keeps corpus positions, RetoMaton pointers (to the merged entry) and counts, and whose
``documents.safetensors`` is copied, so attribution still points at the right text.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..faiss_support import import_faiss
from ..files import atomic_path
from ..hub_mixin import finish_folder
from .builder import write_store
from .card import datastore_card
from .config import CONFIG_NAME, DatastoreConfig
from .extras import TRANSFORM_NAME, copy_extra_files
from .index import new_index, train_sample
from .provenance import Provenance
from .storage import ShardedArray, shard_bounds

if TYPE_CHECKING:
    import faiss

logger = logging.getLogger(__name__)

_ROWS = 65536


def check_compress_args(num_entries: int, key_dim: int, pca_dim: int | None, prune_to: float | None) -> None:
    if pca_dim is not None and not 0 < pca_dim <= key_dim:
        raise ValueError(f"pca_dim={pca_dim} must be in [1, {key_dim}] (the store's key width).")
    if prune_to is not None and not 0 < prune_to <= 1:
        raise ValueError(f"prune_to={prune_to} must be in (0, 1]: the fraction of entries to keep.")
    if num_entries < 2:
        raise ValueError(f"the store has {num_entries} entries; there is nothing to compress.")


def factory_for_dim(factory: str, src_dim: int, dim: int) -> str:
    """The source store's index type for ``dim``-wide keys: PQ codes shrink with the dimensions
    (``PQ64`` at 576 -> ``PQ32`` at 288), to a count of sub-quantizers that divides ``dim``."""

    def scale(match: re.Match) -> str:
        m = max(1, round(int(match.group(1)) * dim / src_dim))
        while dim % m:
            m -= 1
        return f"PQ{m}"

    return re.sub(r"PQ(\d+)", scale, factory)


def train_pca(keys: ShardedArray, pca_dim: int, sample_size: int = 262144) -> faiss.PCAMatrix:
    """A faiss PCA from the key width to ``pca_dim``, trained on a uniform sample of keys."""
    pca = import_faiss("Compressing a datastore").PCAMatrix(keys.shape[1], pca_dim)
    pca.train(train_sample(keys, len(keys), sample_size))
    return pca


def merge_plan(
    keys: ShardedArray, values: np.ndarray, index: faiss.Index, merge_k: int, prune_to: float
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy merging: ``(representative of every entry, count of every entry)``.

    Pairs (entry, neighbour) with equal values are taken closest first; a pair whose two entries
    already belong to different kept entries joins them (the neighbour's group moves into the
    entry's), until ``len(values) * prune_to`` entries are left.
    """
    n = len(values)
    target = max(1, int(round(n * prune_to)))
    pairs_a, pairs_b, dists = [], [], []
    for start in range(0, n, _ROWS):
        block = np.ascontiguousarray(keys.take(np.arange(start, min(n, start + _ROWS))), dtype=np.float32)
        d, ids = index.search(block, merge_k + 1)
        rows = np.arange(start, start + len(block))[:, None].repeat(ids.shape[1], 1)
        same = (ids >= 0) & (ids != rows) & (values[np.maximum(ids, 0)] == values[rows])
        pairs_a.append(rows[same])
        pairs_b.append(ids[same])
        dists.append(d[same])
    a, b, d = np.concatenate(pairs_a), np.concatenate(pairs_b), np.concatenate(dists)
    order = np.argsort(d, kind="stable")
    parent = np.arange(n)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    left = n
    for i in order:
        if left <= target:
            break
        ra, rb = find(int(a[i])), find(int(b[i]))
        if ra != rb:
            parent[rb] = ra
            left -= 1
    reps = np.array([find(i) for i in range(n)], dtype=np.int64)
    counts = np.bincount(reps, minlength=n).astype(np.int64)
    return reps, counts


def compress_datastore(
    datastore,
    output_dir: str | os.PathLike,
    *,
    pca_dim: int | None = None,
    prune_to: float | None = None,
    merge_k: int = 8,
    index_factory: str | None = None,
    train_size: int = 1_000_000,
    overwrite: bool = False,
):
    """Write a smaller copy of ``datastore`` to ``output_dir`` and open it.

    Args:
        pca_dim (`int`, *optional*): keep this many PCA dimensions of the keys (e.g. half).
        prune_to (`float`, *optional*): keep this fraction of the entries by greedy merging.
        merge_k (`int`, defaults to 8): neighbours searched per entry for merge candidates.
        index_factory (`str`, *optional*): faiss index of the new store (default: the source's, its
            PQ code shrunk in proportion to the dimensions, see :func:`factory_for_dim`).
        train_size (`int`, defaults to 1_000_000): keys sampled to train the PCA and the index.
        overwrite (`bool`, defaults to `False`): replace a finished store in ``output_dir``.

    With neither ``pca_dim`` nor ``prune_to`` the copy is exact (same keys, values and index type).
    """
    from .datastore import Datastore

    src = datastore
    check_compress_args(len(src), src.key_dim, pca_dim, prune_to)
    out = Path(output_dir)
    if out.exists() and out.resolve() == src.folder.resolve():
        raise ValueError(f"output_dir={str(out)!r} is the store itself; choose a new folder.")
    if (out / CONFIG_NAME).exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a datastore; pass overwrite=True or a new output_dir.")
    if src.key_transform is not None and pca_dim is not None:
        raise ValueError(f"{src.folder} is already PCA-compressed; compress the original store instead.")
    dim = pca_dim or src.key_dim
    factory = index_factory or factory_for_dim(src.config.index_factory, src.key_dim, dim)
    new_index(factory, dim)  # a bad string fails now, before any work

    values = src.values.to_numpy()
    old = src.provenance
    keep = np.arange(len(src))
    counts = old.counts.astype(np.int64) if old.counts is not None else None
    next_ids = None
    if prune_to is not None and prune_to < 1:
        reps, merged = merge_plan(src.keys, values, src.search_index, merge_k, prune_to)
        if counts is not None:  # a store pruned before: its weights add up
            merged = np.bincount(reps, weights=counts, minlength=len(src)).astype(np.int64)
        keep = np.flatnonzero(reps == np.arange(len(src)))
        new_id = np.full(len(src), -1, dtype=np.int64)
        new_id[keep] = np.arange(len(keep))
        succ = old.successors(keep)
        next_ids = np.where(succ >= 0, new_id[reps[np.maximum(succ, 0)]], -1)
        counts = merged[keep]
        logger.info("pruned %d -> %d entries", len(src), len(keep))
    elif old.next_ids is not None:
        next_ids = old.next_ids

    pca = train_pca(src.keys, pca_dim, train_size) if pca_dim is not None else None

    def key_rows():
        for start in range(0, len(keep), _ROWS):
            rows = src.keys.take(keep[start : start + _ROWS]).astype(np.float32)
            yield rows if pca is None else pca.apply(np.ascontiguousarray(rows))

    config = DatastoreConfig.from_dict(src.config.to_dict())
    config.index_factory = factory
    config.evaluation = None
    bounds = shard_bounds(len(keep), dim * 2, "5GB")
    values_kept = [values[keep].astype(np.int32)]
    # Written beside ``out`` and swapped in whole (under its lock): an old store there stays until then.
    with src._writable_folder(out) as folder:
        files = write_store(
            folder, config, key_rows(), values_kept, bounds, train_size=train_size, key_dim=dim
        )

        provenance = Provenance(
            len(keep), old.entry_positions(keep), next_ids, counts, documents=old.documents
        )
        extra = provenance.save(folder)
        if pca is not None:
            with atomic_path(folder / TRANSFORM_NAME) as tmp:
                import_faiss().write_VectorTransform(pca, str(tmp))
            extra.append(TRANSFORM_NAME)
        elif src.key_transform is not None:  # pruning a PCA store: queries still need its transform
            extra += copy_extra_files(src.folder, folder, src.config, only=(TRANSFORM_NAME,))
        # A gate is not carried over: it was fitted to the source store's p_kNN.

        before = src.config.compression or {}
        config.compression = {
            "source_entries": before.get("source_entries", len(src)),
            "pca_dim": pca_dim or before.get("pca_dim"),
            "prune_to": prune_to if prune_to is not None else before.get("prune_to"),
            "merge_k": merge_k if prune_to is not None else before.get("merge_k"),
        }
        finish_folder(folder, config, [*files, *extra], datastore_card)
    return Datastore.from_pretrained(out, verify=False, nprobe=src.nprobe, gpu=src.gpu)
