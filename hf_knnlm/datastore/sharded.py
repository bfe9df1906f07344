"""A datastore split across the processes of a torch.distributed job: each rank holds and searches 1/N.

``Datastore.from_pretrained(path, distributed="shard")`` under ``accelerate launch`` or ``torchrun``
gives rank ``r`` of ``N`` only the entries ``[start_r, end_r)`` (the contiguous split of
:func:`~hf_knnlm.datastore.distributed.window_range`): the slices of the keys and values shards that
hold them (memory-mapped; shards outside the range are not opened), their merge counts, and a faiss
index over them:

- an exact (``Flat``) store: an exact index built from the rank's keys, as a one-process store
  builds its own from all of them;
- an IVF store (``IVF4096,PQ64``, ``IVF1024,Flat``...): ``index.faiss`` is memory-mapped and the
  rank's entries are copied out of its inverted lists next to the trained quantizer every rank
  shares (``IndexIVF.copy_subset_to``); the mapping of the whole file is dropped afterwards, so a
  rank keeps 1/N of the codes. Probing the same lists of the same quantizer on every rank, the
  merged result holds what a one-process search of the whole index finds.

A store built with ``shard_per_rank=True`` on as many processes gives each rank the entries it wrote and
its own files only (its keys and values shards, its ``index-0000r-of-0000N.faiss`` memory-mapped as it
is); opened on another number of processes it is split as above (:mod:`~hf_knnlm.datastore.rank_index`).

A search is a collective call (every rank calls it, a rank without queries with none):

1. the ranks all-gather a header (query count, k, recompute flag, "done" flag), then the queries;
2. every rank searches every query in its entries, giving the store's entry ids (and the values and
   merge counts of its candidates, which only it holds);
3. an all-to-all returns to each rank the candidates of its own queries from every rank;
4. they are merged by (distance, entry id), the first ``k`` kept: faiss breaks ties by the lower id
   too, so for a ``Flat`` store the result is the one-process search's.

Loops whose length differs between ranks (``generate`` over uneven prompts, a rank with fewer
windows) run inside :meth:`ShardedSearch.serving`: a rank leaving it answers the others' searches
with no queries of its own until every rank has left it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open

from .calibration import calibration_sample, nearest_other_distances, temperature_from_distances
from .clusters import Clusters, list_assignment
from .config import DatastoreConfig
from .distributed import build_state, window_range
from .extras import ENTRIES_NAME
from .index import exact_index, is_exact
from .neighbours import Neighbours
from .rank_index import index_files, open_ivf_range, parts_for, rank_range
from .search_index import SearchIndex, search_keys
from .storage import ShardedArray, open_memmap

if TYPE_CHECKING:
    import faiss

DISTRIBUTED_MODES = ("shard",)
_FIELDS = 4  # distance, entry id, value, log count: packed in float64 (exact for ids < 2**53)
_UNREAD = object()  # ShardedSearch._clusters before a round gathered them


def check_distributed(distributed: object) -> None:
    """Refuse a ``distributed=`` value other than None and the modes there are."""
    if distributed is not None and distributed not in DISTRIBUTED_MODES:
        raise ValueError(
            f"distributed={distributed!r} is not a distributed mode; pass distributed='shard' (each process "
            f"of an accelerate/torchrun job holds and searches 1/N of the entries) or None (one holds all)."
        )


def process_group() -> tuple[int, int]:
    """``(rank, world size)``, starting the process group (gloo on CPU, NCCL on GPUs) as accelerate does."""
    if not (dist.is_available() and dist.is_initialized()):
        state = build_state()  # initialises torch.distributed under accelerate launch / torchrun
        if state.num_processes == 1:
            return 0, 1
    return dist.get_rank(), dist.get_world_size()


def rank_gpu() -> int | None:
    """The GPU of this rank (``cuda:<local rank>``, which accelerate makes current), None without CUDA."""
    return torch.cuda.current_device() if torch.cuda.is_available() else None


@dataclass
class RankShard:
    """The entries ``[start, end)`` of one rank: keys, values, merge counts and an index over them.

    ``first_id`` is the id the index gives to the rank's first entry (0 for an exact index built from
    its keys, ``start`` for the slice of an IVF index).
    """

    start: int
    end: int
    keys: ShardedArray
    values: ShardedArray
    log_counts: torch.Tensor | None
    index: faiss.Index
    first_id: int

    def __len__(self) -> int:
        return self.end - self.start


def _slices(folder: Path, layout: list[dict], part: str, start: int, end: int) -> ShardedArray:
    """Rows ``[start, end)`` of the ``part`` shards, opening only the files that hold them."""
    pieces = []
    for shard in layout:
        lo, hi = max(shard["start"], start), min(shard["end"], end)
        if lo < hi or (not pieces and shard is layout[-1]):  # an empty range keeps the width and dtype
            rows = open_memmap(folder / shard[part], part)
            pieces.append(rows[lo - shard["start"] : max(lo, hi) - shard["start"]])
    return ShardedArray(pieces)


def rank_files(
    config: DatastoreConfig, rank: int | None = None, world: int | None = None
) -> list[str] | None:
    """The files a rank reads of a sharded store: the key and value shards and the index files that hold
    its entries and every other file (merge counts, side files); ``None`` for a single process.

    A rank of a store opened from the Hub downloads and checks only these (``rank``/``world``: this
    process's unless given).
    """
    if rank is None or world is None:
        rank, world = process_group()
    if world == 1:
        return None
    start, end = rank_range(config, rank, world)
    layout = config.shards
    own = [s for s in layout if max(s["start"], start) < min(s["end"], end)] or layout[-1:]
    shard_names = {shard[part] for shard in layout for part in ("keys", "values")}
    own_index = [p["index"] for p in parts_for(config, start, end)]
    return [
        *(shard[part] for shard in own for part in ("keys", "values")),
        *own_index,
        *sorted(set(config.files) - shard_names - set(index_files(config))),
    ]


def _log_counts(folder: Path, config: DatastoreConfig, start: int, end: int) -> torch.Tensor | None:
    if ENTRIES_NAME not in config.files:
        return None
    with safe_open(folder / ENTRIES_NAME, framework="np") as f:
        if "counts" not in f.keys():
            return None
        counts = f.get_slice("counts")[start:end]
    return torch.from_numpy(np.log(counts.astype(np.float32)))


def open_rank_shard(
    folder: Path, config: DatastoreConfig, layout: list[dict], rank: int, world: int, mmap: bool = True
) -> tuple[RankShard, int, int]:
    """``(shard, rank, world)``: the entries of ``rank`` (of ``world``) of the store in ``folder``."""
    start, end = rank_range(config, rank, world)
    keys = _slices(folder, layout, "keys", start, end)
    values = _slices(folder, layout, "values", start, end)
    if is_exact(config.index_factory):  # as a one-process exact store: an index from the keys
        index, first_id = exact_index(keys.iter_rows(65536), int(keys.shape[1])), 0
    else:
        index, first_id = open_ivf_range(folder, config, start, end, mmap), start
    shard = RankShard(start, end, keys, values, _log_counts(folder, config, start, end), index, first_id)
    return shard, rank, world


class ShardedSearch:
    """The collective search over every rank's :class:`RankShard` (see the module docstring).

    Args:
        shard (`RankShard`): this rank's entries.
        searcher (`SearchIndex`): the search of ``shard.index`` (nprobe, GPU clone).
        rank (`int`) / world (`int`): this process and the number of processes.

    Examples:

    ```python
    >>> import torch
    >>> from hf_knnlm.datastore.testing import tiny_datastore
    >>> from hf_knnlm import Datastore
    >>> model, tokenizer, _ = tiny_datastore("my-store")
    >>> store = Datastore.from_pretrained("my-store", distributed="shard")  # under torchrun: 1/N a rank
    >>> shard = store.sharded.shard
    >>> store.sharded.world, (shard.start, shard.end), len(store)  # one process holds every entry
    (1, (0, 6), 6)
    >>> keys = torch.from_numpy(store.keys.take([0, 3]).astype("float32"))
    >>> with store.serving():  # a loop the ranks may leave at different times
    ...     found = store.search(keys, 2)
    >>> found.ids[:, 0].tolist()  # every stored key is its own nearest neighbour
    [0, 3]
    ```
    """

    def __init__(self, shard: RankShard, searcher: SearchIndex, rank: int, world: int) -> None:
        self.shard, self.searcher, self.rank, self.world = shard, searcher, rank, world
        self.device = torch.device("cpu")
        if world > 1 and dist.get_backend() == "nccl":  # NCCL moves CUDA tensors only
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.comm_seconds = 0.0  # time spent in collectives, for bench/distributed.py
        self._clusters: Clusters | None | object = _UNREAD

    # ------------------------------------------------------------- collectives
    def _all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        tensor = tensor.to(self.device).contiguous()
        out = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(out, tensor)
        return [t.cpu() for t in out]

    def all_reduce_sum(self, values: Sequence[float] | torch.Tensor) -> list[float] | torch.Tensor:
        """The sums over ranks of ``values`` (a list of numbers, or a tensor), on every rank (float64)."""
        t = (
            values.double()
            if isinstance(values, torch.Tensor)
            else torch.tensor(list(values), dtype=torch.float64)
        )
        if self.world > 1:
            t = t.to(self.device)
            dist.all_reduce(t)
        return t.cpu() if isinstance(values, torch.Tensor) else t.cpu().tolist()

    def all_gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of ``tensor`` (equal trailing shape and dtype), in rank order."""
        if self.world == 1:
            return tensor
        sizes = [int(s) for s in self._all_gather(torch.tensor([len(tensor)]))]
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[: len(tensor)] = tensor
        return torch.cat([part[:n] for part, n in zip(self._all_gather(padded), sizes, strict=True)])

    def share(self, items: Sequence) -> Sequence:
        """This rank's contiguous share of ``items`` (windows to score, prompts to generate...)."""
        first, last = window_range(len(items), self.rank, self.world)
        return items[first:last]

    # ------------------------------------------------------------- search
    def _local(self, queries: np.ndarray, k: int, recompute: bool) -> torch.Tensor:
        """``[Q, k, 4]`` float64: this rank's ``k`` nearest of every query, with the store's entry ids."""
        out = torch.zeros((len(queries), k, _FIELDS), dtype=torch.float64)
        out[:, :, 0], out[:, :, 1] = math.inf, -1
        kk = min(k, len(self.shard))
        if kk and len(queries):
            d, ids = search_keys(self.searcher, self.shard.keys, queries, kk, recompute, self.shard.first_id)
            found = torch.from_numpy(ids >= 0)
            local = torch.from_numpy(np.where(ids >= 0, ids - self.shard.first_id, 0)).long()
            out[:, :kk, 0] = torch.from_numpy(d).double()
            out[:, :kk, 1] = torch.where(found, local + self.shard.start, -1).double()
            values = torch.from_numpy(self.shard.values.take(local.numpy()).astype(np.int64))
            out[:, :kk, 2] = torch.where(found, values, 0).double()
            if self.shard.log_counts is not None:
                out[:, :kk, 3] = torch.where(found, self.shard.log_counts[local], 0).double()
        return out

    def _exchange(self, counts: list[int], mine: torch.Tensor, answer) -> torch.Tensor:
        """Gather every rank's request rows (``counts``; this rank's ``mine``), answer them all with
        ``answer(rows) -> [R, W, 4]`` and return ``[world, len(mine), W, 4]``: each rank's answers to ours."""
        started = time.perf_counter()
        padded = mine.new_zeros((max(counts), *mine.shape[1:]))
        padded[: len(mine)] = mine
        gathered = torch.cat([p[:n] for p, n in zip(self._all_gather(padded), counts, strict=True)])
        comm = time.perf_counter() - started
        local = answer(gathered)
        started = time.perf_counter()
        send = local.reshape(len(local), -1).to(self.device)
        out = torch.empty((self.world * len(mine), send.shape[1]), dtype=send.dtype, device=self.device)
        dist.all_to_all_single(out, send, [len(mine)] * self.world, counts)
        self.comm_seconds += comm + time.perf_counter() - started
        return out.cpu().view(self.world, len(mine), *local.shape[1:])

    def _round(
        self, queries: np.ndarray, k: int, recompute: bool, done: bool, lookup=None, clusters: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """One collective round: ``(merged [Q, k_max, 4] candidates, looked-up entries or None)``, None once
        every rank is done. Any rank may ask for a search, a lookup (``(queries, ids)``, see ``lookup``)
        or the store's clusters; every rank takes part in whatever any asked for."""
        started = time.perf_counter()
        lookup_ids = np.zeros((0, 0), np.int64) if lookup is None else lookup[1]
        header = [len(queries), k, int(recompute), int(done), *lookup_ids.shape, int(clusters)]
        headers = torch.cat(self._all_gather(torch.tensor([header])))
        self.comm_seconds += time.perf_counter() - started
        if bool(headers[:, 3].all()):
            return None
        if bool(headers[:, 6].any()):
            self._gather_clusters()
        asking = headers[:, 0] > 0
        if asking.any() and len(set(headers[asking, 2].tolist())) > 1:
            raise ValueError(
                "ranks searched with different recompute_dists in one collective search; every rank must "
                "use the same settings."
            )
        counts, pairs = headers[:, 0].tolist(), headers[:, 4].tolist()
        k_max, flag = int(headers[:, 1].max()), bool(headers[asking, 2].any())
        merged = torch.zeros((len(queries), k_max, _FIELDS), dtype=torch.float64)
        if sum(counts):
            mine = torch.from_numpy(queries)
            found = self._exchange(counts, mine, lambda rows: self._local(rows.numpy(), k_max, flag))
            merged = _merge(found, k_max)
        if not sum(pairs):
            return merged, None
        width, dim = int(headers[:, 5].max()), self.shard.keys.shape[1]
        rows = torch.full((len(lookup_ids), dim + width), -1, dtype=torch.float64)
        if lookup is not None:
            rows[:, :dim] = torch.from_numpy(lookup[0]).double()
            rows[:, dim : dim + lookup_ids.shape[1]] = torch.from_numpy(lookup_ids).double()
        answer = self._exchange(pairs, rows, lambda r: self._lookup(r[:, :dim].float().numpy(), r[:, dim:]))
        return merged, _looked_up(answer.sum(0), rows[:, dim:])[:, : lookup_ids.shape[1]]

    def _lookup(self, queries: np.ndarray, ids: torch.Tensor) -> torch.Tensor:
        """``[R, W, 4]``: exact distance (as RetoMaton's own), value and log count of the entries ``ids``
        that this rank holds; zeros for the others' (the sum over ranks has every entry once)."""
        ids = ids.long().numpy()
        out = torch.zeros((*ids.shape, _FIELDS), dtype=torch.float64)
        rows, cols = np.nonzero((ids >= self.shard.start) & (ids < self.shard.end))
        if len(rows):
            local = ids[rows, cols] - self.shard.start
            keys = self.shard.keys.take(local).astype(np.float32)
            keys -= queries[rows]
            out[rows, cols, 0] = torch.from_numpy(np.einsum("ij,ij->i", keys, keys)).double()
            out[rows, cols, 2] = torch.from_numpy(self.shard.values.take(local).astype(np.int64)).double()
            if self.shard.log_counts is not None:
                out[rows, cols, 3] = self.shard.log_counts[torch.from_numpy(local)].double()
        return out

    def _neighbours(self, packed: torch.Tensor) -> Neighbours:
        return Neighbours(
            packed[:, :, 0].float(),
            packed[:, :, 1].long(),
            packed[:, :, 2].long(),
            packed[:, :, 3].float() if self.shard.log_counts is not None else None,
        )

    def search(self, queries: np.ndarray, k: int, recompute_dists: bool = False) -> Neighbours:
        """The ``k`` nearest entries of the whole store for this rank's float32 ``queries`` (collective)."""
        return self.search_and_look_up(queries, k, recompute_dists)[0]

    def search_and_look_up(
        self, queries: np.ndarray, k: int, recompute_dists: bool = False, lookup=None
    ) -> tuple[Neighbours, Neighbours | None]:
        """``search`` and, in the same collective round, the entries ``lookup = (queries [P, d], ids [P, W])``
        wherever they are stored: ``[P, W]`` exact distances to ``queries[p]`` (as RetoMaton computes
        them), values and merge counts; an id of -1 gives distance ``inf``."""
        if self.world == 1:
            packed, looked = self._local(queries, k, recompute_dists), None
            if lookup is not None:
                ids = torch.from_numpy(lookup[1])
                looked = _looked_up(self._lookup(lookup[0], ids), ids)
        else:
            packed, looked = self._round(queries, k, recompute_dists, done=False, lookup=lookup)
        return self._neighbours(packed[:, :k]), None if looked is None else self._neighbours(looked)

    def serve_until_done(self) -> None:
        """Answer the other ranks' searches (with no queries) until every rank has called this."""
        empty = np.zeros((0, self.shard.keys.shape[1]), dtype=np.float32)
        while self.world > 1 and self._round(empty, 0, False, done=True) is not None:
            pass

    def _gather_clusters(self) -> None:
        """Every rank's IVF list of each of its entries, all-gathered (a round did it for every rank)."""
        own = list_assignment(self.shard.index, self.shard.start, self.shard.end)
        every = self.all_gather_rows(torch.from_numpy(own)).numpy()
        nlist = getattr(self.shard.index, "nlist", 0)
        self._clusters = Clusters(every, nlist) if nlist and (every >= 0).all() else None

    def clusters(self) -> Clusters | None:
        """The IVF lists of the whole store as clusters (RetoMaton), None without lists; the first call is
        collective (a round: ranks serving or searching meanwhile take part)."""
        if self._clusters is _UNREAD:
            if self.world == 1:
                self._gather_clusters()
            else:
                self._round(
                    np.zeros((0, self.shard.keys.shape[1]), np.float32), 0, False, False, clusters=True
                )
        return self._clusters

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Run a loop whose number of searches may differ between ranks; leaving it serves the others."""
        try:
            yield
        finally:
            self.serve_until_done()

    def calibrate_temperature(self) -> float | None:
        """The store's default temperature (see :mod:`~hf_knnlm.datastore.calibration`), over all ranks."""
        num_entries = self.all_reduce_sum([len(self.shard)])[0]
        ids = calibration_sample(int(num_entries))
        if len(ids) < 2:
            return None
        mine = (ids >= self.shard.start) & (ids < self.shard.end)
        keys = torch.zeros((len(ids), self.shard.keys.shape[1]), dtype=torch.float64)
        own = self.shard.keys.take(ids[mine] - self.shard.start)
        keys[torch.from_numpy(mine)] = torch.from_numpy(own.astype(np.float64))
        sample = np.ascontiguousarray(self.all_reduce_sum(keys).numpy(), dtype=np.float32)

        def search(q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            found = self.search(q, k)
            return found.distances.numpy(), found.ids.numpy()

        return temperature_from_distances(nearest_other_distances(search, sample, ids))


def _looked_up(rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Looked-up rows with their entry ids, a missing one (-1) at distance ``inf``."""
    rows[:, :, 1] = ids
    rows[:, :, 0] = torch.where(ids < 0, math.inf, rows[:, :, 0])
    return rows


def _merge(received: torch.Tensor, k: int) -> torch.Tensor:
    """``[world, Q, k, 4]`` candidates -> ``[Q, k, 4]``: the ``k`` smallest by (distance, entry id)."""
    world, queries, k_each = received.shape[:3]
    rows = received.permute(1, 0, 2, 3).reshape(queries, world * k_each, _FIELDS)
    ids = rows[:, :, 1]
    by_id = torch.argsort(torch.where(ids < 0, math.inf, ids), dim=1, stable=True)
    rows = torch.take_along_dim(rows, by_id[:, :, None], dim=1)
    by_distance = torch.argsort(rows[:, :, 0], dim=1, stable=True)
    return torch.take_along_dim(rows, by_distance[:, :, None], dim=1)[:, :k]


__all__ = [
    "DISTRIBUTED_MODES",
    "RankShard",
    "ShardedSearch",
    "check_distributed",
    "open_rank_shard",
    "process_group",
    "rank_gpu",
]
