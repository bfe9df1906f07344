"""Tuning lmbda, temperature and k of a kNN-LM from one forward pass and one neighbour search.

Per scored token the sweep needs log p_LM(target) and its ``k`` nearest neighbours' squared L2 distances
(float32) and values (int32), ``k * 8`` bytes. [`tune`][hf_knnlm.tune] sweeps every
(lmbda, temperature, k' <= k) point over each batch of them as the batch is scored and then drops it
(``tuning_stream.py``), so its memory does not grow with the text and the model runs once.
[`build_tuning_cache`][hf_knnlm.knnlm.tuning.build_tuning_cache] keeps them all instead
([`ScoredTokens`][hf_knnlm.knnlm.scored.ScoredTokens], ``num_tokens * k * 8`` bytes, capped), for
[`sweep`][hf_knnlm.knnlm.tuning.sweep] and [`sweep_result`][hf_knnlm.knnlm.tuning.sweep_result].

Squared L2 distances between FFN inputs of real models are large (hundreds to thousands for
SmolLM2), so a temperature of 1 makes p_kNN a one-hot on the nearest neighbour; the default grid is
therefore multiples of the median nearest-neighbour distance (of the first tokens of the text, for
``tune``), plus a few plain values.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
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
from .policies import PlainSearch
from .scored import ScoredTokens, gather_scored, iter_scored_batches, scored_tokens
from .settings import KNNSettings, settings_from
from .tuning_grid import TuningGrid
from .tuning_plot import plot_sweep
from .tuning_stream import (
    PLAIN_TEMPERATURES,
    SweepAccumulator,
    TuningPoint,
    median_distance,
    sample_rows,
    sweep_stream,
    temperatures_for,
)

logger = logging.getLogger(__name__)

RESULTS_NAME, PLOT_NAME = "tune_results.json", "tune_plot.png"
CACHE_BYTES = 1 << 29  # build_tuning_cache's cap: 512 MiB, 65,536 tokens at k 1024


@dataclass
class TuningOutput(Output):
    """The result of [`tune`][hf_knnlm.tune] (also readable as a dict: ``result["best"]["lmbda"]``).

    Attributes:
        base_ppl: perplexity of the model alone on the tuning text.
        num_tokens: tokens scored: every target of the text (of ``max_tokens``, when given).
        k_searched: neighbours searched once per token.
        median_nn_distance: median squared L2 distance to the nearest neighbour, the temperature scale:
            over the first ``max_cache_bytes // (8 k_searched)`` tokens for ``tune``, over the cache
            for ``sweep_result``.
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
    max_cache_bytes: int = CACHE_BYTES,
    disable_progress: bool | None = None,
    **overrides: Any,
) -> ScoredTokens:
    """One forward pass and one ``settings.k``-neighbour search over ``data``, kept in memory.

    The cache (``num_tokens * k * 8`` bytes) is cut to ``max_cache_bytes`` (512 MiB by default): only
    the first ``max_cache_bytes // (8 k)`` targets are scored (with a warning); [`tune`][hf_knnlm.tune]
    sweeps the whole text without keeping it. Other arguments are those of
    [`evaluate_perplexity`][hf_knnlm.evaluate_perplexity].
    """
    settings, windows = settings_from(settings, windows, overrides)
    settings, windows = _resolved(datastore, settings, windows)
    max_targets = sample_rows(max_cache_bytes, settings.k)
    check_forward_args(model, windows.max_length, windows.stride, windows.batch_size)
    tokens = _fit_cache(
        scored_tokens(model, tokenizer, data, datastore, text_column, max_tokens), max_targets, settings.k
    )
    parts = [
        _compact(b) for b in _search_batches(model, tokens, datastore, settings, windows, disable_progress)
    ]
    # A sharded store: each rank scored its own windows; every rank sweeps the whole text's cache.
    sharded = datastore.sharded
    cache = ScoredTokens.cat(parts) if sharded is None else gather_scored(parts, sharded, settings.k)
    if not len(cache):
        raise ValueError("no scored tokens: the tuning text is empty.")
    return cache


def _resolved(
    datastore: Datastore, settings: KNNSettings, windows: WindowSettings
) -> tuple[KNNSettings, WindowSettings]:
    settings = settings.replace(retomaton=None, gate=False).resolve(datastore)
    return settings, windows.resolve(recorded_windows(datastore))


def _search_batches(
    model: torch.nn.Module,
    tokens: np.ndarray,
    datastore: Datastore,
    settings: KNNSettings,
    windows: WindowSettings,
    disable_progress: bool | None,
) -> Iterator[ScoredTokens]:
    policy = PlainSearch(datastore, settings)
    return iter_scored_batches(model, tokens, datastore, policy, windows, disable_progress=disable_progress)


def _fit_cache(tokens: np.ndarray, max_targets: int, k: int) -> np.ndarray:
    if len(tokens) - 1 > max_targets:
        logger.warning(
            "the tuning cache would take %d MB (%d tokens x k=%d x 8 bytes); scoring only the first %d "
            "tokens (raise max_cache_bytes or lower k to use more; tune() sweeps the whole text).",
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
    return median_distance(cache.neighbours.distances[:, 0])


def temperature_grid(
    cache: ScoredTokens,
    multiples: Sequence[float] = TuningGrid.temperature_multiples,
    plain: Sequence[float] = PLAIN_TEMPERATURES,
) -> list[float]:
    """``multiples`` x the median nearest-neighbour distance, plus the ``plain`` temperatures."""
    return temperatures_for(median_nn_distance(cache), multiples, plain)


def sweep(
    cache: ScoredTokens, lmbdas: Sequence[float], temperatures: Sequence[float], ks: Sequence[int]
) -> list[TuningPoint]:
    """Perplexity of the kNN-LM at every (k, temperature, lmbda), from the cache only."""
    TuningGrid(lmbdas=lmbdas, temperatures=temperatures, ks=ks).check_ks(cache.neighbours.k)
    acc = SweepAccumulator(lmbdas, temperatures, ks)
    acc.add(cache)
    return acc.points()


def base_perplexity(cache: ScoredTokens) -> float:
    return math.exp(-cache.lm_log_probs.double().sum().item() / len(cache))


def sweep_result(cache: ScoredTokens, grid: TuningGrid | None = None, **overrides: Any) -> TuningOutput:
    """Sweep the grid (temperatures from the distance scale unless given) and summarise it."""
    grid = (grid or TuningGrid()).replace(**overrides)
    searched = cache.neighbours.k
    grid.check_ks(searched)
    temperatures = grid.temperatures or temperature_grid(cache, grid.temperature_multiples)
    acc = SweepAccumulator(grid.lmbdas, temperatures, grid.ks_for(searched))
    acc.add(cache)
    return _summary(acc, median_nn_distance(cache), searched)


def _summary(acc: SweepAccumulator, scale: float, searched: int) -> TuningOutput:
    points = acc.points()
    return TuningOutput(
        base_ppl=acc.base_ppl(),
        num_tokens=acc.count,
        k_searched=searched,
        median_nn_distance=scale,
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
    """Sweep lmbda x temperature x k over one pass over ``data``, write JSON + PNG to ``output_dir``.

    The model runs and the store is searched once per batch of windows; every point of the grid is
    summed over each batch, which is then dropped, so the whole text is scored and memory does not grow
    with it. Default temperatures are multiples of the median nearest-neighbour distance of the first
    ``grid.max_cache_bytes // (8 k)`` tokens, whose batches are held until they have all been scored;
    a text shorter than that gives what ``sweep_result`` (``hf_knnlm.knnlm.tuning``) gives on its
    whole cache. On a sharded store with default temperatures each rank holds its share of the
    text's neighbours until the end (the first tokens are another rank's); explicit ``temperatures``
    stream there too.

    Args:
        settings (`KNNSettings`, *optional*): ``k`` is the number of neighbours searched once (the
            sweep tries every k' <= k of the grid) and ``recompute_dists`` how they are searched.
        windows (`WindowSettings`, *optional*): the windows (default: the store's).
        grid (`TuningGrid`, *optional*): the lmbdas, temperatures and ks to try, and the bytes held to
            set the temperature scale (``max_cache_bytes``).
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
    settings, windows = _resolved(datastore, settings, windows)
    grid.check_ks(settings.k)
    sample_rows(grid.max_cache_bytes, settings.k)  # checked before the model runs
    check_forward_args(model, windows.max_length, windows.stride, windows.batch_size)
    tokens = scored_tokens(model, tokenizer, data, datastore, text_column, max_tokens)
    batches = _search_batches(model, tokens, datastore, settings, windows, disable_progress)
    acc, scale = sweep_stream(batches, grid, settings.k, datastore.sharded)
    result = _summary(acc, scale, settings.k)
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
