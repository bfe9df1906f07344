"""Which index files hold which entries: ``index.faiss``, or one file per process of a per-rank build.

A store built with ``shard_per_rank=True`` (see :mod:`~hf_knnlm.datastore.rank_build`) records in
``config.rank_shards`` the entries ``[start, end)`` each of its N build processes wrote and, for an IVF
store, that process's ``index-0000r-of-0000N.faiss``: the one trained quantizer they share and the
inverted lists of its own entries, under the store's entry ids. Every other store has a single
``index.faiss`` over all entries (none for an exact store, whose index is rebuilt from its keys).

Opening a range of entries takes the file that holds exactly that range as it is (memory-mapped), or
copies the range out of the inverted lists of the files that overlap it next to the shared quantizer
(``IndexIVF.copy_subset_to``). The copy appends each file's entries to every list in file order, which
is entry order: the lists are those a single-file build of the same keys and quantizer writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..utils.faiss_support import import_faiss
from .config import DatastoreConfig
from .distributed import window_range
from .index import INDEX_NAME, is_exact, read_index

if TYPE_CHECKING:
    import faiss

RANK_INDEX_PATTERN = "index-*-of-*.faiss"


def rank_index_names(world: int) -> list[str]:
    """``index-00001-of-00002.faiss``, ...: the index file of each of ``world`` build processes."""
    return [f"index-{r:05d}-of-{world:05d}.faiss" for r in range(1, world + 1)]


def index_parts(config: DatastoreConfig) -> list[dict]:
    """``[{"start", "end", "index"}]``: the index files of a store and the entries each holds."""
    if config.rank_shards:
        return [p for p in config.rank_shards if p["index"] is not None]
    if INDEX_NAME in config.files or not is_exact(config.index_factory):
        return [{"start": 0, "end": config.num_entries, "index": INDEX_NAME}]
    return []


def index_files(config: DatastoreConfig) -> list[str]:
    """The index files of a store (none for an exact one)."""
    return [p["index"] for p in index_parts(config)]


def rank_range(config: DatastoreConfig, rank: int, world: int) -> tuple[int, int]:
    """The entries ``[start, end)`` of ``rank`` of ``world``: those it wrote, if the store was built with
    as many processes; else the contiguous split of ``window_range``."""
    parts = config.rank_shards
    if parts and len(parts) == world:
        return parts[rank]["start"], parts[rank]["end"]
    return window_range(config.num_entries, rank, world)


def parts_for(config: DatastoreConfig, start: int, end: int) -> list[dict]:
    """The index parts holding entries of ``[start, end)`` (an empty range: the last, for its quantizer)."""
    parts = index_parts(config)
    return [p for p in parts if max(p["start"], start) < min(p["end"], end)] or parts[-1:]


def _check_ivf(index: faiss.Index, path: Path) -> None:
    if not isinstance(index, import_faiss().IndexIVF):
        raise ValueError(
            f"distributed='shard' slices exact (Flat) and IVF indexes; {path} is a {type(index).__name__}. "
            f"Rebuild the store with Datastore.rebuild_index('IVF4096,PQ64', ...) or 'Flat'."
        )


def open_ivf_range(folder: Path, config: DatastoreConfig, start: int, end: int, mmap: bool) -> faiss.Index:
    """An IVF index over the entries ``[start, end)`` (store ids), read from the files that hold them."""
    faiss = import_faiss("opening a datastore shard")
    parts = parts_for(config, start, end)
    if len(parts) == 1 and (parts[0]["start"], parts[0]["end"]) == (start, end):
        return read_index(folder / parts[0]["index"], mmap=mmap)  # the file is the range: no copy
    part = read_index(folder / parts[0]["index"], mmap=mmap)
    _check_ivf(part, folder / parts[0]["index"])
    lists = faiss.ArrayInvertedLists(part.nlist, part.code_size)
    part.replace_invlists(lists, True)
    lists.this.disown()  # the index frees its lists
    part.ntotal = 0
    subset = getattr(faiss.InvertedLists, "SUBSET_TYPE_ID_RANGE", 0)
    for source in parts:
        full = read_index(folder / source["index"], mmap=mmap)  # the concrete type, owning its lists
        _check_ivf(full, folder / source["index"])
        full.copy_subset_to(part, subset, start, end)
        del full  # unmaps the file: the range is all that is kept
    return part


def open_index(folder: Path, config: DatastoreConfig, mmap: bool) -> faiss.Index | None:
    """The index of the whole store, or None for an exact store (built from its keys instead)."""
    parts = index_parts(config)
    if not parts:
        return None
    if len(parts) == 1:
        return read_index(folder / parts[0]["index"], mmap=mmap)  # any index type
    return open_ivf_range(folder, config, 0, config.num_entries, mmap)


__all__ = [
    "RANK_INDEX_PATTERN",
    "index_files",
    "index_parts",
    "open_index",
    "open_ivf_range",
    "rank_index_names",
    "rank_range",
]
