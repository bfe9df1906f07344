"""faiss is an optional dependency: ``faiss-cpu`` or ``faiss-gpu``, installed through the extras.

Everything that searches or writes a faiss index imports it through ``import_faiss``, so that
``import hf_knnlm`` works without it and a feature that needs it fails with one line that says
how to install it.
"""

from __future__ import annotations

from types import ModuleType

INSTALL_HINT = "pip install 'hf-knnlm[cpu]' (faiss-cpu) or 'hf-knnlm[gpu]' (faiss-gpu, CUDA)"

# faiss computes the exact distances of a batch of queries with BLAS (one matrix product) only from a
# size on, and with a scan per query below it. faiss 1.15 counts the size in queries x dimensions
# (default 128,000: 223 queries of SmolLM2's 576 dimensions); older faiss counted queries (default 20).
# From 4 queries on BLAS is faster: IndexFlatL2 of 30,000 x 576, k 1024, one thread, ms per query,
# scan -> BLAS: 4 queries 4.1 -> 3.3, 36 queries 4.7 -> 0.78, 128 queries 4.9 -> 0.70; for 1-2 queries
# the scan wins (one query: 4.4 vs 12.9 ms). RetoMaton's walk searches a few dozen queries at a time
# and generation a batch of sequences, both below faiss's own size. The two paths round differently
# (~1e-5), so a small index, where the scan costs little anyway, keeps faiss's own choice and the
# distances it gave before (exact-equality tests compare batches of different sizes on such indexes).
BLAS_MIN_QUERIES = 4
BLAS_MIN_INDEX_SIZE = 1 << 22  # entries x dimensions (7,282 entries of 576 dimensions)
_FAISS_DEFAULT: list[int] = []  # faiss's own threshold, read before the first change


class MissingDependencyError(ImportError):
    """An optional dependency a feature needs is not installed; the message says how to install it."""


def import_faiss(feature: str = "this feature") -> ModuleType:
    """The ``faiss`` module, or ``MissingDependencyError`` naming ``feature`` and the install command."""
    try:
        import faiss
    except ImportError as err:
        raise MissingDependencyError(
            f"{feature} needs faiss, which is not installed: {INSTALL_HINT}."
        ) from err
    return faiss


def use_blas_from(dim: int, entries: int, queries: int = BLAS_MIN_QUERIES) -> None:
    """Before searching an index of ``entries`` vectors of ``dim`` dimensions: faiss computes exact
    distances with BLAS for batches of at least ``queries`` queries when the index holds at least
    ``BLAS_MIN_INDEX_SIZE`` numbers, else as faiss chooses (``faiss.cvar.distance_compute_blas_threshold``,
    a process-wide setting)."""
    faiss = import_faiss()
    if not _FAISS_DEFAULT:
        _FAISS_DEFAULT.append(int(faiss.cvar.distance_compute_blas_threshold))
    default = _FAISS_DEFAULT[0]
    # A default in the thousands is a count of queries x dimensions (faiss >= 1.15), else of queries.
    lowered = queries * int(dim) if default >= 1000 else queries
    wanted = lowered if int(dim) * int(entries) >= BLAS_MIN_INDEX_SIZE else default
    if faiss.cvar.distance_compute_blas_threshold != wanted:
        faiss.cvar.distance_compute_blas_threshold = wanted


__all__ = [
    "BLAS_MIN_INDEX_SIZE",
    "BLAS_MIN_QUERIES",
    "INSTALL_HINT",
    "MissingDependencyError",
    "import_faiss",
    "use_blas_from",
]
