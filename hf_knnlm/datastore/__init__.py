"""kNN-LM datastores: building, storage (safetensors shards), the faiss index, config and model card.

``Datastore`` is imported on first use, so that the storage and index modules can be imported
without torch or transformers (the memory benchmarks measure them alone).
"""

from typing import TYPE_CHECKING

from .config import CONFIG_NAME, DatastoreConfig

if TYPE_CHECKING:
    from .datastore import Datastore


def __getattr__(name: str):
    if name == "Datastore":
        from .datastore import Datastore

        return Datastore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CONFIG_NAME", "Datastore", "DatastoreConfig"]
