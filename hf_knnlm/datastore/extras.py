"""Optional files a datastore may carry besides keys, values and the index.

Each is hashed in ``datastore_config.json`` like the shards; stores written before they existed
simply lack them and load as before.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from ..utils.faiss_support import import_faiss
from ..utils.files import atomic_path, file_hashes, updated_folder
from .config import CONFIG_NAME, DatastoreConfig

ENTRIES_NAME = "entries.safetensors"  # corpus positions, RetoMaton pointers, merge counts
DOCUMENTS_NAME = "documents.safetensors"  # document names, texts and token character spans
TRANSFORM_NAME = "key_transform.faiss"  # PCA applied to queries of a store with reduced keys
GATE_NAME = "gate.safetensors"  # the adaptive-retrieval gate trained for this store
CLUSTERS_NAME = "clusters.safetensors"  # k-means clusters of a store without IVF lists (RetoMaton)
EXTRA_FILES = (ENTRIES_NAME, DOCUMENTS_NAME, TRANSFORM_NAME, GATE_NAME, CLUSTERS_NAME)


def extra_files(config: DatastoreConfig) -> list[str]:
    """The optional files this store records."""
    return [name for name in EXTRA_FILES if name in config.files]


def copy_extra_files(
    src: Path, dst: Path, config: DatastoreConfig, only: tuple[str, ...] = EXTRA_FILES
) -> list[str]:
    """Copy the optional files of a store (those in ``only``) into another folder; returns their names."""
    names = [name for name in extra_files(config) if name in only]
    for name in names:
        if Path(src, name).resolve() != Path(dst, name).resolve():
            with atomic_path(Path(dst) / name) as tmp:
                shutil.copyfile(Path(src) / name, tmp)
    return names


def add_files(datastore, write: Callable[[Path], list[str]], *, lock: bool = True) -> None:
    """Add or replace optional files of a finished store: ``write(folder)`` writes them and returns
    their names; they are hashed into a copy of the config, and the folder with both is swapped in
    whole under the store's lock (``lock=False``: the caller holds it). A failure anywhere (a full
    disk while the config is written) leaves the store and ``datastore.config`` as they were."""
    config = DatastoreConfig.from_dict(datastore.config.to_dict())
    with updated_folder(datastore.folder, lock=lock) as folder:
        config.files.update(file_hashes(folder, write(folder)))
        config.save(folder / CONFIG_NAME)
    datastore.config.files = config.files


def read_key_transform(folder: Path, config: DatastoreConfig):
    """The PCA of a compressed store (its keys are reduced; queries go through it too), or None."""
    if TRANSFORM_NAME not in config.files:
        return None
    return import_faiss("a PCA-compressed datastore").read_VectorTransform(str(Path(folder) / TRANSFORM_NAME))
