"""``hf-knnlm tune``: a lmbda x temperature x k sweep from one cached pass over validation text."""

from __future__ import annotations

import argparse
import json

from ._common import (
    add_data_args,
    add_knn_args,
    add_model_args,
    add_window_args,
    check_data_args,
    knn_settings,
    load_data,
    load_datastore,
    load_model,
    window_settings,
)
from ._options import add_dataclass_options, dataclass_from_args

# --k is the number of neighbours searched once; the sweep tries lmbda, temperature and k' <= k.
SEARCH_FIELDS = ("k", "recompute_dists")


def run(args: argparse.Namespace) -> int:
    from ..knnlm.tuning import tune
    from ..knnlm.tuning_grid import TuningGrid

    settings, windows = knn_settings(args), window_settings(args)
    grid = dataclass_from_args(args, TuningGrid)
    grid.check_ks(settings.k)  # before any forward pass
    check_data_args(args)
    store = load_datastore(args)
    model, tokenizer = load_model(args)
    result = tune(
        model,
        tokenizer,
        load_data(args),
        store,
        args.output_dir,
        settings=settings,
        windows=windows,
        grid=grid,
        text_column=args.text_column,
        max_tokens=args.max_tokens,
    )
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
        "tune", help="Sweep lmbda x temperature x k from one cached pass over validation text."
    )
    add_model_args(p)
    add_data_args(p)
    add_window_args(p)
    add_knn_args(p, only=SEARCH_FIELDS)
    add_dataclass_options(p.add_argument_group("grid"), TuningGrid)
    p.add_argument(
        "--max-tokens", type=int, default=None, help="Score only the first N tokens (default: all)."
    )
    p.add_argument("--output-dir", required=True, help="Folder for tune_results.json and tune_plot.png.")
    p.set_defaults(func=run)
