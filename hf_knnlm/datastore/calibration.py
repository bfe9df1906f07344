"""The default kNN temperature of a store, calibrated on its own keys when it is written.

p_kNN is a softmax over ``-d / T`` with squared L2 distances ``d`` between FFN inputs, which are in the
tens to thousands for real models: with ``T = 1`` p_kNN is a one-hot on the nearest neighbour and the
mixture usually *hurts*. The useful temperatures scale with the distances, so a store records
``TEMPERATURE_FACTOR x`` the median distance from a sample of its keys to their nearest *other* entry
(each sampled key is held out of its own search, as a query from unseen text would be). The factor was
chosen on real stores (docs/benchmarks/index.md, "Default temperature").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from ..utils.faiss_support import import_faiss

CALIBRATION_SAMPLE = 1024
TEMPERATURE_FACTOR = 0.2
_NEIGHBOURS = 8  # enough to skip the key itself (and an approximate index's near-misses of it)

Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def calibration_sample(num_entries: int, size: int = CALIBRATION_SAMPLE, seed: int = 0) -> np.ndarray:
    """Sorted entry ids of a fixed pseudo-random sample (the same for the same store size)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_entries, size=min(size, num_entries), replace=False))


def nearest_other_distances(search: Search, keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """For each key (entry ``ids``), the distance to its nearest entry other than itself (inf if none)."""
    distances, found = search(np.ascontiguousarray(keys, dtype=np.float32), _NEIGHBOURS)
    other = (found != ids[:, None]) & (found >= 0)
    first = np.where(other.any(1), other.argmax(1), 0)
    picked = distances[np.arange(len(ids)), first]
    return np.where(other.any(1), picked, np.inf)


def temperature_from_distances(distances: np.ndarray) -> float | None:
    """``TEMPERATURE_FACTOR`` x the median finite distance; None when there is none (a 1-entry store)."""
    finite = distances[np.isfinite(distances)]
    if not len(finite):
        return None
    return float(f"{TEMPERATURE_FACTOR * max(float(np.median(finite)), 1e-6):.6g}")


def exact_search(chunks: Iterable[np.ndarray]) -> Search:
    """A brute-force search over key chunks (for an exact store, whose index is built only when opened)."""
    parts = list(chunks)

    def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        faiss = import_faiss("Calibrating a datastore's temperature")
        heap = faiss.ResultHeap(len(queries), k)
        offset = 0
        for part in parts:
            d, i = faiss.knn(queries, np.ascontiguousarray(part, dtype=np.float32), min(k, len(part)))
            heap.add_result(d, np.where(i >= 0, i + offset, -1))
            offset += len(part)
        heap.finalize()
        return heap.D, heap.I

    return search


def calibrate_temperature(keys, search: Search) -> float | None:
    """The default temperature of a store with stored ``keys`` (a ``ShardedArray``) searched by ``search``."""
    ids = calibration_sample(len(keys))
    if len(ids) < 2:
        return None
    return temperature_from_distances(nearest_other_distances(search, keys.take(ids), ids))


__all__ = [
    "CALIBRATION_SAMPLE",
    "TEMPERATURE_FACTOR",
    "calibrate_temperature",
    "exact_search",
    "nearest_other_distances",
    "temperature_from_distances",
]
