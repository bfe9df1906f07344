"""The picture of a tuning sweep (``tune_plot.png``): what lmbda, temperature and k do to perplexity.

Two panels, whatever the grid: perplexity against lmbda at the best k (one line per temperature), and
the best perplexity over lmbda against k (the same lines). Temperatures get colours from a qualitative
palette (tab10, tab20 past ten) and markers, so that neighbouring values can be told apart, and one
legend, right of the panels, names them, with each temperature as a multiple of the median
nearest-neighbour distance where it is one (the default grid is made of such multiples).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..utils.files import atomic_path

_MARKERS = "os^Dv<>pP*Xh"


def _temperature_label(temperature: float, median: float | None) -> str:
    """``T=2.401 (0.2 m)`` when the temperature is a round multiple of the median distance ``m``."""
    label = f"T={temperature:.4g}"
    if median:
        ratio = temperature / median
        if abs(ratio - float(f"{ratio:.2g}")) < 1e-3 * ratio:
            label += f" ({float(f'{ratio:.2g}'):g} m)"
    return label


def _colours(n: int) -> list:
    import matplotlib

    palette = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [palette(i % palette.N) for i in range(n)]


def _points(result: dict, **where) -> list[dict]:
    return [p for p in result["points"] if all(p[key] == value for key, value in where.items())]


def sweep_figure(result: dict, title: str | None = None):
    """The matplotlib ``Figure`` of a sweep result (the dict [`tune`][hf_knnlm.tune] returns).

    Examples:

    ```python
    >>> from hf_knnlm.knnlm.tuning_plot import sweep_figure
    >>> points = [
    ...     {"k": k, "temperature": t, "lmbda": l, "knn_ppl": 20 - 10 * l + 20 * l * l - t / 10 + 8 / k}
    ...     for k in (8, 64) for t in (1.0, 3.0) for l in (0.1, 0.25, 0.5)
    ... ]
    >>> best = min(points, key=lambda p: p["knn_ppl"])
    >>> fig = sweep_figure({"points": points, "best": best, "base_ppl": 20.0, "median_nn_distance": 3.0})
    >>> [ax.get_xlabel() for ax in fig.axes]
    ['lmbda', 'k (neighbours)']
    >>> [text.get_text() for text in fig.legends[0].get_texts()]  # T = 3 is 1 x the median m
    ['T=1', 'T=3 (1 m)', 'base LM', 'best']
    ```
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temperatures = sorted({p["temperature"] for p in result["points"]})
    ks = sorted({p["k"] for p in result["points"]})
    best, base = result["best"], result["base_ppl"]
    fig, (by_lmbda, by_k) = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    median = result.get("median_nn_distance")
    for i, (temperature, colour) in enumerate(zip(temperatures, _colours(len(temperatures)), strict=True)):
        style = dict(
            color=colour,
            marker=_MARKERS[i % len(_MARKERS)],
            ms=4,
            lw=2.2 if temperature == best["temperature"] else 1.2,
            label=_temperature_label(temperature, median),
        )
        line = sorted(_points(result, k=best["k"], temperature=temperature), key=lambda p: p["lmbda"])
        by_lmbda.plot([p["lmbda"] for p in line], [p["knn_ppl"] for p in line], **style)
        per_k = [min(q["knn_ppl"] for q in _points(result, k=k, temperature=temperature)) for k in ks]
        by_k.plot(ks, per_k, **{**style, "label": None})
    for ax in (by_lmbda, by_k):
        ax.axhline(base, color="gray", ls="--", lw=1, label="base LM" if ax is by_lmbda else None)
        ax.grid(alpha=0.3)
    by_lmbda.plot([best["lmbda"]], [best["knn_ppl"]], "k*", ms=12, label="best", zorder=5)
    by_k.plot([best["k"]], [best["knn_ppl"]], "k*", ms=12, zorder=5)
    by_lmbda.set(xlabel="lmbda", ylabel="perplexity", title=f"at the best k = {best['k']}")
    by_k.set(xlabel="k (neighbours)", title="best lmbda for each k")
    if len(ks) > 1:
        by_k.set_xscale("log", base=2)
    by_k.set_xticks(ks, [str(k) for k in ks])
    _zoom(by_lmbda, [p["knn_ppl"] for p in result["points"]], base)
    fig.legend(
        loc="center left", bbox_to_anchor=(0.80, 0.5), fontsize=8, title="temperature T", frameon=False
    )
    headline = (
        f"best: k={best['k']}, T={best['temperature']:.4g}, lmbda={best['lmbda']:g}: "
        f"perplexity {best['knn_ppl']:.3f} (base LM {base:.3f})"
    )
    fig.suptitle(f"{title or result.get('title') or 'kNN-LM tuning sweep'}\n{headline}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.80, 1))
    return fig


def _zoom(ax, values: Sequence[float], base: float) -> None:
    """From a little below the best point to a little above the base LM: the region a choice is made in."""
    low = min(values)
    span = max(base - low, 0.01 * base)
    ax.set_ylim(low - 0.15 * span, base + 0.6 * span)


def plot_sweep(result: dict, path: str | os.PathLike, title: str | None = None) -> None:
    """Write the PNG of [`sweep_figure`][hf_knnlm.knnlm.tuning_plot.sweep_figure] to ``path``
    (atomically: a temporary sibling, then a rename).

    Examples:

    ```python
    >>> from hf_knnlm.knnlm.tuning_plot import plot_sweep
    >>> points = [{"k": 8, "temperature": 1.0, "lmbda": l, "knn_ppl": 20 - 8 * l} for l in (0.1, 0.5)]
    >>> plot_sweep({"points": points, "best": points[0], "base_ppl": 20.0}, "tune_plot.png")
    >>> open("tune_plot.png", "rb").read(8)
    b'\\x89PNG\\r\\n\\x1a\\n'
    ```
    """
    import matplotlib.pyplot as plt

    fig = sweep_figure(result, title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
