"""Tuning lmbda, temperature and k of a kNN-LM from one forward pass and one neighbour search.

The cache is [`ScoredTokens`][hf_knnlm.knnlm.scored.ScoredTokens] over the whole tuning text: per scored
token, log p_LM(target) and its ``k`` nearest neighbours' squared L2 distances (float32) and values
(int32), so ``num_tokens * k * 8`` bytes, capped by ``max_cache_bytes``. Every
(lmbda, temperature, k' <= k) point is then computed from the cache alone, never re-running the model.

Squared L2 distances between FFN inputs of real models are large (hundreds to thousands for
SmolLM2), so a temperature of 1 makes p_kNN a one-hot on the nearest neighbour; the default grid is
therefore multiples of the median nearest-neighbour distance of the cache, plus a few plain values.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..datastore.datastore import Datastore
from ..lm.corpus import CorpusLike
from ..lm.forward import check_forward_args
from ..lm.windows import WindowSettings
from ..utils.files import atomic_write_json
from ..utils.outputs import Output
from .evaluation import recorded_windows, search_setup
from .mixture import interpolate, knn_target_log_probs
from .policies import PlainSearch
from .scored import ScoredTokens, gather_scored, iter_scored_batches, scored_tokens
from .settings import KNNSettings, settings_from
from .tuning_grid import TuningGrid
from .tuning_plot import plot_sweep

logger = logging.getLogger(__name__)

RESULTS_NAME, PLOT_NAME = "tune_results.json", "tune_plot.png"
PLAIN_TEMPERATURES = (1.0, 10.0)
_ROWS = 4096  # rows per softmax block: bounds the temporaries of a sweep point to ~_ROWS * k * 12 bytes


@dataclass
class TuningPoint(Output):
    k: int
    temperature: float
    lmbda: float
    knn_ppl: float


@dataclass
class TuningOutput(Output):
    """The result of [`tune`][hf_knnlm.tune] (also readable as a dict: ``result["best"]["lmbda"]``).

    Attributes:
        base_ppl: perplexity of the model alone on the tuning text.
        num_tokens: tokens scored (the text may be cut to fit ``max_cache_bytes``).
        k_searched: neighbours searched once per token.
        median_nn_distance: median squared L2 distance to the nearest neighbour (the temperature scale).
        best: the point of lowest perplexity; [`best_settings`][hf_knnlm.TuningOutput.best_settings] as a
            [`KNNSettings`][hf_knnlm.KNNSettings].
        points: every point of the grid.
        settings: the windows, search settings and store the cache was made with.
        json, plot: the files written (``tune_results.json``, ``tune_plot.png``).

    Examples:

    ```python
    >>> import json
    >>> from hf_knnlm.datastore.testing import tiny_datastore
    >>> from hf_knnlm import tune
    >>> text = ["The cat sat on the mat. The dog sat on the log."]
    >>> model, tokenizer, store = tiny_datastore("output-store", text)
    >>> result = tune(model, tokenizer, text, store, "output-tuning", k=4, lmbdas=[0.25, 0.5],
    ...               temperatures=[10.0], disable_progress=True)
    >>> result["best"]["lmbda"], result.best_settings.lmbda  # a dataclass that reads like a dict
    (0.5, 0.5)
    >>> len(result.points), result.k_searched, result.num_tokens  # 2 lmbdas x 1 temperature x ks (4)
    (2, 4, 13)
    >>> with open(result.json) as f:  # the same numbers, on disk
    ...     json.load(f)["best"]["knn_ppl"] == result.best.knn_ppl
    True
    ```
    """

    base_ppl: float
    num_tokens: int
    k_searched: int
    median_nn_distance: float
    best: TuningPoint
    points: list[TuningPoint]
    settings: dict[str, Any] = field(default_factory=dict)
    json: str | None = None
    plot: str | None = None
    title: str | None = None

    @property
    def best_settings(self) -> KNNSettings:
        """The best point as settings for every kNN-LM entry point."""
        return KNNSettings(k=self.best.k, lmbda=self.best.lmbda, temperature=self.best.temperature)


def build_tuning_cache(
    model: torch.nn.Module,
    tokenizer,
    data: CorpusLike,
    datastore: Datastore,
    *,
    settings: KNNSettings | None = None,
    windows: WindowSettings | None = None,
    text_column: str = "text",
    max_tokens: int | None = None,
    max_cache_bytes: int = TuningGrid.max_cache_bytes,
    disable_progress: bool | None = None,
    **overrides: Any,
) -> ScoredTokens:
    """One forward pass and one ``settings.k``-neighbour search over ``data``, kept in memory.

    The cache (``num_tokens * k * 8`` bytes) is cut to ``max_cache_bytes``: only the first
    ``max_cache_bytes // (8 k)`` targets are scored (with a warning). Other arguments are those of
    [`evaluate_perplexity`][hf_knnlm.evaluate_perplexity].
    """
    settings, windows = settings_from(settings, windows, overrides)
    settings = settings.replace(retomaton=None, gate=False).resolve(datastore)
    windows = windows.resolve(recorded_windows(datastore))
    max_targets = max_cache_bytes // (8 * settings.k)
    if max_targets < 1:
        raise ValueError(
            f"max_cache_bytes={max_cache_bytes} cannot hold one token's {settings.k} neighbours "
            f"({8 * settings.k} bytes)."
        )
    check_forward_args(model, windows.max_length, windows.stride, windows.batch_size)
    tokens = _fit_cache(
        scored_tokens(model, tokenizer, data, datastore, text_column, max_tokens), max_targets, settings.k
    )
    policy = PlainSearch(datastore, settings)
    batches = iter_scored_batches(
        model, tokens, datastore, policy, windows, disable_progress=disable_progress
    )
    parts = [_compact(b) for b in batches]
    # A sharded store: each rank scored its own windows; every rank sweeps the whole text's cache.
    sharded = datastore.sharded
    cache = ScoredTokens.cat(parts) if sharded is None else gather_scored(parts, sharded, settings.k)
    if not len(cache):
        raise ValueError("no scored tokens: the tuning text is empty.")
    return cache


def _fit_cache(tokens: np.ndarray, max_targets: int, k: int) -> np.ndarray:
    if len(tokens) - 1 > max_targets:
        logger.warning(
            "the tuning cache would take %d MB (%d tokens x k=%d x 8 bytes); scoring only the first %d "
            "tokens (raise max_cache_bytes / --max-cache-bytes or lower k to use more).",
            (len(tokens) - 1) * k * 8 >> 20,
            len(tokens) - 1,
            k,
            max_targets,
        )
        return tokens[: max_targets + 1]
    return tokens


def _compact(batch: ScoredTokens) -> ScoredTokens:
    batch.neighbours = batch.neighbours.compact()
    return batch


def median_nn_distance(cache: ScoredTokens) -> float:
    """Median squared L2 distance to the nearest neighbour: the scale of useful temperatures."""
    first = cache.neighbours.distances[:, 0]
    first = first[torch.isfinite(first)]
    if not len(first):
        raise ValueError("no token of the tuning text has a neighbour; is the datastore empty?")
    return float(np.median(first.numpy()))  # the mean of the middle two, unlike torch.median


def temperature_grid(
    cache: ScoredTokens,
    multiples: Sequence[float] = TuningGrid.temperature_multiples,
    plain: Sequence[float] = PLAIN_TEMPERATURES,
) -> list[float]:
    """``multiples`` x the median nearest-neighbour distance, plus the ``plain`` temperatures."""
    scale = median_nn_distance(cache)
    grid = {float(f"{m * scale:.6g}") for m in multiples if m * scale > 0} | {float(t) for t in plain}
    return sorted(grid)


def cached_knn_log_probs(cache: ScoredTokens, temperature: float, k: int) -> torch.Tensor:
    """log p_kNN(target) of every cached token with the first ``k`` neighbours, ``[n]``."""
    blocks = range(0, len(cache), _ROWS)
    return torch.cat(
        [
            knn_target_log_probs(
                cache.neighbours[i : i + _ROWS].truncate(k), cache.targets[i : i + _ROWS], temperature
            )
            for i in blocks
        ]
    )


def sweep(
    cache: ScoredTokens, lmbdas: Sequence[float], temperatures: Sequence[float], ks: Sequence[int]
) -> list[TuningPoint]:
    """Perplexity of the kNN-LM at every (k, temperature, lmbda), from the cache only."""
    TuningGrid(lmbdas=lmbdas, temperatures=temperatures, ks=ks).check_ks(cache.neighbours.k)
    n = len(cache)
    points = []
    for k in ks:
        for temperature in temperatures:
            knn = cached_knn_log_probs(cache, temperature, k)
            for lmbda in lmbdas:
                nll = -interpolate(cache.lm_log_probs, knn, lmbda).double().sum().item()
                points.append(TuningPoint(k, temperature, lmbda, math.exp(nll / n)))
    return points


def base_perplexity(cache: ScoredTokens) -> float:
    return math.exp(-cache.lm_log_probs.double().sum().item() / len(cache))


def sweep_result(cache: ScoredTokens, grid: TuningGrid | None = None, **overrides: Any) -> TuningOutput:
    """Sweep the grid (temperatures from the distance scale unless given) and summarise it."""
    grid = (grid or TuningGrid()).replace(**overrides)
    searched = cache.neighbours.k
    grid.check_ks(searched)
    temperatures = grid.temperatures or temperature_grid(cache, grid.temperature_multiples)
    points = sweep(cache, grid.lmbdas, temperatures, grid.ks_for(searched))
    return TuningOutput(
        base_ppl=base_perplexity(cache),
        num_tokens=len(cache),
        k_searched=searched,
        median_nn_distance=median_nn_distance(cache),
        best=min(points, key=lambda p: p.knn_ppl),
        points=points,
    )


def tune(
    model: torch.nn.Module,
    tokenizer,
    data: CorpusLike,
    datastore: Datastore,
    output_dir: str | os.PathLike,
    *,
    settings: KNNSettings | None = None,
    windows: WindowSettings | None = None,
    grid: TuningGrid | None = None,
    text_column: str = "text",
    max_tokens: int | None = None,
    disable_progress: bool | None = None,
    **overrides: Any,
) -> TuningOutput:
    """Cache one pass over ``data``, sweep lmbda x temperature x k, write JSON + PNG to ``output_dir``.

    Args:
        settings (`KNNSettings`, *optional*): ``k`` is the number of neighbours searched once (the
            sweep tries every k' <= k of the grid) and ``recompute_dists`` how they are searched.
        windows (`WindowSettings`, *optional*): the windows (default: the store's).
        grid (`TuningGrid`, *optional*): the lmbdas, temperatures and ks to try, and the cache cap.
        overrides: single fields of any of the three, e.g. ``k=256, lmbdas=[0.1, 0.3]``.

    Returns:
        [`TuningOutput`][hf_knnlm.TuningOutput]: ``base_ppl``, ``best`` (``k``, ``temperature``,
        ``lmbda``, ``knn_ppl``; as settings: ``best_settings``), every point, and the paths under
        ``json`` / ``plot``.

    Examples:

    ```python
    >>> from hf_knnlm.datastore.testing import tiny_datastore
    >>> from hf_knnlm import tune
    >>> text = ["The cat sat on the mat. The dog sat on the log."]
    >>> model, tokenizer, store = tiny_datastore("tune-store", text, seed=0)
    >>> result = tune(model, tokenizer, text, store, "tuning", k=8, lmbdas=[0.0, 0.5, 0.9], ks=[1, 8],
    ...               temperatures=[1.0, 10.0], disable_progress=True)
    >>> len(result.points)  # 3 lmbdas x 2 temperatures x 2 ks, from one search of k=8 per token
    12
    >>> all(p.knn_ppl == result.base_ppl for p in result.points if p.lmbda == 0.0)  # lmbda=0: the LM
    True
    >>> result.best.lmbda, result.best.knn_ppl < result.base_ppl  # the store holds this very text
    (0.9, True)
    >>> result.best_settings  # for every kNN-LM entry point
    KNNSettings(k=1, lmbda=0.9, temperature=1.0, recompute_dists=False, retomaton=None, gate=False)
    >>> result.json, result.plot
    ('tuning/tune_results.json', 'tuning/tune_plot.png')
    ```
    """
    grid_changes = {
        name: overrides.pop(name) for name in list(overrides) if name in TuningGrid.__dataclass_fields__
    }
    grid = (grid or TuningGrid()).replace(**grid_changes)
    settings, windows = settings_from(settings, windows, overrides)
    grid.check_ks(datastore.clamp_k(settings.k))
    windows = windows.resolve(recorded_windows(datastore))
    cache = build_tuning_cache(
        model,
        tokenizer,
        data,
        datastore,
        settings=settings,
        windows=windows,
        text_column=text_column,
        max_tokens=max_tokens,
        max_cache_bytes=grid.max_cache_bytes,
        disable_progress=disable_progress,
    )
    result = sweep_result(cache, grid)
    result.settings = {
        **windows.to_dict(),
        "recompute_dists": settings.recompute_dists,
        **search_setup(datastore),
        "grid": grid.to_dict(),
    }
    write_results(result, output_dir)
    return result


def write_results(result: TuningOutput, output_dir: str | os.PathLike) -> None:
    """``tune_results.json`` and ``tune_plot.png`` in ``output_dir`` (paths set on ``result``)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result.json, result.plot = str(out / RESULTS_NAME), str(out / PLOT_NAME)
    atomic_write_json(out / RESULTS_NAME, result.to_dict())
    plot_sweep(result, out / PLOT_NAME)


__all__ = ["TuningOutput", "TuningPoint", "build_tuning_cache", "sweep", "sweep_result", "tune"]
