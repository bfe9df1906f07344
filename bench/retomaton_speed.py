"""RetoMaton's wall time against plain kNN-LM on the same real store, in one run (issue 27, item 2).

A store of SmolLM2-135M keys over the first ``--store-tokens`` tokens of WikiText-2 valid (Flat) and
the same keys re-indexed as ``--factory`` (IVF-PQ); ``--eval-tokens`` tokens of WikiText-2 test
scored on each, plain kNN-LM and RetoMaton interleaved ``--repeats`` times, best of N:

- **retrieval**: the batches ``evaluate_perplexity`` scores (one model pass, kept), and only the
  policy calls timed (plain search, RetoMaton at each of ``--thresholds`` and ``--segments``);
- **whole run**: ``evaluate_perplexity`` itself (``retomaton=--threshold``), model pass included.

Each prints the ratio RetoMaton / plain and the perplexity change; the targets are ratio <= 0.7 at
<= +1%. ``--grow-to N`` adds a store of the real keys plus perturbed copies (bench/speed.py's P2
store, not a real one) indexed as ``--grow-factory``.

    PYTHONPATH=. python bench/retomaton_speed.py --quick
    PYTHONPATH=. python bench/retomaton_speed.py --eval-tokens 3000 --output-json reto.json

The stores are cached in ``--workdir`` (a second run reuses them).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cached_flat_store, cached_store, load_smollm2, log, read_shared  # noqa: E402


def _wiki_tokens(tokenizer, name: str, tokens: int) -> str:
    """About ``tokens`` tokens of a WikiText-2 file, cut at a line end."""
    text = read_shared("wikitext-2", name, max_chars=max(4 * tokens, 20_000) * 2)
    ratio = 20_000 / len(tokenizer(text[:20_000])["input_ids"])
    cut = text[: int(tokens * ratio)]
    return cut[: cut.rfind("\n") + 1] or cut


def stores(model, tokenizer, args) -> dict:
    """The Flat store over the real keys and its ``args.factory`` re-index (both cached in workdir)."""
    work = Path(args.workdir)
    text = _wiki_tokens(tokenizer, "wiki.valid.tokens", args.store_tokens)
    flat_dir = work / f"flat{args.store_tokens}"

    flat, build_s = cached_flat_store(model, tokenizer, text, flat_dir, args)
    log(f"Flat store: {len(flat):,} entries ({build_s:.0f} s to build)")
    ivf_dir = work / f"{args.factory.replace(',', '_')}_{args.store_tokens}"
    ivf, index_s = cached_store(
        ivf_dir, lambda: flat.rebuild_index(args.factory, ivf_dir, train_size=len(flat)), nprobe=args.nprobe
    )
    log(f"{args.factory} store: nprobe {args.nprobe} ({index_s:.0f} s to index)")
    found = {"Flat": flat, args.factory: ivf}
    if args.flat_clusters is not None:  # the same Flat store with k-means clusters to top pointers up from
        km_dir = work / f"flat{args.store_tokens}_kmeans{args.flat_clusters}"
        km, km_s = cached_store(km_dir, lambda: _with_clusters(flat, km_dir, args.flat_clusters or None))
        log(f"Flat + k-means store: {km.clusters.num_clusters} clusters ({km_s:.0f} s to copy and cluster)")
        found["Flat + k-means"] = km
    if args.grow_to:  # not a real store: the real keys and perturbed copies, as bench/speed.py's P2 store
        from speed import make_big_store

        big_dir = work / f"{args.grow_factory.replace(',', '_')}_{args.store_tokens}_{args.grow_to}"
        big, index_s = cached_store(
            big_dir,
            lambda: make_big_store(flat, big_dir, args.grow_to, args.grow_factory, 0.1, 131072)[0],
            nprobe=args.nprobe,
        )
        log(f"{args.grow_factory} store of {len(big):,} entries (copies): {index_s:.0f} s")
        found[f"{args.grow_factory} (copies)"] = big
    return found


def _with_clusters(flat, folder: Path, num_clusters: int | None):
    from hf_knnlm import Datastore
    from hf_knnlm.datastore.kmeans_clusters import add_clusters

    copy = Datastore.from_pretrained(flat.save_pretrained(folder))
    add_clusters(copy, num_clusters)
    return copy


def compare(model, tokenizer, text: str, store, args) -> dict:
    """Plain kNN-LM and RetoMaton evaluated alternately on ``store``: best wall time of each."""
    from hf_knnlm import evaluate_perplexity

    common = dict(
        k=args.k, lmbda=args.lmbda, max_length=args.max_length, stride=args.stride,
        batch_size=args.batch_size, recompute_dists=args.recompute, disable_progress=True,
    )  # fmt: skip
    runs = {"plain": {}, "retomaton": {"retomaton": args.threshold}}
    times: dict[str, list[float]] = {name: [] for name in runs}
    out: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name, extra in runs.items():
            start = time.perf_counter()
            out[name] = evaluate_perplexity(model, tokenizer, [text], store, **common, **extra).to_dict()
            times[name].append(time.perf_counter() - start)
    plain, reto = out["plain"], out["retomaton"]
    return {
        "entries": len(store),
        "tokens": plain["num_tokens"],
        "plain_s": times["plain"],
        "retomaton_s": times["retomaton"],
        "ratio": min(times["retomaton"]) / min(times["plain"]),
        "plain_ppl": plain["knn_ppl"],
        "retomaton_ppl": reto["knn_ppl"],
        "ppl_change": reto["knn_ppl"] / plain["knn_ppl"] - 1,
        "searches_saved": reto["searches_saved"],
    }


def scored_batches(model, tokenizer, text: str, store, args) -> list:
    """The batches ``evaluate_perplexity`` scores, with their queries (one model pass, reused)."""
    from hf_knnlm.knnlm.scored import iter_scored_batches, scored_tokens
    from hf_knnlm.lm.windows import WindowSettings

    windows = WindowSettings(max_length=args.max_length, stride=args.stride, batch_size=args.batch_size)
    tokens = scored_tokens(model, tokenizer, [text], store)
    batches = iter_scored_batches(
        model, tokens, store, None, windows, keep_queries=True, disable_progress=True
    )
    return list(batches)


def retrieve(batches: list, store, policy, settings) -> tuple[float, float]:
    """``(seconds in the policy calls, kNN-LM perplexity)``: evaluate_perplexity's retrieval alone."""
    from hf_knnlm.knnlm.policies import Step

    nll, count, seconds, last = 0.0, 0, 0.0, None
    for batch in batches:
        tokens = [last, *batch.targets[:-1].tolist()] if policy.follows_tokens else None
        last = int(batch.targets[-1])
        start = time.perf_counter()
        batch.neighbours, _ = policy(Step(batch.queries, tokens=tokens))
        seconds += time.perf_counter() - start
        nll -= batch.mixed(settings).double().sum().item()
        count += len(batch)
    return seconds, math.exp(nll / count)


def compare_retrieval(batches: list, store, args) -> dict:
    """Plain search and RetoMaton at each ``--segments`` on the same batches, interleaved, best of N."""
    from hf_knnlm import KNNSettings
    from hf_knnlm.knnlm.policies import PlainSearch, RetoMatonSearch
    from hf_knnlm.knnlm.retomaton import RetoMaton

    settings = KNNSettings(k=args.k, lmbda=args.lmbda, recompute_dists=args.recompute).resolve(store)
    makers = {"plain": lambda: PlainSearch(store, settings)}
    grid = itertools.product(args.thresholds, args.segments, args.pointer_steps, args.pools or [None])
    for threshold, seg, step, pool in grid:
        name = f"retomaton {threshold}, {seg} parts, {step}" + (f", pool {pool}" if pool else "")
        makers[name] = lambda t=threshold, seg=seg, step=step, pool=pool: RetoMatonSearch(
            RetoMaton(store, t, settings.k, args.recompute, pool=pool, segments=seg, pointer_step=step)
        )
    times: dict[str, list[float]] = {name: [] for name in makers}
    rows: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name, make in makers.items():
            policy = make()
            seconds, ppl = retrieve(batches, store, policy, settings)
            times[name].append(seconds)
            rows[name] = {"ppl": ppl, "searches_saved": policy.stats.searches_saved}
    plain_s, plain_ppl = min(times["plain"]), rows["plain"]["ppl"]
    for name, row in rows.items():
        row |= {
            "seconds": times[name],
            "ratio": min(times[name]) / plain_s,
            "ppl_change": row["ppl"] / plain_ppl - 1,
        }
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a 30k-token store, 2k scored tokens")
    p.add_argument("--store-tokens", type=int, default=None, help="WikiText-2 valid tokens stored")
    p.add_argument("--eval-tokens", type=int, default=None, help="WikiText-2 test tokens scored")
    p.add_argument("--factory", default="IVF1024,PQ64", help="index of the second store (same keys)")
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--grow-to", type=int, default=0, help="also a store of the keys + perturbed copies")
    p.add_argument("--grow-factory", default="IVF4096,PQ64", help="index of the --grow-to store")
    p.add_argument(
        "--flat-clusters", type=int, default=None,
        help="also the Flat store with this many k-means clusters (add_clusters; 0: its default, 4 sqrt(N))",
    )  # fmt: skip
    p.add_argument("--only", nargs="+", default=None, help="measure only these stores (names as printed)")
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--lmbda", type=float, default=0.25)
    p.add_argument("--threshold", type=int, default=16, help="RetoMaton's threshold in evaluate_perplexity")
    p.add_argument("--thresholds", type=int, nargs="+", default=[16, 64], help="of the retrieval-only rows")
    p.add_argument("--segments", type=int, nargs="+", default=[64], help="parts walked side by side")
    p.add_argument(
        "--pools", type=int, nargs="+", default=None,
        help="entries scored per pointer step with clusters (default: RetoMaton's, 4 k)",
    )  # fmt: skip
    p.add_argument("--pointer-steps", nargs="+", default=["index"], choices=["index", "exact"])
    p.add_argument(
        "--skip-eval", action="store_true", help="only the retrieval-only rows (no evaluate_perplexity)"
    )
    p.add_argument("--recompute", action="store_true", help="recompute_dists=True in both runs")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/hf-knnlm-retomaton-bench")
    p.add_argument("--output-json", default=None)
    args = p.parse_args(argv)
    sizes = (30_000, 2_000) if args.quick else (100_000, 5_000)
    args.store_tokens = args.store_tokens or sizes[0]
    args.eval_tokens = args.eval_tokens or sizes[1]
    return args


def main(argv=None) -> dict:
    import torch

    args = parse_args(argv)
    torch.set_grad_enabled(False)
    log("loading SmolLM2-135M-Instruct (GGUF)")
    model, tokenizer = load_smollm2()
    text = _wiki_tokens(tokenizer, "wiki.test.tokens", args.eval_tokens)
    results = {"machine": f"{os.cpu_count()}-core CPU", "args": vars(args), "stores": {}}
    all_stores = stores(model, tokenizer, args)
    batches = scored_batches(model, tokenizer, text, all_stores["Flat"], args)
    results["retrieval"] = {}
    for name, store in all_stores.items():
        if args.only and name not in args.only:
            continue
        log(f"{name}: retrieval only, plain vs RetoMaton {args.thresholds}, {args.repeats} rounds")
        rows = results["retrieval"][name] = compare_retrieval(batches, store, args)
        log(f"{name}: {rows}")
        if not args.skip_eval:
            log(f"{name}: evaluate_perplexity, plain kNN-LM vs RetoMaton, {args.repeats} rounds")
            row = results["stores"][name] = compare(model, tokenizer, text, store, args)
            log(f"{name}: {row}")
    print("\n| store | policy | retrieval s | ratio | searches saved | ppl | vs plain |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in results["retrieval"].items():
        for policy, r in rows.items():
            print(
                f"| {name} | {policy} | {min(r['seconds']):.2f} | {r['ratio']:.2f}x "
                f"| {r['searches_saved']:.1%} "
                f"| {r['ppl']:.3f} | {r['ppl_change']:+.2%} |"
            )
    print("\n| store | entries | tokens | plain s | RetoMaton s | ratio | searches saved | ppl change |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results["stores"].items():
        print(
            f"| {name} | {r['entries']:,} | {r['tokens']:,} | {min(r['plain_s']):.1f} "
            f"| {min(r['retomaton_s']):.1f} | {r['ratio']:.2f}x | {r['searches_saved']:.1%} "
            f"| {r['ppl_change']:+.2%} |"
        )
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results


if __name__ == "__main__":
    main()
