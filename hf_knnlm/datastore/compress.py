"""Smaller datastores: PCA of the keys and pruning by merging near-duplicate entries.

- **PCA** (faiss ``PCAMatrix``, trained on a sample of keys): keys are stored with ``pca_dim``
  dimensions and every query goes through the same transform (``key_transform.faiss``). The
  component of a query outside the kept subspace adds the same amount to the distance of every
  neighbour, which softmax ignores; what is lost is the keys' own residual.
- **Pruning** (greedy merging, He et al., 2021): each entry's ``merge_k`` nearest entries *with the
  same value* are searched (among the keys of that value only: exact L2, or an IVF-Flat over the
  group for very frequent tokens); closest pairs first, a kept entry absorbs a neighbour that has
  absorbed nothing itself (stars, not chains), and its weight (``counts``) is the number merged,
  until ``prune_to`` of the entries are left; when no candidate pair can merge any more, it stops
  there and says so (a larger ``merge_k`` gives more candidates).
  p_kNN then weighs each neighbour by its count, so merging near-duplicates changes little.

The result is a new store (the source is read, never modified) whose ``entries.safetensors``
keeps corpus positions, RetoMaton pointers (to the merged entry) and counts, and whose
``documents.safetensors`` is copied, so attribution still points at the right text.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..utils.faiss_support import import_faiss
from ..utils.files import atomic_path
from ..utils.hub_mixin import finish_folder
from .builder import write_store
from .card import datastore_card
from .config import CONFIG_NAME, DatastoreConfig
from .extras import TRANSFORM_NAME, copy_extra_files
from .index import DEFAULT_TRAIN_SIZE, new_index, train_sample
from .provenance import Provenance
from .shards import DEFAULT_MAX_SHARD_SIZE
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


# Groups of same-value keys up to this size are searched exactly (n^2 distances); larger ones
# (the most frequent tokens: ~100k entries in a 2M-entry store) through an IVF-Flat over the group.
_EXACT_GROUP = 8192
_GROUP_NPROBE = 16


def _group_index(keys: np.ndarray) -> faiss.Index:
    faiss = import_faiss("Compressing a datastore")
    n, dim = keys.shape
    if n <= _EXACT_GROUP:
        index = faiss.IndexFlatL2(dim)
    else:
        nlist = int(2 * np.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist)
        index.train(keys)
        index.nprobe = _GROUP_NPROBE
    index.add(keys)
    return index


def same_value_pairs(keys: ShardedArray, values: np.ndarray, merge_k: int) -> tuple[np.ndarray, ...]:
    """``(a, b, squared distance)``: for every entry ``a``, its ``merge_k`` nearest other entries
    ``b`` with the same value (fewer when its value has fewer entries)."""
    order = np.argsort(values, kind="stable")
    bounds = np.flatnonzero(np.diff(values[order])) + 1
    pairs_a, pairs_b, dists = [], [], []
    for ids in np.split(order, bounds):
        if len(ids) < 2:
            continue
        group = np.ascontiguousarray(keys.take(ids), dtype=np.float32)
        index = _group_index(group)
        for start in range(0, len(ids), _ROWS):
            d, nb = index.search(group[start : start + _ROWS], min(merge_k + 1, len(ids)))
            rows = np.arange(start, start + len(d))[:, None].repeat(nb.shape[1], 1)
            ok = (nb >= 0) & (nb != rows)
            pairs_a.append(ids[rows[ok]])
            pairs_b.append(ids[nb[ok]])
            dists.append(d[ok])
    if not pairs_a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(pairs_a), np.concatenate(pairs_b), np.concatenate(dists)


def merge_plan(
    keys: ShardedArray, values: np.ndarray, merge_k: int, prune_to: float
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy merging: ``(representative of every entry, count of every entry)``.

    Pairs (entry, one of its ``merge_k`` nearest same-value entries) are taken closest first; the
    neighbour is merged into the entry when the entry is still kept and the neighbour is kept and
    holds no merged entry itself, so every merged entry is one of its representative's nearest
    (no chains of merges drifting away from the kept key), until ``len(values) * prune_to``
    entries are left or no pair can merge.
    """
    n = len(values)
    target = max(1, int(round(n * prune_to)))
    a, b, d = same_value_pairs(keys, values, merge_k)
    order = np.argsort(d, kind="stable")
    rep = list(range(n))  # plain ints: numpy scalar indexing is ~10x slower in this loop
    size = [1] * n
    left = n
    for x, y in zip(a[order].tolist(), b[order].tolist(), strict=True):
        if left <= target:
            break
        if rep[x] == x and rep[y] == y and size[y] == 1:
            rep[y] = x
            size[x] += 1
            left -= 1
    if left > target:
        logger.warning(
            "pruning stopped at %d of %d entries (%.1f%%, asked %.1f%%): no pair among each entry's "
            "merge_k=%d nearest same-value entries can merge any more; a larger merge_k finds more.",
            left,
            n,
            100 * left / n,
            100 * prune_to,
            merge_k,
        )
    reps = np.asarray(rep, dtype=np.int64)
    counts = np.bincount(reps, minlength=n).astype(np.int64)
    return reps, counts


def _plan_compression(
    src, out: Path, pca_dim: int | None, prune_to: float | None, index_factory: str | None, overwrite: bool
) -> tuple[int, str]:
    """The new key width and index type; everything that cannot succeed is refused here, before any work."""
    check_compress_args(len(src), src.key_dim, pca_dim, prune_to)
    if out.exists() and out.resolve() == src.folder.resolve():
        raise ValueError(f"output_dir={str(out)!r} is the store itself; choose a new folder.")
    if (out / CONFIG_NAME).exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a datastore; pass overwrite=True or a new output_dir.")
    if src.key_transform is not None and pca_dim is not None:
        raise ValueError(f"{src.folder} is already PCA-compressed; compress the original store instead.")
    dim = pca_dim or src.key_dim
    factory = index_factory or factory_for_dim(src.config.index_factory, src.key_dim, dim)
    new_index(factory, dim)  # a bad string fails now, before any work
    return dim, factory


def _kept_entries(
    src, values: np.ndarray, prune_to: float | None, merge_k: int
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(kept entry ids, their counts, their RetoMaton pointers)``: pruning renumbers the pointers to the
    entries that absorbed their targets, so that RetoMaton still follows the corpus."""
    old = src.provenance
    keep = np.arange(len(src))
    counts = old.counts.astype(np.int64) if old.counts is not None else None
    if prune_to is None or prune_to >= 1:
        return keep, counts, old.next_ids
    reps, merged = merge_plan(src.keys, values, merge_k, prune_to)
    if counts is not None:  # a store pruned before: its weights add up
        merged = np.bincount(reps, weights=counts, minlength=len(src)).astype(np.int64)
    keep = np.flatnonzero(reps == np.arange(len(src)))
    new_id = np.full(len(src), -1, dtype=np.int64)
    new_id[keep] = np.arange(len(keep))
    succ = old.successors(keep)
    next_ids = np.where(succ >= 0, new_id[reps[np.maximum(succ, 0)]], -1)
    logger.info("pruned %d -> %d entries", len(src), len(keep))
    return keep, merged[keep], next_ids


def _compressed_config(src, factory: str) -> DatastoreConfig:
    """The source's config with the new index type; evaluation and temperature were measured on the source
    store's keys, so they are dropped (``write_store`` calibrates the temperature again)."""
    config = DatastoreConfig.from_dict(src.config.to_dict())
    config.index_factory = factory
    config.evaluation = config.temperature = None
    return config


def _key_rows(src, keep: np.ndarray, pca: faiss.PCAMatrix | None) -> Iterator[np.ndarray]:
    """The kept keys in row chunks (through the PCA when there is one): the store is never read whole."""
    for start in range(0, len(keep), _ROWS):
        rows = src.keys.take(keep[start : start + _ROWS]).astype(np.float32)
        yield rows if pca is None else pca.apply(np.ascontiguousarray(rows))


def _write_entry_files(
    folder: Path,
    src,
    keep: np.ndarray,
    next_ids: np.ndarray | None,
    counts: np.ndarray | None,
    pca: faiss.PCAMatrix | None,
) -> list[str]:
    """Provenance of the kept entries and the transform queries need; returns the names, to be hashed."""
    old = src.provenance
    provenance = Provenance(len(keep), old.entry_positions(keep), next_ids, counts, documents=old.documents)
    extra = provenance.save(folder)
    if pca is not None:
        with atomic_path(folder / TRANSFORM_NAME) as tmp:
            import_faiss().write_VectorTransform(pca, str(tmp))
        extra.append(TRANSFORM_NAME)
    elif src.key_transform is not None:  # pruning a PCA store: queries still need its transform
        extra += copy_extra_files(src.folder, folder, src.config, only=(TRANSFORM_NAME,))
    # A gate is not carried over: it was fitted to the source store's p_kNN.
    return extra


def _compression_record(src, pca_dim: int | None, prune_to: float | None, merge_k: int) -> dict:
    """The config's ``compression``: this step composed with the source's own, relative to the original."""
    before = src.config.compression or {}
    return {
        "source_entries": before.get("source_entries", len(src)),
        "pca_dim": pca_dim or before.get("pca_dim"),
        "prune_to": prune_to if prune_to is not None else before.get("prune_to"),
        "merge_k": merge_k if prune_to is not None else before.get("merge_k"),
    }


def compress_datastore(
    datastore,
    output_dir: str | os.PathLike,
    *,
    pca_dim: int | None = None,
    prune_to: float | None = None,
    merge_k: int = 8,
    index_factory: str | None = None,
    train_size: int = DEFAULT_TRAIN_SIZE,
    overwrite: bool = False,
):
    """Write a smaller copy of ``datastore`` to ``output_dir`` and open it.

    Args:
        pca_dim (`int`, *optional*): keep this many PCA dimensions of the keys (e.g. half).
        prune_to (`float`, *optional*): keep this fraction of the entries by greedy merging.
        merge_k (`int`, defaults to 8): nearest same-value entries searched per entry as merge
            candidates.
        index_factory (`str`, *optional*): faiss index of the new store (default: the source's, its
            PQ code shrunk in proportion to the dimensions, see ``factory_for_dim``).
        train_size (`int`, defaults to 1_000_000): keys sampled to train the PCA and the index.
        overwrite (`bool`, defaults to `False`): replace a finished store in ``output_dir``.

    With neither ``pca_dim`` nor ``prune_to`` the copy is exact (same keys, values and index type).

    Examples:

    ```python
    >>> from hf_knnlm.datastore.testing import tiny_datastore
    >>> from hf_knnlm import compress_datastore
    >>> text = ["The cat sat on the mat. A dog ran to the park and back."] * 4  # 64 entries
    >>> model, tokenizer, store = tiny_datastore("my-store", text, max_length=32, stride=16)
    >>> small = compress_datastore(store, "my-store-pca", pca_dim=16)  # keys projected to half the width
    >>> store.key_dim, small.key_dim, len(small) == len(store)
    (32, 16, True)
    ```
    """
    from .datastore import Datastore

    src, out = datastore, Path(output_dir)
    dim, factory = _plan_compression(src, out, pca_dim, prune_to, index_factory, overwrite)
    values = src.values.to_numpy()
    keep, counts, next_ids = _kept_entries(src, values, prune_to, merge_k)
    pca = train_pca(src.keys, pca_dim, train_size) if pca_dim is not None else None
    config = _compressed_config(src, factory)
    bounds = shard_bounds(len(keep), dim * 2, DEFAULT_MAX_SHARD_SIZE)
    values_kept = [values[keep].astype(np.int32)]
    # Written beside ``out`` and swapped in whole (under its lock): an old store there stays until then.
    with src._writable_folder(out) as folder:
        files = write_store(
            folder, config, _key_rows(src, keep, pca), values_kept, bounds, train_size=train_size, key_dim=dim
        )
        extra = _write_entry_files(folder, src, keep, next_ids, counts, pca)
        config.compression = _compression_record(src, pca_dim, prune_to, merge_k)
        finish_folder(folder, config, [*files, *extra], datastore_card)
    return Datastore.from_pretrained(out, verify=False, nprobe=src.nprobe, gpu=src.gpu)
