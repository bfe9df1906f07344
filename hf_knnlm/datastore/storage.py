"""Keys and values on disk: safetensors files written in a stream and read memory-mapped.

A store can hold more keys than fit in RAM, so shards are written chunk by chunk (the safetensors
layout is an 8-byte header length, a JSON header and raw little-endian data) and read back with
``numpy.memmap``; ``safetensors`` itself validates every header on open.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ..utils.files import temporary_path

_DTYPES = {"float16": ("F16", np.float16), "float32": ("F32", np.float32), "int32": ("I32", np.int32)}
_NP_TO_ST = {np.dtype(v[1]): v[0] for v in _DTYPES.values()}
_ST_TO_NP = {v[0]: np.dtype(v[1]) for v in _DTYPES.values()}

_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> 5_000_000_000, as transformers' ``max_shard_size``."""
    if isinstance(size, bool) or not isinstance(size, (int, str)) or (isinstance(size, int) and size <= 0):
        raise ValueError(
            f"max_shard_size={size!r} is not a size: pass a positive number of bytes or a string like '5GB'."
        )
    if isinstance(size, int):
        return size
    if size.strip().isdigit() and int(size) > 0:
        return int(size)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B)\s*", size.upper())
    if match is None:
        raise ValueError(f"max_shard_size={size!r} is not a size such as '5GB', '500MB' or an int of bytes.")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


class StreamingSafetensorsWriter:
    """Writes one 1-D or 2-D tensor named ``name`` to a safetensors file, rows appended in chunks.

    The total row count must be known up front (it is in the header); the file appears under its
    final name only after ``close`` checked that every row was written.
    """

    def __init__(self, path: str | os.PathLike, name: str, dtype: np.dtype, shape: tuple[int, ...]):
        self.path = Path(path)
        self.tmp = temporary_path(self.path)
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        self.rows_left = self.shape[0]
        nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        header = {
            name: {"dtype": _NP_TO_ST[self.dtype], "shape": list(self.shape), "data_offsets": [0, nbytes]}
        }
        header["__metadata__"] = {"format": "np"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(self.tmp, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:] or len(rows) > self.rows_left:
            raise ValueError(f"rows of shape {rows.shape} do not fit {self.path.name} {self.shape}.")
        self._file.write(rows.astype(rows.dtype.newbyteorder("<"), copy=False).tobytes())
        self.rows_left -= len(rows)

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if self.rows_left:
            self.tmp.unlink()
            raise RuntimeError(f"{self.path.name}: {self.rows_left} rows were never written.")
        os.replace(self.tmp, self.path)

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()
            self.tmp.unlink(missing_ok=True)


def open_memmap(path: str | os.PathLike, name: str) -> np.memmap:
    """Memory-map tensor ``name`` of a safetensors file (read-only, no copy)."""
    path = Path(path)
    with safe_open(path, framework="np") as f:  # validates the header against the file size
        if name not in f.keys():
            raise ValueError(f"{path.name} has no tensor {name!r}; the file is not part of a datastore.")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    info = header[name]
    start, end = info["data_offsets"]
    dtype = _ST_TO_NP[info["dtype"]]
    shape = tuple(info["shape"])
    if end - start != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{path.name}: tensor {name!r} header is inconsistent; the file is corrupted.")
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(
        path, dtype=dtype.newbyteorder("<"), mode="r", offset=8 + header_len + start, shape=shape
    )


def shard_names(prefix: str, count: int) -> list[str]:
    """``keys.safetensors`` for one shard, ``keys-00001-of-00003.safetensors`` for several."""
    if count == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def shard_bounds(num_rows: int, row_bytes: int, max_shard_size: int | str) -> list[tuple[int, int]]:
    """Split ``num_rows`` rows into contiguous ranges of at most ``max_shard_size`` bytes each."""
    per_shard = max(1, parse_size(max_shard_size) // max(row_bytes, 1))
    bounds = [(s, min(s + per_shard, num_rows)) for s in range(0, num_rows, per_shard)]
    return bounds or [(0, 0)]


def write_sharded(
    folder: Path,
    prefix: str,
    name: str,
    dtype: np.dtype,
    row_shape: tuple[int, ...],
    bounds: list[tuple[int, int]],
    chunks: Iterable[np.ndarray],
    names: list[str] | None = None,
) -> list[str]:
    """Stream ``chunks`` (rows in order) into shard files with the given row ranges (and ``names``, by
    default ``shard_names(prefix, len(bounds))``)."""
    names = names or shard_names(prefix, len(bounds))
    rows = _RowStream(chunks)
    for file_name, (start, end) in zip(names, bounds, strict=True):
        with StreamingSafetensorsWriter(folder / file_name, name, dtype, (end - start, *row_shape)) as writer:
            need = end - start
            while need:
                block = rows.take(need)
                writer.write(block)
                need -= len(block)
    return names


class _RowStream:
    """Hands out rows from an iterable of chunks, at most ``n`` at a time."""

    def __init__(self, chunks: Iterable[np.ndarray]):
        self._chunks = iter(chunks)
        self._pending: np.ndarray | None = None

    def take(self, n: int) -> np.ndarray:
        while self._pending is None or not len(self._pending):
            self._pending = next(self._chunks, None)
            if self._pending is None:
                raise RuntimeError("ran out of rows while writing shards")
        block, self._pending = self._pending[:n], self._pending[n:]
        return block


class ShardedArray:
    """Row-gather over a list of memory-mapped shards, as if they were one (read-only) array."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = shards
        self.offsets = np.cumsum([0] + [len(s) for s in shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.shards[0].shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.shards[0].dtype

    def take(self, indices: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``indices`` (any shape), into ``out`` (contiguous, ``[len(indices), ...]``) when given."""
        indices = np.asarray(indices, dtype=np.int64)
        flat = indices.reshape(-1)
        if out is not None and len(self.shards) == 1:  # no temporary: straight from the memmap
            return np.take(self.shards[0], flat, axis=0, out=out)
        if out is None:
            out = np.empty((len(flat), *self.shards[0].shape[1:]), dtype=self.shards[0].dtype)
        shard_of = np.searchsorted(self.offsets, flat, side="right") - 1
        for s in np.unique(shard_of):
            mask = shard_of == s
            out[mask] = self.shards[s][flat[mask] - self.offsets[s]]
        return out.reshape(*indices.shape, *out.shape[1:])

    def __getitem__(self, index: int | slice | np.ndarray) -> np.ndarray:
        """Rows as numpy, like indexing an array: an int, a slice or an integer array (or tensor)."""
        if isinstance(index, slice):
            return self.take(np.arange(*index.indices(len(self))))
        rows = np.asarray(index)
        if rows.ndim == 0:
            row = int(rows)
            return self.take(np.asarray([row + len(self) if row < 0 else row]))[0]
        return self.take(rows)

    def iter_rows(self, chunk_rows: int) -> Iterator[np.ndarray]:
        for shard in self.shards:
            for start in range(0, len(shard), chunk_rows):
                yield np.asarray(shard[start : start + chunk_rows])

    def to_numpy(self) -> np.ndarray:
        return (
            np.concatenate([np.asarray(s) for s in self.shards])
            if len(self.shards) > 1
            else np.asarray(self.shards[0])
        )


_RECOMPUTE_ROWS = 1 << 16  # keys gathered per block: bounds the float32 copy to ~150 MB at d=576


def exact_sq_distances(keys: ShardedArray, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Squared L2 distances from each query ``[Q, d]`` to its stored fp16 keys ``ids`` ``[Q, k]``.

    Keys are gathered from the memory-mapped shards a block of queries at a time, so RAM stays
    bounded whatever ``Q * k``; the arithmetic is torch's (multithreaded) in float32.
    """
    out = np.empty(ids.shape, dtype=np.float32)
    step = max(1, _RECOMPUTE_ROWS // max(ids.shape[1], 1))
    for start in range(0, len(queries), step):
        block = torch.from_numpy(keys.take(ids[start : start + step])).float()  # [b, k, d]
        q = torch.from_numpy(queries[start : start + step]).unsqueeze(1)
        out[start : start + step] = (block - q).square_().sum(-1).numpy()
    return out
