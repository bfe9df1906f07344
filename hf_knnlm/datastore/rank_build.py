"""A build that leaves each process's entries where that process wrote them: ``shard_per_rank=True``.

Under ``accelerate launch --num_processes N hf-knnlm build --shard-per-rank`` every process embeds its
contiguous range of windows as a default build does (resumable in ``.partial/rank-NNNNN/``); then,
instead of the main process reading every key to write the store:

1. the main process trains the index once (an IVF store: its quantizer and codes) on the
   ``train_sample`` of all keys, reading those sample rows out of the ranks' chunks and no other, and
   writes the empty trained index to ``.partial/quantizer-*.faiss``, which every process reads;
2. every process writes, into ``.partial/store/``, its own key and value shards and, for an IVF store,
   ``index-0000r-of-0000N.faiss`` (the shared trained index with its own entries added under their
   store ids), and hashes them; ``rank-NNNNN.json`` records the hashes last, so a process killed
   after it does not write its files again;
3. the processes calibrate the default temperature together, with the sharded search of
   :class:`~hf_knnlm.datastore.sharded.ShardedSearch` over the files just written;
4. the main process hard-links the files into the finished folder, writes the provenance (from the
   tokens), the shard index jsons and the config with ``rank_shards``, and swaps the folder in whole.

The keys and values are the default build's, in the same order, and the index is trained on the same
sample: the store opens in one process with the default build's search results (the IVF lists hold
the same entries in the same order, see :mod:`~hf_knnlm.datastore.rank_index`), and with
``distributed="shard"`` on N processes each reads its own files only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..utils.checks import check_flag
from ..utils.faiss_support import import_faiss
from ..utils.files import atomic_folder, atomic_write_json, file_hashes, link_or_copy
from ..utils.hub_mixin import finish_folder
from .card import datastore_card
from .config import DatastoreConfig
from .index import DEFAULT_NPROBE, exact_index, is_exact, new_index, read_index, trained_index, write_index
from .progress import Progress, check_ranks_done, merged_arrays
from .rank_index import rank_index_names
from .search_index import SearchIndex
from .sharded import RankShard, ShardedSearch
from .shards import KEYS_PREFIX, VALUES_PREFIX, write_shard_index
from .storage import ShardedArray, open_memmap, shard_bounds, shard_names, write_sharded

STAGE_DIR = "store"  # under .partial: the files every process writes, before the swap
_ADD_ROWS = 65536


def check_shard_per_rank(shard_per_rank: object, index_factory: str, dim: int) -> None:
    """Refuse a non-bool switch, or an index that cannot be split into lists over one quantizer."""
    check_flag("shard_per_rank", shard_per_rank)
    if not shard_per_rank or is_exact(index_factory):
        return
    if not isinstance(new_index(index_factory, dim), import_faiss().IndexIVF):
        raise ValueError(
            f"shard_per_rank=True writes one index file per process over a shared IVF quantizer; "
            f"index_factory={index_factory!r} is not an IVF index. Use 'Flat' or e.g. 'IVF4096,PQ64', "
            f"or build without shard_per_rank."
        )


def _tag(*parts: object) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


class RankLayout:
    """Which entries and files are whose, from every process's progress (read after the barrier)."""

    def __init__(self, progresses: list[Progress], max_shard_size, key_dim: int) -> None:
        counts = [sum(c["rows"] for c in p.state["chunks"]) for p in progresses]
        ends = np.cumsum(counts).tolist()
        self.ranges = [(int(e - c), int(e)) for c, e in zip(counts, ends, strict=True)]
        self.bounds = [
            [(s + a, s + b) for a, b in shard_bounds(e - s, key_dim * 2, max_shard_size)]
            for s, e in self.ranges
        ]
        total = sum(len(b) for b in self.bounds)
        first = np.cumsum([0] + [len(b) for b in self.bounds]).tolist()
        self.names = {
            part: [shard_names(part, total)[first[r] : first[r + 1]] for r in range(len(counts))]
            for part in (KEYS_PREFIX, VALUES_PREFIX)
        }
        self.index_names = rank_index_names(len(counts))

    def shards(self) -> list[dict]:
        """``config.shards``: every process's key and value shards, in entry order."""
        return [
            {"keys": k, "values": v, "start": s, "end": e}
            for r in range(len(self.ranges))
            for k, v, (s, e) in zip(
                self.names[KEYS_PREFIX][r], self.names[VALUES_PREFIX][r], self.bounds[r], strict=True
            )
        ]


def shared_index(partial: Path, progresses, state, config: DatastoreConfig, key_dim: int, train_size: int):
    """The trained, empty index every process adds its entries to (trained once by the main process)."""
    if is_exact(config.index_factory):
        return None
    path = partial / f"quantizer-{_tag(progresses[0].fingerprint, config.index_factory, train_size)}.faiss"
    if state.is_main_process and not path.is_file():  # a resumed build trained it already
        keys, _ = merged_arrays(progresses)  # memory-mapped: only the sampled rows are read
        write_index(trained_index(config.index_factory, key_dim, keys, train_size=train_size), path)
    state.wait_for_everyone()
    return path


def write_rank_files(stage: Path, progress: Progress, rank: int, layout: RankLayout, quantizer, key_dim: int):
    """This process's shards and index file in ``stage``, with their hashes (once: a rerun reuses them)."""
    record = stage / f"rank-{rank:05d}.json"
    tag = _tag(progress.fingerprint, quantizer, layout.ranges, layout.bounds)
    if record.is_file():
        done = json.loads(record.read_text(encoding="utf-8"))
        if done.get("tag") == tag and all((stage / n).is_file() for n in done["files"]):
            return done["files"]
    keys, values = progress.arrays() if progress.state["chunks"] else (ShardedArray([]), ShardedArray([]))
    bounds, names = (
        layout.bounds[rank],
        [*layout.names[KEYS_PREFIX][rank], *layout.names[VALUES_PREFIX][rank]],
    )
    rows = keys.iter_rows(_ADD_ROWS) if keys.shards else iter(())
    write_sharded(
        stage, KEYS_PREFIX, "keys", np.float16, (key_dim,), bounds, rows, layout.names[KEYS_PREFIX][rank]
    )
    rows = values.iter_rows(1 << 20) if values.shards else iter(())
    write_sharded(
        stage, VALUES_PREFIX, "values", np.int32, (), bounds, rows, layout.names[VALUES_PREFIX][rank]
    )
    if quantizer is not None:
        index, start = read_index(quantizer, mmap=False), layout.ranges[rank][0]
        for chunk in keys.iter_rows(_ADD_ROWS) if keys.shards else ():
            index.add_with_ids(
                np.ascontiguousarray(chunk, dtype=np.float32), np.arange(start, start + len(chunk))
            )
            start += len(chunk)
        write_index(index, stage / layout.index_names[rank])
        names.append(layout.index_names[rank])
    hashes = file_hashes(stage, names)
    atomic_write_json(record, {"tag": tag, "files": hashes})
    return hashes


def rank_temperature(stage: Path, layout: RankLayout, rank: int, world: int, exact: bool) -> float | None:
    """The store's default temperature, calibrated by every process together over the files written."""
    start, end = layout.ranges[rank]
    keys = ShardedArray([open_memmap(stage / n, "keys") for n in layout.names[KEYS_PREFIX][rank]])
    values = ShardedArray([open_memmap(stage / n, "values") for n in layout.names[VALUES_PREFIX][rank]])
    if exact:
        index, first_id = exact_index(keys.iter_rows(_ADD_ROWS), int(keys.shape[1])), 0
    else:
        index, first_id = read_index(stage / layout.index_names[rank]), start
    shard = RankShard(start, end, keys, values, None, index, first_id)
    searcher = SearchIndex(index, nprobe=DEFAULT_NPROBE, gpu="none")
    return ShardedSearch(shard, searcher, rank, world).calibrate_temperature()


def finish_per_rank(
    partial: Path,
    progresses: list[Progress],
    state,
    config: DatastoreConfig,
    *,
    num_windows: int,
    max_shard_size,
    train_size: int,
    keep: Callable[[str], bool],
    write_extras: Callable[[Path], list[str]],
) -> None:
    """Steps 1-4 of the module docstring, in every process (collective: every process calls it)."""
    check_ranks_done(progresses, num_windows, state.num_processes)  # every process reads every progress
    written = [p for p in progresses if p.state["chunks"]]
    key_dim = int(written[0].arrays()[0].shape[1]) if written else config.hidden_size
    layout = RankLayout(progresses, max_shard_size, key_dim)
    stage = partial / STAGE_DIR
    stage.mkdir(parents=True, exist_ok=True)
    quantizer = shared_index(partial, progresses, state, config, key_dim, train_size)
    rank = state.process_index
    write_rank_files(stage, progresses[rank], rank, layout, quantizer, key_dim)
    state.wait_for_everyone()
    exact = is_exact(config.index_factory)
    temperature = rank_temperature(stage, layout, rank, state.num_processes, exact)
    if state.is_main_process:
        records = [stage / f"rank-{r:05d}.json" for r in range(state.num_processes)]
        hashes = {
            n: h for r in records for n, h in json.loads(r.read_text(encoding="utf-8"))["files"].items()
        }
        config.hidden_size, config.temperature = key_dim, temperature
        config.num_entries, config.shards = layout.ranges[-1][1], layout.shards()
        config.rank_shards = [
            {"start": s, "end": e, "index": None if exact else name}
            for (s, e), name in zip(layout.ranges, layout.index_names, strict=True)
        ]
        with atomic_folder(partial.parent, keep=keep) as folder:
            for name in hashes:  # same file system: links, not copies
                link_or_copy(stage / name, folder / name)
            bounds = [(s["start"], s["end"]) for s in config.shards]
            files = write_extras(folder)
            files += write_shard_index(
                folder, KEYS_PREFIX, "keys", [s["keys"] for s in config.shards], bounds, key_dim * 2
            )
            files += write_shard_index(
                folder, VALUES_PREFIX, "values", [s["values"] for s in config.shards], bounds, 4
            )
            finish_folder(folder, config, files, datastore_card, hashes=hashes)


__all__ = ["check_shard_per_rank", "finish_per_rank"]
