"""faiss specifics: index-factory strings, training on a sample, chunked adds, safe file IO."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import faiss
import numpy as np

from .hub import temporary_path

logger = logging.getLogger(__name__)

INDEX_NAME = "index.faiss"
DEFAULT_NPROBE = 32


def new_index(factory: str, dim: int, metric: int = faiss.METRIC_L2) -> faiss.Index:
    try:
        return faiss.index_factory(dim, factory, metric)
    except RuntimeError as err:
        raise ValueError(
            f"index_factory={factory!r} is not a valid faiss index-factory string for dimension {dim} "
            f"(e.g. 'Flat', 'IVF4096,PQ64', 'IVF1024,Flat'): {err}"
        ) from err


def train_sample(keys, num_rows: int, sample_size: int, seed: int = 0) -> np.ndarray:
    """A uniform sample of rows (sorted, so memory-mapped reads stay sequential) as float32."""
    rng = np.random.default_rng(seed)
    if num_rows <= sample_size:
        rows = np.arange(num_rows)
    else:
        rows = np.sort(rng.choice(num_rows, size=sample_size, replace=False))
    return np.ascontiguousarray(keys.take(rows), dtype=np.float32)


def build_index(
    factory: str,
    dim: int,
    keys,
    chunks: Iterable[np.ndarray],
    *,
    train_size: int = 1_000_000,
    seed: int = 0,
    metric: int = faiss.METRIC_L2,
) -> faiss.Index:
    """Create, train (on a sample of ``keys``) and fill an index from float16/float32 row chunks."""
    index = new_index(factory, dim, metric)
    if not index.is_trained:
        sample = train_sample(keys, len(keys), train_size, seed)
        if len(sample) < 1:
            raise ValueError("cannot train a faiss index on an empty datastore.")
        index.train(sample)
    for chunk in chunks:
        index.add(np.ascontiguousarray(chunk, dtype=np.float32))
    return index


def write_index(index: faiss.Index, path: str | os.PathLike) -> None:
    tmp = temporary_path(path)
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


# IVF indexes with plain array inverted lists (fourcc at the start of the file): IO_FLAG_MMAP maps
# their lists, codes and ids alike. Every other type (Flat, PQ, HNSW, fast-scan IVF) keeps its codes
# in a flat-codes storage that only IO_FLAG_MMAP_IFC maps (IO_FLAG_MMAP would read it into RAM).
_IVF_ARRAY_FOURCCS = (b"IwFl", b"IwPQ", b"IwSq")


def _mmap_flag(path: Path) -> int:
    with open(path, "rb") as f:
        fourcc = f.read(4)
    if fourcc in _IVF_ARRAY_FOURCCS or not hasattr(faiss, "IO_FLAG_MMAP_IFC"):
        return faiss.IO_FLAG_MMAP
    return faiss.IO_FLAG_MMAP_IFC


def read_index(path: str | os.PathLike, mmap: bool = True) -> faiss.Index:
    """Open an index, memory-mapped when its type allows it (IVF lists, flat codes)."""
    path = Path(path)
    if mmap:
        try:
            return faiss.read_index(str(path), _mmap_flag(path) | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:
            logger.debug("index type of %s cannot be memory-mapped; reading it into RAM", path)
    return faiss.read_index(str(path))


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = nprobe
