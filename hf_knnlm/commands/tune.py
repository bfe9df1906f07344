"""``hf-knnlm tune``: a lmbda x temperature x k sweep from one pass over validation text."""

from __future__ import annotations

import argparse
import json

from ._common import add_scoring_args, load_scoring
from ._options import add_dataclass_options, dataclass_from_args

# --k is the number of neighbours searched once; the sweep tries lmbda, temperature and k' <= k.
SEARCH_FIELDS = ("k", "recompute_dists")


def run(args: argparse.Namespace) -> int:
    from ..knnlm.tuning import tune
    from ..knnlm.tuning_grid import TuningGrid

    grid = dataclass_from_args(args, TuningGrid)
    inputs, keywords = load_scoring(args, check=lambda settings: grid.check_ks(settings.k))
    result = tune(*inputs, args.output_dir, grid=grid, **keywords)
    summary = result.to_dict()
    print(
        json.dumps(
            {key: summary[key] for key in ("base_ppl", "num_tokens", "median_nn_distance", "best")}, indent=2
        )
    )
    best = result.best
    print(
        f"best: --k {best.k} --lmbda {best.lmbda} --temperature {best.temperature} "
        f"(perplexity {result.base_ppl:.3f} -> {best.knn_ppl:.3f})"
    )
    print(f"wrote {result.json} and {result.plot}")
    return 0


def register(subparsers) -> None:
    from ..knnlm.tuning_grid import TuningGrid

    p = subparsers.add_parser(
        "tune", help="Sweep lmbda x temperature x k from one pass over validation text."
    )
    add_scoring_args(p, knn_fields=SEARCH_FIELDS)
    add_dataclass_options(p.add_argument_group("grid"), TuningGrid)
    p.add_argument("--output-dir", required=True, help="Folder for tune_results.json and tune_plot.png.")
    p.set_defaults(func=run)
