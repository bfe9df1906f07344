"""kNN-LM datastores: building, storage (safetensors shards), the faiss index, search results
([`Neighbours`][hf_knnlm.Neighbours]), config, model card and compression.

Names are imported on first use, so that the storage and index modules can be imported without
torch, transformers or faiss (the memory benchmarks measure them alone).
"""

from typing import TYPE_CHECKING

from ..utils.lazy import lazy_exports

_IMPORT_STRUCTURE = {
    ".compress": ["compress_datastore"],
    ".config": ["CONFIG_NAME", "DatastoreConfig"],
    ".datastore": ["Datastore"],
    ".neighbours": ["Neighbours"],
}
__getattr__, __dir__ = lazy_exports(__name__, _IMPORT_STRUCTURE)
__all__ = [name for names in _IMPORT_STRUCTURE.values() for name in names]

if TYPE_CHECKING:
    from .compress import compress_datastore
    from .config import CONFIG_NAME, DatastoreConfig
    from .datastore import Datastore
    from .neighbours import Neighbours
