"""Draw the plots of the benchmark results page (docs/benchmarks/plots/) from the numbers in its tables.

    python bench/docs_plots.py

The numbers are those of docs/benchmarks/index.md (State of the Union, 1,896,418-entry store;
Tiny Shakespeare whole test slice); change both together.
"""

from __future__ import annotations

import argparse

import matplotlib
from _common import REPO

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OUT = REPO / "docs" / "benchmarks" / "plots"
COLOURS = plt.get_cmap("tab10")

# RetoMaton: (searches saved %, perplexity vs full kNN-LM %) for thresholds 4, 8, 16, 32, 64.
RETOMATON = {
    "pointers + IVF-list top-up": [(73.0, 0.78), (65.2, 0.75), (56.4, 0.49), (46.4, 0.34), (35.4, 0.23)],
    "pointers alone": [(52.4, 2.81), (47.3, 2.29), (41.8, 1.63), (35.9, 1.26), (28.9, 0.91)],
}
# Adaptive retrieval: (share skipped %, perplexity vs full kNN-LM %) at asked shares 30, 50, 60, 70%.
ADAPTIVE = {
    "gate: LM features + query": [(28.0, -0.14), (48.2, 0.26), (58.0, 0.48), (68.5, 0.80)],
    "gate: LM features": [(31.4, 0.64), (51.7, 1.29), (62.3, 1.73), (71.9, 2.10)],
    "skip the lowest LM entropy": [(30, 0.10), (50, 0.71), (60, 1.13), (70, 1.65)],
    "skip at random": [(30, 1.16), (50, 1.72), (60, 2.31), (70, 2.71)],
}
# Retrieval-augmented LMs on Tiny Shakespeare: (wall time per token vs base, perplexity vs base %).
RAG = {
    "kNN-LM": (1.9, -9.5),
    "In-Context RALM, BM25": (31.3, -2.0),
    "In-Context RALM, dense": (36.9, -2.9),
    "REPLUG k=4, dense": (109.7, -5.6),
    "kNN-LM + In-Context RALM, BM25": (33.1, -10.1),
}


def _save(fig, name: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(OUT / name, dpi=110)
    plt.close(fig)


def tradeoff(series: dict, title: str, xlabel: str, name: str, target: tuple[float, float]) -> None:
    """Lines of (saved share, cost) with the target region (at least x saved at most y cost) shaded."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.fill_between([target[0], 100], -10, target[1], color="#e9f6ec", zorder=0)
    ax.text(
        79,
        target[1] - 0.08,
        f"target: ≥ {target[0]:g}% saved at ≤ +{target[1]:g}%",
        fontsize=8,
        color="#2f7d46",
        ha="right",
        va="top",
    )
    for i, (label, points) in enumerate(series.items()):
        ax.plot(*zip(*points, strict=True), marker="os^D"[i % 4], color=COLOURS(i), label=label)
    ax.axhline(0, color="gray", lw=0.8)
    costs = [cost for points in series.values() for _, cost in points]
    ax.set(
        xlabel=xlabel,
        ylabel="perplexity vs full kNN-LM (%)",
        title=title,
        xlim=(20, 80),
        ylim=(min(costs + [0]) - 0.3, max(costs) + 0.3),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    _save(fig, name)


def rag() -> None:
    """Each method as one point, labelled next to it (a legend would hide the lower-right points)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, (label, (cost, change)) in enumerate(RAG.items()):
        ax.scatter(cost, change, s=60, color=COLOURS(i), zorder=3)
        ax.annotate(
            label,
            (cost, change),
            xytext=(0, 8 if change > -9 else -14),
            textcoords="offset points",
            ha="center" if cost < 50 else "right",
            fontsize=8,
            color=COLOURS(i),
        )
    ax.set_xscale("log")
    ax.set_xticks([1, 3, 10, 30, 100], ["1×", "3×", "10×", "30×", "100×"])
    ax.axhline(0, color="gray", lw=0.8)
    ax.set(
        xlabel="wall time per token vs the base model (log scale)",
        ylabel="perplexity vs base (%)",
        title="SmolLM2-135M on Tiny Shakespeare: gain and cost",
        xlim=(1, 200),
        ylim=(-12, 1),
    )
    ax.grid(alpha=0.3)
    _save(fig, "rag.png")


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help; no options
    tradeoff(
        RETOMATON,
        "RetoMaton, 1.9M-entry store (thresholds 64 … 4)",
        "searches saved (%)",
        "retomaton.png",
        (50, 1),
    )
    tradeoff(
        ADAPTIVE, "Adaptive retrieval, 1.9M-entry store", "searches skipped (%)", "adaptive.png", (50, 1)
    )
    rag()


if __name__ == "__main__":
    main()
