"""``hf-knnlm tune`` (lmbda x temperature x k sweep from one cached pass) and ``hf-knnlm reindex``."""

from __future__ import annotations

import argparse
import json

from .tuning import DEFAULT_LMBDAS, DEFAULT_MAX_CACHE_BYTES, DEFAULT_TEMPERATURE_MULTIPLES


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


def cmd_tune(args: argparse.Namespace) -> None:
    from .cli import _load_data, _load_datastore, _load_model
    from .tuning import tune

    model, tokenizer = _load_model(args)
    result = tune(
        model,
        tokenizer,
        _load_data(args),
        _load_datastore(args),
        args.output_dir,
        k=args.k,
        ks=args.ks,
        lmbdas=args.lmbdas,
        temperatures=args.temperatures,
        temperature_multiples=args.temperature_multiples,
        max_length=args.max_length,
        stride=args.stride,
        batch_size=args.batch_size,
        recompute_dists=args.recompute_dists,
        text_column=args.text_column,
        max_tokens=args.max_tokens,
        max_cache_bytes=args.max_cache_mb << 20,
    )
    best = result["best"]
    print(
        json.dumps(
            {key: result[key] for key in ("base_ppl", "num_tokens", "median_nn_distance", "best")}, indent=2
        )
    )
    print(
        f"best: --k {best['k']} --lmbda {best['lmbda']} --temperature {best['temperature']} "
        f"(perplexity {result['base_ppl']:.3f} -> {best['knn_ppl']:.3f})"
    )
    print(f"wrote {result['json']} and {result['plot']}")


def cmd_reindex(args: argparse.Namespace) -> None:
    from .datastore import Datastore

    store = Datastore.from_pretrained(args.datastore)
    print(
        store.rebuild_index(
            args.index_factory, args.output, train_size=args.train_size, overwrite=args.overwrite
        )
    )


def register(sub) -> None:
    from .cli import _add_data_args, _add_knn_args, _add_model_args, _add_window_args

    p = sub.add_parser(
        "tune", help="Sweep lmbda x temperature x k from one cached pass over validation text."
    )
    _add_model_args(p)
    _add_data_args(p)
    _add_window_args(p)
    _add_knn_args(p)  # --k is the number of neighbours searched once; --lmbda/--temperature are unused
    p.add_argument(
        "--ks", type=_ints, default=None, help="k values to try, each <= --k (default 8,32,...,--k)."
    )
    p.add_argument("--lmbdas", type=_floats, default=list(DEFAULT_LMBDAS), help="lmbda values to try.")
    p.add_argument(
        "--temperatures",
        type=_floats,
        default=None,
        help="Temperatures to try (default: --temperature-multiples x median nearest distance, 1, 10).",
    )
    p.add_argument(
        "--temperature-multiples",
        type=_floats,
        default=list(DEFAULT_TEMPERATURE_MULTIPLES),
        help="Multiples of the median nearest-neighbour distance used as temperatures.",
    )
    p.add_argument("--max-tokens", type=int, default=None, help="Score only the first N tokens.")
    p.add_argument(
        "--max-cache-mb",
        type=int,
        default=DEFAULT_MAX_CACHE_BYTES >> 20,
        help="Cap of the neighbour cache (tokens x k x 8 bytes); default 1024 MB.",
    )
    p.add_argument("--output-dir", required=True, help="Folder for tune_results.json and tune_plot.png.")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("reindex", help="Copy a datastore with a new faiss index over the same keys.")
    p.add_argument("--datastore", required=True, help="Datastore folder or Hub repo id.")
    p.add_argument("--output", required=True, help="New datastore folder.")
    p.add_argument("--index-factory", required=True, help="faiss index factory, e.g. IVF1024,PQ64.")
    p.add_argument("--train-size", type=int, default=1_000_000, help="Keys sampled to train the index.")
    p.add_argument("--overwrite", action="store_true", help="Replace a finished datastore in --output.")
    p.set_defaults(func=cmd_reindex)
