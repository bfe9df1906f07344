"""Quality benchmark: SmolLM2-135M-Instruct + kNN-LM on WikiText-2 and Tiny Shakespeare (offline).

For each corpus: build a Flat datastore, re-index its keys as IVFPQ (no second model run), tune
lmbda x temperature x k on a held-out slice from one cached pass, then run the model once over the
test text and search each index with the tuned setting: Flat, IVFPQ, IVFPQ + exact recompute.

    PYTHONPATH=. nice -n 10 python bench/quality.py --quick      # a few minutes
    PYTHONPATH=. nice -n 10 python bench/quality.py              # the full run (~30 min on 2 cores)

Not part of the test suite. Text comes from ``../shared/data`` (or ``$HF_KNNLM_SHARED_DATA``).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import faiss
import torch
from _common import REPO, Stopwatch, cached_store, corpus_splits, load_smollm2, timed

from hf_knnlm import Datastore
from hf_knnlm.datastore.neighbours import Neighbours
from hf_knnlm.knnlm.scored import ScoredTokens, collect_queries
from hf_knnlm.knnlm.tuning import base_perplexity, sweep, sweep_result, write_results

MAX_LENGTH, STRIDE, BATCH_SIZE = 512, 448, 4
NPROBE = 32


def ivfpq_factory(num_entries: int) -> str:
    """IVF with ~4 sqrt(N) lists (a power of two, at most 1024), 64 PQ bytes per key (576 / 64 = 9 dims)."""
    nlist = 2 ** round(math.log2(4 * math.sqrt(num_entries)))
    return f"IVF{min(1024, max(64, nlist))},PQ64"


def get_store(model, tokenizer, text: str, folder: Path, rebuild: bool) -> tuple[Datastore, float]:
    """The Flat datastore of ``text`` in ``folder`` (built once) and the seconds building it took."""

    def build():
        shutil.rmtree(folder, ignore_errors=True)
        return Datastore.build(
            model, tokenizer, [text], folder, max_length=MAX_LENGTH, stride=STRIDE, batch_size=BATCH_SIZE
        )

    return cached_store(folder, build, rebuild=rebuild)


def run_corpus(model, tokenizer, name: str, args) -> dict:
    t0 = time.time()
    times = {}
    splits = corpus_splits(name, args.quick, args.store_chars)
    work = Path(args.workdir) / ("quick" if args.quick else "full") / name
    flat, times["build_flat_s"] = get_store(model, tokenizer, splits["store"], work / "flat", args.rebuild)
    print(f"[{name}] {flat}", flush=True)

    factory = ivfpq_factory(len(flat))
    ivf_dir = work / factory.replace(",", "_")
    ivf, times["reindex_ivfpq_s"] = cached_store(
        ivf_dir,
        lambda: flat.rebuild_index(factory, ivf_dir, train_size=args.train_size, overwrite=True),
        rebuild=args.rebuild,
        nprobe=NPROBE,
    )

    windows = dict(max_length=MAX_LENGTH, stride=STRIDE, batch_size=BATCH_SIZE)
    tune_queries, times["tune_forward_s"] = timed(
        collect_queries, model, tokenizer, [splits["tune"]], flat, max_tokens=args.tune_tokens + 1, **windows
    )
    cache, times["tune_search_s"] = timed(tune_queries.search, flat, args.k)
    del tune_queries
    with Stopwatch() as clock:
        tuned = sweep_result(cache, ks=[k for k in args.ks if k <= args.k])
        tuned.title = f"{name}: SmolLM2-135M kNN-LM sweep ({tuned['num_tokens']:,} tuning tokens, Flat)"
        write_results(tuned, work / "tune")
        if args.plot_dir:
            shutil.copyfile(work / "tune" / "tune_plot.png", Path(args.plot_dir) / f"quality_{name}.png")
    times["sweep_s"] = clock.seconds
    best = tuned.best.to_dict()
    del cache
    print(
        f"[{name}] tuned on {tuned['num_tokens']} tokens: base {tuned['base_ppl']:.3f} best {best}",
        flush=True,
    )

    test, times["test_forward_s"] = timed(
        collect_queries, model, tokenizer, [splits["test"]], flat, max_tokens=args.test_tokens + 1, **windows
    )
    setting = ([best["lmbda"]], [best["temperature"]], [best["k"]])
    result = {
        "corpus": name,
        "store_entries": len(flat),
        "ivfpq": factory,
        "nprobe": NPROBE,
        "tune_tokens": tuned["num_tokens"],
        "test_tokens": len(test.targets),
        "median_nn_distance": tuned["median_nn_distance"],
        "best": best,
    }
    t = time.time()
    cache = test.search(flat, best["k"])
    result["base_ppl"] = base_perplexity(cache)
    for label, store, recompute in (
        ("flat", flat, False),
        ("ivfpq", ivf, False),
        ("ivfpq_recompute", ivf, True),
    ):
        t = t if label == "flat" else time.time()
        if label != "flat":
            cache = test.search(store, best["k"], recompute)
        result[f"knn_ppl_{label}"] = sweep(cache, *setting)[0]["knn_ppl"]
        times[f"test_search_{label}_s"] = time.time() - t
    if args.scaling:
        result["scaling"], times["scaling_s"] = timed(store_scaling, flat, test, best)
    result["times"] = {key: round(v, 1) for key, v in times.items()}
    result["wall_s"] = round(time.time() - t0, 1)
    print(f"[{name}] {json.dumps(result)}", flush=True)
    return result


def store_scaling(flat: Datastore, test: ScoredTokens, best: dict, fractions=(0.125, 0.25, 0.5, 1.0)) -> list:
    """Test perplexity at the tuned setting with the datastore cut to its first entries (exact search)."""
    points = []
    for fraction in fractions:
        n = int(len(flat) * fraction)
        index = faiss.IndexFlatL2(flat.hidden_size)
        for start in range(0, n, 65536):
            index.add(flat.keys.take(range(start, min(n, start + 65536))).astype("float32"))
        k = min(best["k"], n)
        distances, ids = index.search(test.queries.numpy(), k)
        found = Neighbours.from_ids(flat, torch.from_numpy(distances), torch.from_numpy(ids))
        cache = ScoredTokens(test.lm_log_probs, test.targets, neighbours=found)
        ppl = sweep(cache, [best["lmbda"]], [best["temperature"]], [k])[0]["knn_ppl"]
        points.append({"entries": n, "knn_ppl": ppl})
        print(f"  store prefix {n:>8,} entries: kNN-LM ppl {ppl:.3f}", flush=True)
    return points


def table(results: list[dict]) -> str:
    rows = [
        "| corpus | store entries | test tokens | base ppl | kNN-LM Flat | kNN-LM IVFPQ | IVFPQ + recompute "
        "| best lmbda / T / k | wall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        b = r["best"]
        change = 100 * (r["knn_ppl_flat"] / r["base_ppl"] - 1)
        gap = 100 * (r["knn_ppl_ivfpq_recompute"] / r["knn_ppl_flat"] - 1)
        rows.append(
            f"| {r['corpus']} | {r['store_entries']:,} | {r['test_tokens']:,} | {r['base_ppl']:.3f} "
            f"| {r['knn_ppl_flat']:.3f} ({change:+.1f}%) "
            f"| {r['knn_ppl_ivfpq']:.3f} ({r['ivfpq']}, nprobe {r['nprobe']}) "
            f"| {r['knn_ppl_ivfpq_recompute']:.3f} ({gap:+.2f}% vs Flat) "
            f"| {b['lmbda']} / {b['temperature']:.4g} / {b['k']} | {r['wall_s']:.0f} s |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="15%% of the datastore text, short tune/test slices."
    )
    parser.add_argument("--corpus", nargs="+", default=["wikitext2", "shakespeare"])
    parser.add_argument("--workdir", default=str(REPO / "runs" / "quality"))
    parser.add_argument(
        "--rebuild", action="store_true", help="Rebuild datastores even if cached in --workdir."
    )
    parser.add_argument(
        "--k", type=int, default=None, help="Neighbours searched for tuning (default 1024; quick 256)."
    )
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32, 128, 256, 512, 1024])
    parser.add_argument(
        "--tune-tokens",
        type=int,
        default=None,
        help="Tuning tokens (default 16000; quick 2000).",
    )
    parser.add_argument(
        "--test-tokens", type=int, default=None, help="Test tokens (default 20000; quick 4000)."
    )
    parser.add_argument(
        "--store-chars",
        type=int,
        default=None,
        help="Build the datastore from the first ~N characters of its text only (default: all of it).",
    )
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="Also score the test text with 1/8, 1/4, 1/2 of the Flat store.",
    )
    parser.add_argument("--train-size", type=int, default=65536, help="Keys sampled to train IVFPQ.")
    parser.add_argument(
        "--plot-dir", default=None, help="Copy each corpus' sweep plot here (quality_<corpus>.png)."
    )
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    args.k = args.k or (256 if args.quick else 1024)
    args.tune_tokens = args.tune_tokens or (2000 if args.quick else 16000)
    args.test_tokens = args.test_tokens or (4000 if args.quick else 20000)

    start = time.time()
    print(f"torch threads: {torch.get_num_threads()}; loading SmolLM2-135M-Instruct ...", flush=True)
    model, tokenizer = load_smollm2()
    results = []
    for name in args.corpus:
        results.append(run_corpus(model, tokenizer, name, args))
        if args.output_json:  # after every corpus, so a long run leaves its finished part behind
            Path(args.output_json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print()
    print(table(results))
    print(
        f"\nsettings: max_length={MAX_LENGTH} stride={STRIDE} batch_size={BATCH_SIZE}, tuning k={args.k}, "
        f"ks={args.ks}; total wall {time.time() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
