"""Building a datastore: windows -> (key, next token) chunks on disk -> shards -> faiss index.

Memory stays bounded: keys go to ``.partial/chunk-*.safetensors`` every ``checkpoint_every``
entries, together with a ``progress.json`` that lets a killed build resume at the next window. The
final shards and the index are written from memory-mapped chunks; ``datastore_config.json`` is
written last, so a folder with a config is a finished store.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .._version import __version__
from ..lm.corpus import CorpusLike, corpus_name, tokenize_corpus
from ..lm.forward import check_forward_args
from ..lm.hooks import find_ffn_module, num_hidden_layers
from ..lm.windows import sliding_windows
from ..utils.checks import check_flag, check_positive_int
from ..utils.faiss_support import import_faiss
from ..utils.files import atomic_folder, folder_lock, link_or_copy, not_matching
from ..utils.fingerprints import tokenizer_fingerprint
from ..utils.hub_mixin import CARD_NAME, finish_folder
from .calibration import calibrate_temperature, exact_search
from .card import datastore_card
from .compat import model_vocab_size
from .config import CONFIG_NAME, DatastoreConfig
from .distributed import build_state
from .extras import EXTRA_FILES, copy_extra_files
from .index import (
    DEFAULT_INDEX_FACTORY,
    DEFAULT_NPROBE,
    DEFAULT_TRAIN_SIZE,
    INDEX_NAME,
    build_index,
    check_index_factory,
    is_exact,
    new_index,
    search_parameters,
    write_index,
)
from .progress import build_fingerprint, check_ranks_done, embed_windows, merged_arrays, rank_progresses
from .provenance import record_provenance
from .rank_build import check_shard_per_rank, finish_per_rank
from .rank_index import RANK_INDEX_PATTERN
from .shards import DEFAULT_MAX_SHARD_SIZE, INDEX_SUFFIX, KEYS_PREFIX, VALUES_PREFIX, write_shard_index
from .storage import ShardedArray, open_memmap, parse_size, shard_bounds, write_sharded

if TYPE_CHECKING:
    import faiss

    from .datastore import Datastore

logger = logging.getLogger(__name__)

PARTIAL_DIR = ".partial"
# Files split by entries (keys, values, per-rank index files), whose count changes with the split.
SHARD_PATTERNS = (
    f"{KEYS_PREFIX}*.safetensors",
    f"{VALUES_PREFIX}*.safetensors",
    f"*{INDEX_SUFFIX}",
    RANK_INDEX_PATTERN,
)
# The files of a store (besides its config and card); a new build or save replaces them as a whole.
DATA_PATTERNS = (*SHARD_PATTERNS, "index.faiss*", "*.ivfdata", *EXTRA_FILES)
STORE_PATTERNS = (CONFIG_NAME, CARD_NAME, *DATA_PATTERNS)
_INDEX_ADD_ROWS = 65536


def _refuse_existing(output_dir: Path, overwrite: bool) -> None:
    if (output_dir / CONFIG_NAME).exists() and not overwrite:
        raise FileExistsError(
            f"{output_dir} already holds a datastore; pass overwrite=True (--overwrite) to rebuild it "
            f"or choose another output_dir."
        )


def _finalize(
    keys: ShardedArray,
    values: ShardedArray,
    output_dir: Path,
    config: DatastoreConfig,
    max_shard_size,
    train_size: int,
    extra_files: Sequence[str] = (),
):
    config.hidden_size = keys.shape[1]  # the FFN input width, whatever the config calls hidden_size
    bounds = shard_bounds(len(values), config.hidden_size * 2, max_shard_size)
    files = write_store(
        output_dir,
        config,
        keys.iter_rows(_INDEX_ADD_ROWS),
        values.iter_rows(1 << 20),
        bounds,
        train_size=train_size,
    )
    # Extra files (provenance, gate, key transform) are already written; they are hashed with the rest.
    finish_folder(output_dir, config, [*files, *extra_files], datastore_card)


def write_store(
    folder: Path,
    config: DatastoreConfig,
    keys: Iterable[np.ndarray],
    values: Iterable[np.ndarray],
    bounds: list[tuple[int, int]],
    *,
    index: faiss.Index | None = None,
    train_size: int = DEFAULT_TRAIN_SIZE,
    key_dim: int | None = None,
) -> list[str]:
    """Write the data files of a store: key and value shards, their index jsons, the faiss index.

    ``keys`` and ``values`` are row chunks in entry order, split into shards at ``bounds``. Without
    an ``index`` one of type ``config.index_factory`` is trained and filled from the written keys.
    An exact (``Flat``) store writes no index file: it is rebuilt from the keys when opened.
    ``key_dim`` is the width of the stored keys (``config.hidden_size`` unless a transform reduced it).
    Sets ``config.shards`` and ``config.num_entries``; returns the names written, to be hashed.
    """
    key_dim = key_dim or config.hidden_size
    key_files = write_sharded(folder, KEYS_PREFIX, "keys", np.float16, (key_dim,), bounds, keys)
    value_files = write_sharded(folder, VALUES_PREFIX, "values", np.int32, (), bounds, values)
    return index_shards(
        folder, config, key_files, value_files, bounds, index=index, train_size=train_size, key_dim=key_dim
    )


def index_shards(
    folder: Path,
    config: DatastoreConfig,
    key_files: list[str],
    value_files: list[str],
    bounds: list[tuple[int, int]],
    *,
    index: faiss.Index | None,
    train_size: int,
    key_dim: int,
) -> list[str]:
    """Index the key shards already in ``folder`` and describe them in ``config`` (see ``write_store``)."""
    index_files = [] if is_exact(config.index_factory) else [INDEX_NAME]
    if index is None and index_files:
        written = ShardedArray([open_memmap(folder / f, "keys") for f in key_files])
        index = build_index(
            config.index_factory,
            key_dim,
            written,
            written.iter_rows(_INDEX_ADD_ROWS),
            train_size=train_size,
        )
    if index_files:
        write_index(index, folder / INDEX_NAME)
    if config.temperature is None:
        written = ShardedArray([open_memmap(folder / f, "keys") for f in key_files])
        config.temperature = calibrate_temperature(written, _calibration_search(index, written))
    for stale in folder.glob(f"*{INDEX_SUFFIX}"):  # a store with one shard has no shard index json
        stale.unlink()
    config.num_entries = bounds[-1][1] if bounds else 0
    config.rank_shards = None  # one index over every entry, whoever built the source
    config.shards = [
        {"keys": k, "values": v, "start": s, "end": e}
        for k, v, (s, e) in zip(key_files, value_files, bounds, strict=True)
    ]
    index_files += write_shard_index(folder, KEYS_PREFIX, "keys", key_files, bounds, key_dim * 2)
    index_files += write_shard_index(folder, VALUES_PREFIX, "values", value_files, bounds, 4)
    return [*key_files, *value_files, *index_files]


def _calibration_search(index: faiss.Index | None, keys: ShardedArray):
    """How calibration searches the keys just written: the new index as queries will, else brute force."""
    if index is None:
        return exact_search(keys.iter_rows(_INDEX_ADD_ROWS))
    params = search_parameters(index, DEFAULT_NPROBE)
    return lambda queries, k: index.search(queries, k, params=params)


def _check_build_args(
    model: torch.nn.Module,
    output_dir: Path,
    overwrite: bool,
    max_length: int,
    stride: int,
    batch_size: int,
    checkpoint_every: int,
    train_size: int,
) -> None:
    """The checks that need neither the hook nor the corpus: a mistake there costs no tokenising."""
    import_faiss("Building a kNN-LM datastore")  # before the model runs, not after
    check_flag("overwrite", overwrite)
    _refuse_existing(output_dir, overwrite)
    check_forward_args(model, max_length, stride, batch_size)
    check_positive_int("checkpoint_every", checkpoint_every, "entries between resumable checkpoints")
    check_positive_int("train_size", train_size, "keys sampled to train the index")


def _hook_and_width(model: torch.nn.Module, hook_module: str | None, index_factory: str) -> tuple[str, int]:
    """The FFN module to hook and the key width; a bad factory string fails now, not after the model pass."""
    path = find_ffn_module(model, hook_module)
    width = model.config.get_text_config().hidden_size
    new_index(index_factory, width)
    return path, width


def build_datastore(
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
    separator: str = "\n\n",
    disable_progress: bool | None = None,
    document_names: Sequence[str] | None = None,
    shard_per_rank: bool = False,
) -> Path:
    """Build a datastore folder; see [`hf_knnlm.Datastore.build`][hf_knnlm.Datastore.build] for the arguments.

    Everything that can be checked is checked before any file is touched: window and batch
    settings, the hook module, the index-factory string and the corpus itself.
    """
    output_dir = Path(output_dir)
    _check_build_args(
        model, output_dir, overwrite, max_length, stride, batch_size, checkpoint_every, train_size
    )
    parse_size(max_shard_size)  # a bad size fails now, not after the model pass
    path, width = _hook_and_width(model, hook_module, index_factory)
    check_shard_per_rank(shard_per_rank, index_factory, width)
    tokens = tokenize_corpus(tokenizer, data, text_column, separator)
    check_index_factory(index_factory, width, len(tokens) - 1, train_size)
    state = build_state()
    # Every process locks its share (ranks > 0 a file of their own), so a second build into the
    # same folder fails at once in every process instead of mixing its rows into this one.
    with folder_lock(output_dir, f".rank-{state.process_index}" if state.process_index else ""):
        _refuse_existing(output_dir, overwrite)  # a build that finished while we validated
        output_dir.mkdir(parents=True, exist_ok=True)  # .partial lives here; an old store is not touched
        config = _new_config(model, tokenizer, data, path, index_factory, max_length, stride)
        windows = list(sliding_windows(len(tokens), max_length, stride))
        fingerprint = build_fingerprint(tokens, config)
        progresses = rank_progresses(output_dir / PARTIAL_DIR, fingerprint, len(windows), state)
        embed_windows(
            model,
            tokens,
            windows,
            progresses,
            state,
            output_dir,
            batch_size=batch_size,
            hook_module=path,
            checkpoint_every=checkpoint_every,
            disable_progress=disable_progress,
            expected_width=width if hook_module is not None else None,
        )
        state.wait_for_everyone()
        keep = not_matching((*STORE_PATTERNS, PARTIAL_DIR))

        def write_extras(folder: Path) -> list[str]:
            return record_provenance(folder, tokenizer, data, tokens, text_column, separator, document_names)

        if shard_per_rank:  # every process writes its own files (hf_knnlm.datastore.rank_build)
            finish_per_rank(
                output_dir / PARTIAL_DIR,
                progresses,
                state,
                config,
                num_windows=len(windows),
                max_shard_size=max_shard_size,
                train_size=train_size,
                keep=keep,
                write_extras=write_extras,
            )
        elif state.is_main_process:
            check_ranks_done(progresses, len(windows), state.num_processes)
            # The finished store is written beside the folder and swapped in whole: an old store (with
            # overwrite=True) stays loadable until then, and the swap takes .partial away with it.
            with atomic_folder(output_dir, keep=keep) as folder:
                extra = write_extras(folder)
                _finalize(*merged_arrays(progresses), folder, config, max_shard_size, train_size, extra)
        state.wait_for_everyone()
    return output_dir


def _new_config(model, tokenizer, data, hook_module, index_factory, max_length, stride) -> DatastoreConfig:
    """What the store will record about the model, tokenizer, corpus and settings that build it."""
    name_or_path = getattr(model.config, "_name_or_path", None) or None
    return DatastoreConfig(
        model_type=model.config.model_type,
        hook_module=hook_module,
        hidden_size=model.config.get_text_config().hidden_size,
        vocab_size=model_vocab_size(model),
        num_hidden_layers=num_hidden_layers(model),
        hf_knnlm_version=__version__,
        base_model=str(name_or_path) if name_or_path else None,
        base_model_revision=getattr(model.config, "_commit_hash", None),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        index_factory=index_factory,
        max_length=max_length,
        stride=stride,
        datasets=[corpus_name(data)],
    )


def rebuild_store(
    store: Datastore, index_factory: str, output_dir: str | os.PathLike, *, train_size: int, overwrite: bool
) -> Path:
    """Write ``store``'s keys and values under a new faiss index into ``output_dir`` (no model run);
    see [`hf_knnlm.Datastore.rebuild_index`][hf_knnlm.Datastore.rebuild_index]."""
    out = Path(output_dir)
    if out.exists() and out.resolve() == store.folder.resolve():
        raise ValueError(
            f"output_dir={str(out)!r} is the store itself; choose a new folder for the new index."
        )
    if (out / CONFIG_NAME).exists() and not overwrite:
        raise FileExistsError(
            f"{out} already holds a datastore; pass overwrite=True (--overwrite) or a new output_dir."
        )
    # Refuse what cannot succeed before anything is written; the old store in ``out`` stays until
    # the new one is complete (the store's _writable_folder swaps it in).
    check_index_factory(index_factory, store.key_dim, len(store), train_size)
    config = DatastoreConfig.from_dict(store.config.to_dict())
    config.index_factory, config.evaluation, config.temperature = index_factory, None, None
    bounds = [(s["start"], s["end"]) for s in config.shards]
    with store._writable_folder(out) as folder:
        # The keys and values do not change: the new store hard-links the old one's shards (a copy
        # only across file systems) and writes just its index. Shards are never written in place.
        key_files, value_files = link_shards(store.folder, folder, config.shards)
        files = index_shards(
            folder,
            config,
            key_files,
            value_files,
            bounds,
            index=None,
            train_size=train_size,
            key_dim=store.key_dim,
        )
        extra = copy_extra_files(store.folder, folder, config)
        finish_folder(folder, config, [*files, *extra], datastore_card)
    return out


def link_shards(src: Path, dst: Path, shards: list[dict]) -> tuple[list[str], list[str]]:
    """Hard-link the key and value shard files named in ``shards`` from ``src`` into ``dst``."""
    for shard in shards:
        for name in (shard["keys"], shard["values"]):
            link_or_copy(src / name, dst / name)
    return [s["keys"] for s in shards], [s["values"] for s in shards]
