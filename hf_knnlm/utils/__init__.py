"""What every saveable object and entry point shares: atomic writes, folder locks and sha256 checks
(``files.py``), the Hub base of every store (``hub_mixin.py``) and its Hub calls (``hub.py``),
argument checks (``checks.py``), tokenizer / encoder fingerprints (``fingerprints.py``), faiss on
first use (``faiss_support.py``) and lazy package exports (``lazy.py``)."""

from typing import TYPE_CHECKING

from .lazy import lazy_exports

_IMPORT_STRUCTURE = {
    ".files": ["FolderInUseError", "IntegrityError"],
    ".hub_mixin": ["HubMixin", "StoreConfig"],
}
__getattr__, __dir__ = lazy_exports(__name__, _IMPORT_STRUCTURE)
__all__ = [name for names in _IMPORT_STRUCTURE.values() for name in names]

if TYPE_CHECKING:
    from .files import FolderInUseError, IntegrityError
    from .hub_mixin import HubMixin, StoreConfig
