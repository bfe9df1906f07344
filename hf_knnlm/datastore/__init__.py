"""kNN-LM datastores: building, storage (safetensors shards), the faiss index, config and model card.

Names are imported on first use, so that the storage and index modules can be imported without
torch, transformers or faiss (the memory benchmarks measure them alone).
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_EXPORTS = {"CONFIG_NAME": ".config", "Datastore": ".datastore", "DatastoreConfig": ".config"}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .config import CONFIG_NAME, DatastoreConfig
    from .datastore import Datastore
