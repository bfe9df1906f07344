"""``hf-knnlm tune``: a lmbda x temperature x k sweep from one cached pass over validation text."""

from __future__ import annotations

import argparse
import json

from ..knnlm.tuning_grid import TuningGrid
from ._common import (
    add_data_args,
    add_knn_args,
    add_model_args,
    add_window_args,
    load_data,
    load_datastore,
    load_model,
)


def _number_list(cast: type, what: str):
    """An argparse type for comma-separated numbers, e.g. ``--lmbdas 0.1,0.25``."""

    def parse(text: str) -> list:
        try:
            return [cast(v) for v in text.split(",") if v.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}") from err

    return parse


_floats = _number_list(float, "numbers")
_ints = _number_list(int, "integers")


def run(args: argparse.Namespace) -> int:
    from ..knnlm.tuning import tune

    model, tokenizer = load_model(args)
    result = tune(
        model,
        tokenizer,
        load_data(args),
        load_datastore(args),
        args.output_dir,
        k=args.k,
        recompute_dists=args.recompute_dists,
        ks=args.ks,
        lmbdas=args.lmbdas,
        temperatures=args.temperatures,
        temperature_multiples=args.temperature_multiples,
        max_length=args.max_length,
        stride=args.stride,
        batch_size=args.batch_size,
        text_column=args.text_column,
        max_tokens=args.max_tokens,
        max_cache_bytes=args.max_cache_mb << 20,
    )
    best = result["best"]
    summary = result.to_dict()
    print(
        json.dumps(
            {key: summary[key] for key in ("base_ppl", "num_tokens", "median_nn_distance", "best")}, indent=2
        )
    )
    print(
        f"best: --k {best['k']} --lmbda {best['lmbda']} --temperature {best['temperature']} "
        f"(perplexity {result['base_ppl']:.3f} -> {best['knn_ppl']:.3f})"
    )
    print(f"wrote {result['json']} and {result['plot']}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tune", help="Sweep lmbda x temperature x k from one cached pass over validation text."
    )
    add_model_args(p)
    add_data_args(p)
    add_window_args(p, from_datastore=True)
    add_knn_args(p)  # --k is the number of neighbours searched once; --lmbda/--temperature are unused
    p.add_argument(
        "--ks", type=_ints, default=None, help="k values to try, each <= --k (default 8,32,...,--k)."
    )
    p.add_argument("--lmbdas", type=_floats, default=list(TuningGrid.lmbdas), help="lmbda values to try.")
    p.add_argument(
        "--temperatures",
        type=_floats,
        default=None,
        help="Temperatures to try (default: --temperature-multiples x median nearest distance, 1, 10).",
    )
    p.add_argument(
        "--temperature-multiples",
        type=_floats,
        default=list(TuningGrid.temperature_multiples),
        help="Multiples of the median nearest-neighbour distance used as temperatures.",
    )
    p.add_argument("--max-tokens", type=int, default=None, help="Score only the first N tokens.")
    p.add_argument(
        "--max-cache-mb",
        type=int,
        default=TuningGrid.max_cache_bytes >> 20,
        help="Cap of the neighbour cache (tokens x k x 8 bytes); default 1024 MB.",
    )
    p.add_argument("--output-dir", required=True, help="Folder for tune_results.json and tune_plot.png.")
    p.set_defaults(func=run)
