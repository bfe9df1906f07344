"""Fewer searches: RetoMaton's pointers and an adaptive-retrieval gate against full kNN-LM.

Reuses the SOTU datastore, the dev/test caches and the tuned (lmbda, T, k) of
``bench/memory_vs_size.py`` (run it first, same ``--quick`` / ``--workdir``). Full kNN-LM searches
every test token once (its saved neighbours: exact distances, cut to the tuned k); then, from that
one search:

- **RetoMaton** at several thresholds: each step follows the previous step's pointers and takes
  the searched neighbours only when fewer than ``threshold`` pointers survive (exactly what an
  online run returns, which the script checks on the first ``--online-tokens`` tokens, timing both);
  the pointed entries topped up to k with the members of their IVF lists (``lists``, the default)
  or alone (``alone``, ``RetoMaton(clusters=False)``);
- **adaptive retrieval**: a gate fitted on the dev text (LM entropy, top log-prob, top-2 margin
  and the query) sets lmbda per token and skips the search for the ``skip_fraction`` of tokens
  it rates lowest; baselines: the same share skipped at random, or by lowest LM entropy.

    PYTHONPATH=. python bench/retrieval_savings.py --quick
    PYTHONPATH=. python bench/retrieval_savings.py --workdir /work/runs/knn
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sotu  # noqa: E402
from _common import load_smollm2  # noqa: E402

from hf_knnlm.knnlm.gate_training import fit_gate  # noqa: E402
from hf_knnlm.knnlm.mixture import interpolate, knn_target_log_probs  # noqa: E402
from hf_knnlm.knnlm.retomaton import RetoMaton, stream_neighbours  # noqa: E402


def ppl(log_probs: torch.Tensor) -> float:
    return math.exp(-log_probs.double().mean().item())


def retomaton_rows(store, test, full, best, thresholds, n, variants) -> list[dict]:
    queries, targets = test["queries"][:n], test["targets"][:n]
    prev = [None, *targets[:-1].tolist()]
    rows = []
    for pointers in variants:
        for threshold in thresholds:
            automaton = RetoMaton(store, threshold, best["k"], True, clusters=pointers == "lists")
            start = time.time()
            found = stream_neighbours(automaton, queries, prev, precomputed=full)
            knn = knn_target_log_probs(found, targets, best["temperature"])
            mixed = interpolate(test["lm_log_probs"][:n], knn, best["lmbda"])
            stats = automaton.stats()
            rows.append(
                {"pointers": pointers, "threshold": threshold, "ppl": ppl(mixed), **stats}
                | {"wall_s": time.time() - start}
            )
            print(
                f"  RetoMaton ({pointers}) threshold {threshold:>4}: ppl {rows[-1]['ppl']:.3f}, "
                f"searches saved {automaton.searches_saved:.1%}",
                flush=True,
            )
    return rows


def online_check(store, test, best, threshold, n, pointers="lists") -> dict:
    """RetoMaton with real searches on the first ``n`` tokens: same neighbours, and its wall time
    against plain one-query-at-a-time searching, measured in this run."""
    queries, targets = test["queries"][:n], test["targets"][:n]
    prev = [None, *targets[:-1].tolist()]
    start = time.time()
    for i in range(n):
        store.search_ids(queries[i : i + 1], best["k"], recompute_dists=True)
    plain_s = time.time() - start
    clusters = pointers == "lists"
    automaton = RetoMaton(store, threshold, best["k"], recompute_dists=True, clusters=clusters)
    start = time.time()
    online = stream_neighbours(automaton, queries, prev)
    reto_s = time.time() - start
    # The online automaton searches k = best["k"] directly; simulate it from the same search.
    direct = store.search_entries(queries, best["k"], recompute_dists=True)
    simulated = stream_neighbours(
        RetoMaton(store, threshold, best["k"], True, clusters), queries, prev, precomputed=direct
    )
    same = bool(torch.equal(online.ids, simulated.ids))
    # IVF-PQ ties at the k-th candidate can differ between one-query and batched searches; what
    # matters is whether the mixture sees the same neighbours and probabilities.
    same_sets = [
        set(a[a >= 0].tolist()) == set(b[b >= 0].tolist())
        for a, b in zip(online.ids, simulated.ids, strict=True)
    ]
    lp_online = knn_target_log_probs(online, targets, best["temperature"])
    lp_simulated = knn_target_log_probs(simulated, targets, best["temperature"])
    lm = test["lm_log_probs"][:n]
    return {
        "pointers": pointers,
        "threshold": threshold,
        "tokens": n,
        "plain_search_s": plain_s,
        "retomaton_s": reto_s,
        "same_neighbours_as_simulated": same,
        "rows_with_same_neighbour_set": sum(same_sets) / n,
        "max_abs_diff_log_pknn": torch.where(  # equal -inf counts as no difference
            lp_online == lp_simulated, 0.0, (lp_online - lp_simulated).abs()
        )
        .max()
        .item(),
        "ppl_online": ppl(interpolate(lm, lp_online, best["lmbda"])),
        "ppl_simulated": ppl(interpolate(lm, lp_simulated, best["lmbda"])),
        **automaton.stats(),
    }


def gate_data(args, run, best) -> tuple[dict, torch.Tensor]:
    """The gate's training tokens: the first ``--gate-tokens`` tokens of the dev speeches (LM pass and
    search cached in the run folder), or the tuning cache when ``--gate-tokens`` is 0."""
    if not args.gate_tokens:
        return run.dev, knn_target_log_probs(
            sotu.first_k(run.dev_found, best["k"]), run.dev["targets"], best["temperature"]
        )
    name = f"gate{args.gate_tokens}"
    path = run.work / f"{name}_smollm2.safetensors"
    if path.is_file():
        cache = sotu.load_cache(path)
    else:
        model, tokenizer = load_smollm2()
        tokens = sotu.text_stream(tokenizer, sotu.held_out_text("dev"))[: args.gate_tokens + 1]
        cache = sotu.scored_cache(model, tokens, run.store.config.hook_module, path, with_queries=True)
        del model
    found = sotu.neighbours_cache(
        run.store, cache, best["k_searched"], run.work / f"{name}_neighbours.safetensors"
    )
    return cache, knn_target_log_probs(sotu.first_k(found, best["k"]), cache["targets"], best["temperature"])


def gate_selection(dev, dev_knn, best, split: float = 0.6) -> list[dict]:
    """Gate width / weight decay chosen on dev text alone: fit on the first ``split`` of the gate
    tokens (the last 20% of those setting the threshold), score the rest, skip fraction 0.5."""
    n = int(split * len(dev_knn))
    lm, knn = dev["lm_log_probs"][n:], dev_knn[n:]
    full = ppl(interpolate(lm, knn, best["lmbda"]))
    rows = []
    for weight_decay, width in ((1e-3, 32), (1e-2, 16), (1e-2, 32), (1e-1, 16)):
        for use_queries in (True, False):
            queries = dev["queries"] if use_queries else None
            gate = fit_gate(
                dev["features"][:n],
                None if queries is None else queries[:n],
                dev["lm_log_probs"][:n],
                dev_knn[:n],
                skip_fraction=0.5,
                calibration_fraction=0.2,
                width=width,
                weight_decay=weight_decay,
            )
            lam = gate.lmbda(dev["features"][n:], None if queries is None else queries[n:])
            row = {"weight_decay": weight_decay, "width": width, "queries": use_queries}
            row |= {
                "skipped": (lam == 0).float().mean().item(),
                "change": ppl(interpolate(lm, knn, lam)) / full - 1,
            }
            rows.append(row)
            print(f"  gate selection on dev: {row}", flush=True)
    return rows


def gate_rows(dev, dev_knn, test, test_knn, best, fractions, fit_args) -> list[dict]:
    lm_t, lam0 = test["lm_log_probs"], best["lmbda"]
    fixed = interpolate(lm_t, test_knn, lam0)
    rows = []
    for use_queries in (True, False):
        for fraction in fractions:
            gate = fit_gate(
                dev["features"],
                dev["queries"] if use_queries else None,
                dev["lm_log_probs"],
                dev_knn,
                skip_fraction=fraction,
                **fit_args,
            )
            lam = gate.lmbda(test["features"], test["queries"] if use_queries else None)
            searched = lam > 0
            learned = interpolate(lm_t, test_knn, lam)  # skipped tokens: lmbda 0, p_LM exactly
            skip_fixed = interpolate(
                lm_t, test_knn, torch.where(searched, torch.tensor(lam0), torch.tensor(0.0))
            )
            rows.append(
                {
                    "gate": "LM features + query" if use_queries else "LM features",
                    "skip_fraction": fraction,
                    "skipped": 1 - searched.float().mean().item(),
                    "ppl": ppl(learned),
                    "ppl_fixed_lmbda": ppl(skip_fixed),
                }
            )
    # Baselines with the same shares skipped and the tuned fixed lmbda.
    gen = torch.Generator().manual_seed(0)
    entropy = test["features"][:, 0]
    for fraction in fractions:
        random_keep = torch.rand(len(lm_t), generator=gen) >= fraction
        entropy_keep = entropy >= torch.quantile(entropy, fraction)
        for name, keep in (("random", random_keep), ("lowest LM entropy", entropy_keep)):
            mixed = interpolate(lm_t, test_knn, torch.where(keep, torch.tensor(lam0), torch.tensor(0.0)))
            rows.append(
                {
                    "gate": f"baseline: skip {name}",
                    "skip_fraction": fraction,
                    "skipped": 1 - keep.float().mean().item(),
                    "ppl": ppl(mixed),
                    "ppl_fixed_lmbda": ppl(mixed),
                }
            )
    rows.append(
        {
            "gate": "none (full kNN-LM)",
            "skip_fraction": 0.0,
            "skipped": 0.0,
            "ppl": ppl(fixed),
            "ppl_fixed_lmbda": ppl(fixed),
        }
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sotu.add_run_args(parser)
    parser.add_argument("--thresholds", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    parser.add_argument(
        "--reto-pointers",
        nargs="+",
        choices=["lists", "alone"],
        default=["lists", "alone"],
        help="RetoMaton variants: pointers topped up with their IVF lists, and/or pointers alone.",
    )
    parser.add_argument(
        "--reto-tokens", type=int, default=None, help="Test tokens for RetoMaton (default 30000; quick all)."
    )
    parser.add_argument(
        "--online-tokens",
        type=int,
        default=None,
        help="Tokens of the online check (default 2000; quick 300).",
    )
    parser.add_argument("--skip-fractions", type=float, nargs="+", default=[0.3, 0.5, 0.6, 0.7])
    parser.add_argument(
        "--gate-tokens",
        type=int,
        default=None,
        help="Gate training tokens from the dev speeches (default 30000; quick 0: the tuning tokens).",
    )
    parser.add_argument("--gate-width", type=int, default=16, help="Hidden units of the gate (default 16).")
    parser.add_argument(
        "--gate-weight-decay", type=float, default=1e-2, help="Adam weight decay (default 1e-2)."
    )
    parser.add_argument(
        "--gate-select",
        action="store_true",
        help="Also compare gate widths / weight decays on the gate tokens alone (fit 60%%, score 40%%).",
    )
    parser.add_argument(
        "--gate-calibration",
        type=float,
        default=0.2,
        help="Share of the gate tokens that sets the skip threshold instead of being fitted (default 0.2).",
    )
    args = parser.parse_args()
    if args.gate_tokens is None:
        args.gate_tokens = 0 if args.quick else 30000
    t0 = time.time()
    torch.manual_seed(0)
    run = sotu.load_run(args)
    store, best, test = run.store, run.best, run.test
    full = sotu.first_k(run.test_found, best["k"])  # the full kNN-LM: every test token searched
    test_knn = knn_target_log_probs(full, test["targets"], best["temperature"])
    base, knn = ppl(test["lm_log_probs"]), ppl(interpolate(test["lm_log_probs"], test_knn, best["lmbda"]))
    n = min(len(test["targets"]), args.reto_tokens or (10**9 if args.quick else 30000))
    knn_n = ppl(interpolate(test["lm_log_probs"][:n], test_knn[:n], best["lmbda"]))
    print(
        f"store {len(store):,} entries; test {len(test['targets']):,} tokens; "
        f"base ppl {base:.3f}, kNN-LM {knn:.3f} "
        f"(first {n:,}: {knn_n:.3f}); setting {best}",
        flush=True,
    )
    reto = retomaton_rows(store, test, full, best, args.thresholds, n, args.reto_pointers)
    for row in reto:
        row["ppl_change"] = row["ppl"] / knn_n - 1
    ok = [r for r in reto if r["ppl_change"] <= 0.01]
    chosen = max(ok, key=lambda r: r["searches_saved"]) if ok else reto[-1]
    online = online_check(
        store,
        test,
        best,
        chosen["threshold"],
        min(n, args.online_tokens or (300 if args.quick else 2000)),
        chosen["pointers"],
    )
    gate_dev, gate_knn = gate_data(args, run, best)
    fit_args = dict(
        width=args.gate_width, weight_decay=args.gate_weight_decay, calibration_fraction=args.gate_calibration
    )
    print(f"gate trained on {len(gate_knn):,} dev tokens; {fit_args}", flush=True)
    selection = gate_selection(gate_dev, gate_knn, best) if args.gate_select else None
    gates = gate_rows(gate_dev, gate_knn, test, test_knn, best, args.skip_fractions, fit_args)
    for row in gates:
        row["ppl_change"] = row["ppl"] / knn - 1
    print("\n| RetoMaton pointers | threshold | searches saved | ppl | vs full kNN-LM |")
    print("|---|---|---|---|---|")
    for r in reto:
        print(
            f"| {r['pointers']} | {r['threshold']} | {r['searches_saved']:.1%} | {r['ppl']:.3f} "
            f"| {r['ppl_change']:+.2%} |"
        )
    print(f"\nonline check (threshold {online['threshold']}, {online['tokens']} tokens): {online}")
    print(
        "\n| gate | skipped | ppl (gate lmbda) | ppl (fixed lmbda) | vs full kNN-LM |\n|---|---|---|---|---|"
    )
    for r in gates:
        print(
            f"| {r['gate']} | {r['skipped']:.1%} | {r['ppl']:.3f} | {r['ppl_fixed_lmbda']:.3f} "
            f"| {r['ppl_change']:+.2%} |"
        )
    print(f"\nbase ppl {base:.3f}; full kNN-LM {knn:.3f}; total wall {time.time() - t0:.0f} s")
    if args.output_json:
        args.output_json.write_text(
            json.dumps(
                {
                    "best": best,
                    "base_ppl": base,
                    "knn_ppl": knn,
                    "retomaton": reto,
                    "gate_training": {"tokens": len(gate_knn), **fit_args},
                    "gate_selection": selection,
                    "online": online,
                    "gate": gates,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
