"""Datastore: (key, next-token) pairs of a causal LM with a faiss index over the keys."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..lm.corpus import CorpusLike
from ..utils.checks import check_positive_int
from ..utils.faiss_support import import_faiss
from ..utils.hub_mixin import HubMixin
from .builder import DATA_PATTERNS, SHARD_PATTERNS, build_datastore, rebuild_store, write_store
from .calibration import calibrate_temperature
from .card import datastore_card
from .clusters import Clusters
from .compat import check_compatible
from .config import DatastoreConfig
from .extras import CLUSTERS_NAME, copy_extra_files, read_key_transform
from .index import (
    DEFAULT_INDEX_FACTORY,
    DEFAULT_NPROBE,
    DEFAULT_TRAIN_SIZE,
    configure_threads,
    exact_index,
    has_mapped_lists,
)
from .kmeans_clusters import clusters_of
from .neighbours import Neighbours
from .provenance import Provenance
from .rank_index import index_files, open_index
from .search_index import SearchIndex, prepare_queries, search_keys
from .sharded import ShardedSearch, check_distributed, open_rank_shard, process_group, rank_files, rank_gpu
from .shards import DEFAULT_MAX_SHARD_SIZE, shard_layout
from .storage import ShardedArray, open_memmap, shard_bounds

if TYPE_CHECKING:
    import faiss

logger = logging.getLogger(__name__)


class Datastore(HubMixin):
    """A kNN-LM datastore: keys (FFN inputs), values (next token ids) and a faiss index.

    Build one with [`build`][hf_knnlm.Datastore.build], open a saved one (a folder or a Hub repo id) with
    [`from_pretrained`][hf_knnlm.Datastore.from_pretrained], query it with
    [`search`][hf_knnlm.Datastore.search].

    Examples:

    ```python
    >>> import torch
    >>> from hf_knnlm.lm.testing import tiny_causal_lm
    >>> from hf_knnlm import Datastore
    >>> model, tokenizer = tiny_causal_lm()  # any causal LM and its tokenizer: a random 2-layer GPT-2 here
    >>> store = Datastore.build(model, tokenizer, ["The cat sat on the mat."], "my-datastore",
    ...                         max_length=16, stride=8, disable_progress=True)
    >>> len(store), store.hidden_size  # one entry per token after the first
    (6, 32)
    >>> neighbours = store.search(torch.randn(2, store.hidden_size), k=4)
    >>> neighbours.distances.shape, neighbours.token_ids.dtype  # the 4 nearest keys of 2 queries
    (torch.Size([2, 4]), torch.int64)
    >>> Datastore.from_pretrained("my-datastore").config.num_entries  # a folder or a Hub repo id
    6
    ```
    """

    config_class = DatastoreConfig
    # The files a Hub download fetches (into one snapshot folder: faiss side files must sit together).
    hub_patterns = DATA_PATTERNS
    # Remote files a push replaces: stale shards of an earlier push with another shard count go.
    delete_patterns = SHARD_PATTERNS
    default_commit_message = "Upload kNN-LM datastore"

    def __init__(
        self,
        folder: Path,
        config: DatastoreConfig,
        *,
        mmap: bool = True,
        nprobe: int = DEFAULT_NPROBE,
        gpu: str | bool = "auto",
        distributed: str | None = None,
    ):
        import_faiss("Opening a kNN-LM datastore")  # one clear line, before any file is read
        check_distributed(distributed)
        self.folder = Path(folder)
        configure_threads()  # faiss gets torch's thread count; see index.configure_threads
        self.config = config
        layout = shard_layout(self.folder, config)
        if distributed == "shard":  # this rank's entries only (see hf_knnlm.datastore.sharded)
            shard, rank, world = open_rank_shard(self.folder, config, layout, *process_group(), mmap=mmap)
            self.keys, self.values, index = shard.keys, shard.values, shard.index
        else:
            self.keys = ShardedArray([open_memmap(self.folder / s["keys"], "keys") for s in layout])
            # Token ids stay memory-mapped (int32 on disk); search gathers the few it needs.
            self.values = ShardedArray([open_memmap(self.folder / s["values"], "values") for s in layout])
            index = open_index(self.folder, config, mmap)  # index.faiss, or one file per build rank
            if index is None:  # exact search keeps no second copy of the keys on disk: rebuild it from them
                index = exact_index(self.keys.iter_rows(65536), self.key_dim)
        self.key_transform = read_key_transform(self.folder, config)
        self._provenance = None
        self._clusters, self._clusters_of = None, None  # the clusters, and the (index, file) they are of
        if index.ntotal != len(self.keys) or len(self.keys) != len(self.values):
            raise ValueError(
                f"{self.folder}: index has {index.ntotal} entries, keys {len(self.keys)}, values "
                f"{len(self.values)}; config says {config.num_entries}. The store is incomplete; rebuild it."
            )
        self._warned_k: set[int] = set()
        self._temperature: float | None = None
        device = rank_gpu() if distributed and world > 1 else None  # a rank's shard: its own GPU
        self._searcher = SearchIndex(index, nprobe=nprobe, gpu=gpu, device=device)
        self._sharded = ShardedSearch(shard, self._searcher, rank, world) if distributed else None
        _ = self.search_index  # clone to the GPU(s) now rather than at the first query

    # ----------------------------------------------------------------- construction
    @classmethod
    def build(
        cls,
        model: torch.nn.Module,
        tokenizer,
        data: CorpusLike,
        output_dir: str | os.PathLike,
        *,
        max_length: int = 1024,
        stride: int = 512,
        batch_size: int = 8,
        text_column: str = "text",
        index_factory: str = DEFAULT_INDEX_FACTORY,
        hook_module: str | None = None,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        checkpoint_every: int = 65536,
        train_size: int = DEFAULT_TRAIN_SIZE,
        overwrite: bool = False,
        disable_progress: bool | None = None,
        document_names: Sequence[str] | None = None,
        shard_per_rank: bool = False,
    ) -> Datastore:
        """Run ``model`` over ``data`` and store (FFN input at t, token t+1) for every target.

        Args:
            model (`PreTrainedModel`): the causal LM whose keys are stored.
            tokenizer: its tokenizer (its fingerprint is recorded).
            data: a list of strings, the path of a UTF-8 text file, or a `datasets.Dataset`.
            output_dir (`str` or `os.PathLike`): the datastore folder; a killed build resumes there.
            max_length (`int`, defaults to 1024) / stride (`int`, defaults to 512): sliding windows;
                each target is stored once with at least ``max_length - stride`` tokens of context.
            batch_size (`int`, defaults to 8): windows per forward pass.
            text_column (`str`, defaults to `"text"`): the column of a `Dataset` to read.
            index_factory (`str`, defaults to `"Flat"`): faiss index-factory string; use e.g.
                ``"IVF4096,PQ64"`` for large stores (trained on ``train_size`` sampled keys).
            hook_module (`str`, *optional*): the FFN module to hook, if the table misses the model.
            max_shard_size (`int` or `str`, defaults to `"5GB"`): largest keys shard.
            checkpoint_every (`int`, defaults to 65536): entries between resumable checkpoints.
            overwrite (`bool`, defaults to `False`): replace a finished store in ``output_dir``.
            document_names (`list[str]`, *optional*): one name per document, shown by attribution
                (default: the file name, or ``texts[i]`` / ``dataset[i]``).
            shard_per_rank (`bool`, defaults to `False`): under accelerate / torchrun every process writes
                its own shards and IVF lists (one shared quantizer) and gets its part back (``distributed=
                "shard"``); one process opens it whole (``hf_knnlm.datastore.rank_build``; Flat or IVF).

        Each entry's corpus position and every document's text and token character spans are
        recorded (``entries.safetensors``, ``documents.safetensors``) for RetoMaton and attribution.
        """
        folder = build_datastore(
            model,
            tokenizer,
            data,
            output_dir,
            max_length=max_length,
            stride=stride,
            batch_size=batch_size,
            text_column=text_column,
            index_factory=index_factory,
            hook_module=hook_module,
            max_shard_size=max_shard_size,
            checkpoint_every=checkpoint_every,
            train_size=train_size,
            overwrite=overwrite,
            disable_progress=disable_progress,
            document_names=document_names,
            shard_per_rank=shard_per_rank,
        )
        sharded = shard_per_rank and process_group()[1] > 1  # each process opens its own part
        return cls.from_pretrained(folder, verify=False, distributed="shard" if sharded else None)

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_path: str | os.PathLike,
        *,
        mmap: bool = True,
        nprobe: int = DEFAULT_NPROBE,
        gpu: str | bool = "auto",
        distributed: str | None = None,
        **hub_kwargs,
    ) -> Datastore:
        """Open a datastore from a local folder or a Hub repository id.

        Every file is checked against the sha256 in ``datastore_config.json`` (``verify=True``)
        before faiss or safetensors read it; the index is memory-mapped where its type allows.
        With faiss-gpu and CUDA, ``gpu`` (``"auto"``, ``"replicate"``, ``"shard"`` or ``"none"``)
        says how the index is cloned to the GPUs (see ``hf_knnlm.datastore.index.index_to_gpus``).

        Args:
            repo_id_or_path (`str` or `os.PathLike`): a folder or a Hub repository id.
            mmap (`bool`, defaults to `True`): memory-map the index where its type allows.
            nprobe (`int`, defaults to 32): IVF lists probed per query.
            gpu (`str` or `bool`, defaults to `"auto"`): how to use GPUs with faiss-gpu.
            distributed (`str`, *optional*): ``"shard"``: under accelerate / torchrun each process holds
                and searches 1/N of the entries; searches are collective (``hf_knnlm.datastore.sharded``).
            hub_kwargs: ``subfolder``, ``revision``, ``cache_dir``, ``local_files_only``, ``token``,
                ``force_download`` and ``verify``, as in
                [`hf_knnlm.utils.hub_mixin.HubMixin.from_pretrained`][hf_knnlm.utils.HubMixin.from_pretrained].
        """
        check_positive_int("nprobe", nprobe, "IVF lists probed per query")
        check_distributed(distributed)
        return super().from_pretrained(
            repo_id_or_path, mmap=mmap, nprobe=nprobe, gpu=gpu, distributed=distributed, **hub_kwargs
        )

    @classmethod
    def _from_pretrained(cls, folder: Path, config: DatastoreConfig, **kwargs) -> Datastore:
        return cls(folder, config, **kwargs)

    @classmethod
    def _files_read(cls, config: DatastoreConfig) -> list[str]:
        index = index_files(config)
        return [*(name for shard in config.shards for name in (shard["keys"], shard["values"])), *index]

    @classmethod
    def _files_needed(cls, config: DatastoreConfig, distributed: str | None = None, **kw) -> list[str] | None:
        return rank_files(config) if distributed == "shard" else None  # a rank: its own shards only

    @classmethod
    def _model_card(cls, config: DatastoreConfig, repo_id: str | None = None):
        return datastore_card(config, repo_id=repo_id)

    def save_pretrained(
        self, save_directory: str | os.PathLike, max_shard_size: int | str | None = None, **kwargs
    ) -> Path:
        """Write the store to ``save_directory``, re-sharded if ``max_shard_size`` is given.

        Saving a store into its own folder without re-sharding changes nothing.
        """
        if Path(save_directory).resolve() == self.folder.resolve() and max_shard_size is None:
            return self.folder
        return super().save_pretrained(save_directory, max_shard_size=max_shard_size, **kwargs)

    def _save_pretrained(
        self, folder: Path, max_shard_size: int | str | None = None
    ) -> tuple[DatastoreConfig, list[str]]:
        config = DatastoreConfig.from_dict(self.config.to_dict())
        if max_shard_size is None:
            bounds = [(s["start"], s["end"]) for s in config.shards]
        else:
            bounds = shard_bounds(len(self), self.key_dim * 2, max_shard_size)
        keys, values, index = self.keys.iter_rows(65536), self.values.iter_rows(1 << 20), self.index
        if has_mapped_lists(index):  # faiss cannot write lists mapped from a file: an in-RAM copy
            index = open_index(self.folder, self.config, mmap=False)
        files = write_store(folder, config, keys, values, bounds, index=index, key_dim=self.key_dim)
        return config, [*files, *copy_extra_files(self.folder, folder, config)]

    def push_to_hub(self, repo_id: str, *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, **kwargs):
        """Save into a temporary folder and upload it to ``repo_id`` in one commit.

        Args:
            repo_id (`str`): the Hub model repository (created if missing).
            max_shard_size (`int` or `str`, defaults to `"5GB"`): largest keys shard uploaded.
            kwargs: ``revision``, ``private``, ``commit_message``, ``token``, ``create_pr``, as in
                [`hf_knnlm.utils.hub_mixin.HubMixin.push_to_hub`][hf_knnlm.utils.HubMixin.push_to_hub].

        A README.md the repository already has is kept; shards of an earlier push that this one
        does not rewrite are deleted in the same commit.
        """
        return super().push_to_hub(repo_id, max_shard_size=max_shard_size, **kwargs)

    # ----------------------------------------------------------------- properties
    def __len__(self) -> int:
        return len(self.values) if self._sharded is None else self.config.num_entries

    @property
    def sharded(self) -> ShardedSearch | None:
        """The collective search of a ``distributed="shard"`` store (its ``shard``: this rank's entries)."""
        return self._sharded

    def serving(self) -> contextlib.AbstractContextManager:
        """``ShardedSearch.serving`` (``hf_knnlm.datastore.sharded``) of a sharded store; else a no-op."""
        return contextlib.nullcontext() if self._sharded is None else self._sharded.serving()

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def key_dim(self) -> int:
        """Width of the stored keys: ``hidden_size``, or fewer for a PCA-compressed store."""
        return int(self.keys.shape[1])

    @property
    def provenance(self) -> Provenance:
        """Corpus positions, successors, merge counts and documents of the entries (as recorded)."""
        if self._provenance is None:
            self._provenance = Provenance.load(self.folder, self.config.files, len(self))
        return self._provenance

    @property
    def clusters(self) -> Clusters | None:
        """Clusters of entries (RetoMaton): the index's IVF lists, else those ``add_clusters`` kept."""
        if self._sharded is not None:  # every rank's lists (the first call is collective)
            return self._sharded.clusters()
        key = (self.index, self.config.files.get(CLUSTERS_NAME))  # a new index or add_clusters: read again
        if self._clusters_of != key:
            self._clusters, self._clusters_of = clusters_of(self), key
        return self._clusters

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def nprobe(self) -> int:
        """IVF lists probed per query (see ``SearchIndex``)."""
        return self._searcher.nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._searcher.nprobe = value

    @property
    def gpu(self) -> str | bool:
        return self._searcher.gpu

    @property
    def index(self) -> faiss.Index:
        """The CPU faiss index; saving and rebuilding work on this one."""
        return self._searcher.cpu

    @index.setter
    def index(self, value: faiss.Index) -> None:
        self._searcher.cpu = value

    @property
    def search_index(self) -> faiss.Index:
        """The index queries go to: the GPU clone when faiss-gpu sees a GPU (and ``gpu`` allows), else
        [`index`][hf_knnlm.Datastore.index]."""
        return self._searcher.active

    @property
    def on_gpu(self) -> bool:
        return self._searcher.on_gpu

    def __repr__(self) -> str:
        fields = f"entries={len(self)}, hidden_size={self.hidden_size}, index={self.config.index_factory!r}"
        return f"Datastore(folder={str(self.folder)!r}, {fields}, model_type={self.config.model_type!r})"

    # ----------------------------------------------------------------- search
    def clamp_k(self, k: int) -> int:
        """``k`` checked (a positive int) and cut to the store size, with one warning per value."""
        check_positive_int("k", k, "the number of neighbours, e.g. k=1024")
        if k > len(self):
            if k not in self._warned_k:
                self._warned_k.add(k)
                logger.warning(
                    "k=%d is larger than the datastore (%d entries); using k=%d.", k, len(self), len(self)
                )
            return len(self)
        return k

    def search_ids(self, queries: torch.Tensor | np.ndarray, k: int, recompute_dists: bool = False):
        """``(squared L2 distances [Q, k], entry ids [Q, k])`` as numpy; missing neighbours are inf / -1."""
        if self._sharded is None:
            return search_keys(self._searcher, self.keys, *self._queries(queries, k), recompute_dists)
        found = self.search(queries, k, recompute_dists)
        return found.distances.numpy(), found.ids.numpy()

    def _queries(self, queries: torch.Tensor | np.ndarray, k: int) -> tuple[np.ndarray, int]:
        """``queries`` as float32 numpy in the stored keys' space, and ``k``, both checked."""
        k = self.clamp_k(k)
        return prepare_queries(queries, self.hidden_size, self.key_transform, k if self.on_gpu else None), k

    def search(self, queries: torch.Tensor | np.ndarray, k: int, recompute_dists: bool = False) -> Neighbours:
        """The ``k`` nearest stored keys of every query by squared L2 distance.

        Args:
            queries (`torch.Tensor` of shape `[Q, hidden_size]`): FFN inputs of the current positions.
            k (`int`): neighbours per query (clamped to ``len(self)`` with a warning).
            recompute_dists (`bool`, defaults to `False`): replace approximate (e.g. PQ) distances
                with exact ones computed from the stored fp16 keys.

        Returns:
            [`Neighbours`][hf_knnlm.Neighbours]: ``[Q, k]`` distances (float32), entry ids, values
            (next-token ids) and the merge counts of a pruned store, on the CPU; a missing neighbour has
            id -1 and distance `inf`.
            On a store opened with ``distributed="shard"`` every rank must call it (see ``serving``).
        """
        if self._sharded is not None:
            return self._sharded.search(*self._queries(queries, k), recompute_dists)
        distances, ids = self.search_ids(queries, k, recompute_dists)
        return Neighbours.from_ids(self, distances, ids)

    def token_ids(self, ids: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The stored next-token ids (int64) of entries ``ids``, any shape; ``-1`` (no neighbour) gives 0."""
        ids = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        return torch.from_numpy(self.values.take(np.where(ids < 0, 0, ids)).astype(np.int64))

    @property
    def default_temperature(self) -> float:
        """The kNN temperature used when none is given: the one recorded at build time, else calibrated
        now on a sample of the keys (``calibrate_temperature``)."""
        if self.config.temperature is not None:
            return self.config.temperature
        if self._temperature is None:  # a sharded store samples every rank's keys
            found = self._sharded.calibrate_temperature() if self._sharded else None
            self._temperature = found or calibrate_temperature(self.keys, self._searcher.search) or 1.0
        return self._temperature

    # ----------------------------------------------------------------- compatibility
    def check_compatible(self, model: torch.nn.Module, tokenizer=None) -> None:
        """Raise ValueError if ``model`` (or ``tokenizer``) is not the kind that built this store."""
        check_compatible(self.config, model, tokenizer)

    def rebuild_index(
        self,
        index_factory: str,
        output_dir: str | os.PathLike,
        *,
        train_size: int = DEFAULT_TRAIN_SIZE,
        overwrite: bool = False,
    ) -> Datastore:
        """A copy of this store in ``output_dir`` with a new faiss index over the same keys (no model run).

        Args:
            index_factory (`str`): faiss index-factory string, e.g. ``"IVF1024,PQ64"`` or ``"Flat"``.
            output_dir (`str` or `os.PathLike`): a new folder; only the index is written: keys and values
                are hard links to this store's (copies across file systems), never written in place.
            train_size (`int`, defaults to 1_000_000): keys sampled to train the index.
            overwrite (`bool`, defaults to `False`): replace a finished store in ``output_dir``.
        """
        out = rebuild_store(self, index_factory, output_dir, train_size=train_size, overwrite=overwrite)
        return type(self).from_pretrained(out, verify=False, nprobe=self.nprobe, gpu=self.gpu)
