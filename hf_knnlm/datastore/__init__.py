"""kNN-LM datastores: building, storage (safetensors shards), the faiss index, config and model card.

Names are imported on first use, so that the storage and index modules can be imported without
torch, transformers or faiss (the memory benchmarks measure them alone).
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_IMPORT_STRUCTURE = {
    ".config": ["CONFIG_NAME", "DatastoreConfig"],
    ".datastore": ["Datastore"],
}
__getattr__, __dir__ = lazy_exports(__name__, _IMPORT_STRUCTURE)
__all__ = [name for names in _IMPORT_STRUCTURE.values() for name in names]

if TYPE_CHECKING:
    from .config import CONFIG_NAME, DatastoreConfig
    from .datastore import Datastore
