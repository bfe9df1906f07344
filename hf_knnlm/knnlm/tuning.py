"""Tuning lmbda, temperature and k of a kNN-LM from one forward pass and one neighbour search.

The cache is a :class:`~hf_knnlm.evaluation.ScoredBatch` over the whole tuning text: per scored
token, log p_LM(target) and the ``k`` nearest neighbours' squared L2 distances (float32) and token
ids (int32), so ``num_tokens * k * 8`` bytes, capped by ``max_cache_bytes``. Every
(lmbda, temperature, k' <= k) point is then computed from the cache alone, never re-running the model.

Squared L2 distances between FFN inputs of real models are large (hundreds to thousands for
SmolLM2), so a temperature of 1 makes p_kNN a one-hot on the nearest neighbour; the default grid is
therefore multiples of the median nearest-neighbour distance of the cache, plus a few plain values.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..datastore.datastore import Datastore
from ..lm.corpus import CorpusLike
from ..lm.forward import check_forward_args
from ..lm.windows import window_settings
from ..utils.files import atomic_write_json
from .evaluation import ScoredBatch, iter_scored_batches, recorded_windows, scored_tokens
from .mixture import check_knn_args, interpolate, knn_target_log_probs
from .tuning_defaults import (
    DEFAULT_KS,
    DEFAULT_LMBDAS,
    DEFAULT_MAX_CACHE_BYTES,
    DEFAULT_TEMPERATURE_MULTIPLES,
    DEFAULT_TEMPERATURES,
)
from .tuning_plot import plot_sweep  # the picture lives in tuning_plot.py; importable from here too

logger = logging.getLogger(__name__)

RESULTS_NAME, PLOT_NAME = "tune_results.json", "tune_plot.png"
_ROWS = 4096  # rows per softmax block: bounds the temporaries of a sweep point to ~_ROWS * k * 12 bytes


def concat_batches(batches: Iterable[ScoredBatch]) -> ScoredBatch:
    """One :class:`ScoredBatch` from many (neighbour ids stored as int32 to halve the cache)."""
    batches = list(batches)
    if not batches:
        raise ValueError("no scored tokens: the tuning text is empty.")
    return ScoredBatch(
        torch.cat([b.lm_log_probs.float() for b in batches]),
        torch.cat([b.targets for b in batches]),
        torch.cat([b.distances for b in batches]),
        torch.cat([b.neighbour_tokens.to(torch.int32) for b in batches]),
        None
        if batches[0].neighbour_log_counts is None
        else torch.cat([b.neighbour_log_counts for b in batches]),
    )


def build_tuning_cache(
    model: torch.nn.Module,
    tokenizer,
    data: CorpusLike,
    datastore: Datastore,
    *,
    k: int = 1024,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    recompute_dists: bool = False,
    text_column: str = "text",
    max_tokens: int | None = None,
    max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
    disable_progress: bool | None = None,
) -> ScoredBatch:
    """One forward pass and one ``k``-neighbour search over ``data``, kept in memory.

    Args:
        k (`int`, defaults to 1024): neighbours searched per token; the sweep can use any k' <= k.
        max_tokens (`int`, *optional*): score only the first ``max_tokens`` tokens.
        max_cache_bytes (`int`, defaults to 1 GiB): the cache (``num_tokens * k * 8`` bytes) is cut
            to this size: only the first ``max_cache_bytes // (8 k)`` targets are scored (with a warning).
        Other arguments are those of :func:`~hf_knnlm.evaluate_perplexity`.
    """
    k = datastore.clamp_k(k)
    max_length, stride = window_settings(max_length, stride, recorded_windows(datastore))
    max_targets = max_cache_bytes // (8 * k)
    if max_targets < 1:
        raise ValueError(
            f"max_cache_bytes={max_cache_bytes} cannot hold one token's {k} neighbours ({8 * k} bytes)."
        )
    check_forward_args(model, max_length, stride, batch_size)
    tokens = scored_tokens(model, tokenizer, data, datastore, text_column, max_tokens)
    if len(tokens) - 1 > max_targets:
        logger.warning(
            "the tuning cache would take %d MB (%d tokens x k=%d x 8 bytes); scoring only the first %d "
            "tokens (raise max_cache_bytes / --max-cache-mb or lower k to use more).",
            (len(tokens) - 1) * k * 8 >> 20,
            len(tokens) - 1,
            k,
            max_targets,
        )
        tokens = tokens[: max_targets + 1]
    return concat_batches(
        iter_scored_batches(
            model,
            tokens,
            datastore,
            k=k,
            max_length=max_length,
            stride=stride,
            batch_size=batch_size,
            recompute_dists=recompute_dists,
            disable_progress=disable_progress,
        )
    )


def median_nn_distance(cache: ScoredBatch) -> float:
    """Median squared L2 distance to the nearest neighbour: the scale of useful temperatures."""
    first = cache.distances[:, 0]
    first = first[torch.isfinite(first)]
    if not len(first):
        raise ValueError("no token of the tuning text has a neighbour; is the datastore empty?")
    return float(np.median(first.numpy()))  # the mean of the middle two, unlike torch.median


def temperature_grid(
    cache: ScoredBatch,
    multiples: Sequence[float] = DEFAULT_TEMPERATURE_MULTIPLES,
    plain: Sequence[float] = DEFAULT_TEMPERATURES,
) -> list[float]:
    """``multiples`` x the median nearest-neighbour distance, plus the ``plain`` temperatures."""
    scale = median_nn_distance(cache)
    grid = {float(f"{m * scale:.6g}") for m in multiples if m * scale > 0} | {float(t) for t in plain}
    return sorted(grid)


def cached_knn_log_probs(cache: ScoredBatch, temperature: float, k: int) -> torch.Tensor:
    """log p_kNN(target) of every cached token with the first ``k`` neighbours, ``[n]``."""
    return torch.cat(
        [
            knn_target_log_probs(
                cache.distances[i : i + _ROWS, :k],
                cache.neighbour_tokens[i : i + _ROWS, :k],
                cache.targets[i : i + _ROWS],
                temperature,
                None if cache.neighbour_log_counts is None else cache.neighbour_log_counts[i : i + _ROWS, :k],
            )
            for i in range(0, len(cache.targets), _ROWS)
        ]
    )


def check_grid(
    searched: int, lmbdas: Sequence[float], temperatures: Sequence[float] | None, ks: Sequence[int] | None
) -> None:
    """ValueError naming the first bad grid value (before any model run)."""
    for k in ks or []:
        if not isinstance(k, int) or not 0 < k <= searched:
            raise ValueError(
                f"k={k!r} must be an integer in [1, {searched}] (the k searched once for the cache)."
            )
    for lmbda in lmbdas:
        check_knn_args(1, lmbda, 1.0)
    for temperature in temperatures or []:
        check_knn_args(1, 0.0, temperature)


def sweep(
    cache: ScoredBatch, lmbdas: Sequence[float], temperatures: Sequence[float], ks: Sequence[int]
) -> list[dict[str, float | int]]:
    """Perplexity of the kNN-LM at every (k, temperature, lmbda), from the cache only.

    Returns:
        `list[dict]`: one ``{"k", "temperature", "lmbda", "knn_ppl"}`` per point.
    """
    check_grid(cache.distances.shape[1], lmbdas, temperatures, ks)
    n = len(cache.targets)
    points = []
    for k in ks:
        for temperature in temperatures:
            knn = cached_knn_log_probs(cache, temperature, k)
            for lmbda in lmbdas:
                nll = -interpolate(cache.lm_log_probs, knn, lmbda).double().sum().item()
                points.append(
                    {"k": k, "temperature": temperature, "lmbda": lmbda, "knn_ppl": math.exp(nll / n)}
                )
    return points


def base_perplexity(cache: ScoredBatch) -> float:
    return math.exp(-cache.lm_log_probs.double().sum().item() / len(cache.targets))


def best_point(points: Sequence[dict]) -> dict:
    return min(points, key=lambda p: p["knn_ppl"])


def sweep_result(
    cache: ScoredBatch,
    *,
    lmbdas: Sequence[float] = DEFAULT_LMBDAS,
    temperatures: Sequence[float] | None = None,
    temperature_multiples: Sequence[float] = DEFAULT_TEMPERATURE_MULTIPLES,
    ks: Sequence[int] | None = None,
) -> dict:
    """Sweep the grid (temperatures from the distance scale unless given) and summarise it."""
    searched = cache.distances.shape[1]
    if ks is None:
        ks = sorted({k for k in DEFAULT_KS if k < searched} | {searched})
    if temperatures is None:
        temperatures = temperature_grid(cache, temperature_multiples)
    points = sweep(cache, lmbdas, temperatures, ks)
    return {
        "base_ppl": base_perplexity(cache),
        "num_tokens": len(cache.targets),
        "k_searched": searched,
        "median_nn_distance": median_nn_distance(cache),
        "best": best_point(points),
        "points": points,
    }


def tune(
    model: torch.nn.Module,
    tokenizer,
    data: CorpusLike,
    datastore: Datastore,
    output_dir: str | os.PathLike,
    *,
    k: int = 1024,
    ks: Sequence[int] | None = None,
    lmbdas: Sequence[float] = DEFAULT_LMBDAS,
    temperatures: Sequence[float] | None = None,
    temperature_multiples: Sequence[float] = DEFAULT_TEMPERATURE_MULTIPLES,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    recompute_dists: bool = False,
    text_column: str = "text",
    max_tokens: int | None = None,
    max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
    disable_progress: bool | None = None,
) -> dict:
    """Cache one pass over ``data``, sweep lmbda x temperature x k, write JSON + PNG to ``output_dir``.

    Returns:
        `dict` with ``base_ppl``, ``best`` (``k``, ``temperature``, ``lmbda``, ``knn_ppl``), every
        point under ``points``, and the paths under ``json`` / ``plot``.
    """
    check_grid(datastore.clamp_k(k), lmbdas, temperatures, ks)
    max_length, stride = window_settings(max_length, stride, recorded_windows(datastore))
    cache = build_tuning_cache(
        model,
        tokenizer,
        data,
        datastore,
        k=k,
        max_length=max_length,
        stride=stride,
        batch_size=batch_size,
        recompute_dists=recompute_dists,
        text_column=text_column,
        max_tokens=max_tokens,
        max_cache_bytes=max_cache_bytes,
        disable_progress=disable_progress,
    )
    result = sweep_result(
        cache, lmbdas=lmbdas, temperatures=temperatures, temperature_multiples=temperature_multiples, ks=ks
    )
    result["settings"] = {
        "max_length": max_length,
        "stride": stride,
        "recompute_dists": recompute_dists,
        "index_factory": datastore.config.index_factory,
        "nprobe": datastore.nprobe,
        "datastore": str(datastore.folder),
        "entries": len(datastore),
    }
    write_results(result, output_dir)
    return result


def write_results(result: dict, output_dir: str | os.PathLike) -> None:
    """``tune_results.json`` and ``tune_plot.png`` in ``output_dir`` (paths added to ``result``)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result["json"], result["plot"] = str(out / RESULTS_NAME), str(out / PLOT_NAME)
    atomic_write_json(out / RESULTS_NAME, result)
    plot_sweep(result, out / PLOT_NAME)
