"""The picture of a tuning sweep: perplexity against lmbda, one line per temperature, one panel per k."""

from __future__ import annotations

import os

from ..utils.files import atomic_path


def plot_sweep(result: dict, path: str | os.PathLike) -> None:
    """PNG: perplexity against lmbda, one line per temperature, one panel per k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({p["k"] for p in result["points"]})
    temperatures = sorted({p["temperature"] for p in result["points"]})
    best = result["best"]
    ncols = min(3, len(ks))
    nrows = -(-len(ks) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3 * nrows), sharey=True, squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax in axes.flat[len(ks) :]:
        ax.set_visible(False)
    for ax, k in zip(axes.flat, ks, strict=False):
        for i, temperature in enumerate(temperatures):
            pts = sorted(
                (p for p in result["points"] if p["k"] == k and p["temperature"] == temperature),
                key=lambda p: p["lmbda"],
            )
            ax.plot(
                [p["lmbda"] for p in pts],
                [p["knn_ppl"] for p in pts],
                marker=".",
                lw=1,
                color=cmap(i / max(1, len(temperatures) - 1)),
                label=f"T={temperature:.4g}",
            )
        ax.axhline(result["base_ppl"], color="gray", ls="--", lw=1, label="base LM")
        if best["k"] == k:
            ax.plot([best["lmbda"]], [best["knn_ppl"]], "r*", ms=10, label="best")
        ax.set_title(f"k={k}", fontsize=9)
        ax.set_xlabel("lmbda")
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("perplexity")
    # Zoom on the useful region: from the best point to a little above the base LM.
    low, base = min(p["knn_ppl"] for p in result["points"]), result["base_ppl"]
    axes[0][0].set_ylim(low - 0.1 * (base - low) - 0.01 * base, base + 0.6 * (base - low) + 0.02 * base)
    axes.flat[len(ks) - 1].legend(fontsize=6, loc="upper right")
    fig.suptitle(result.get("title") or "kNN-LM tuning sweep", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


__all__ = ["plot_sweep"]
