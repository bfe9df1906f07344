"""Smaller stores: PCA of the keys to half the dimensions and pruning to half the entries.

Reuses the SOTU datastore, dev/test caches and tuned (lmbda, T, k) of ``bench/memory_vs_size.py``
(run it first, same options). For each compressed store (``hf_knnlm.datastore.compress``, what
``hf-knnlm compress`` runs): size on disk, then test perplexity with the tuned setting and with T
re-tuned on the dev text (distances shrink when dimensions or entries go), exact distances
recomputed from the stored keys as for the full store.

    PYTHONPATH=. python bench/compress.py --quick
    PYTHONPATH=. python bench/compress.py --workdir /work/runs/knn
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
from _common import timed  # noqa: E402

from hf_knnlm.commands.compress import folder_bytes  # noqa: E402
from hf_knnlm.datastore.compress import compress_datastore  # noqa: E402
from hf_knnlm.knnlm.tuning import sweep, temperature_grid  # noqa: E402


def evaluate(dev, test, dev_found, test_found, best) -> dict:
    """Test perplexity at the tuned setting and with T re-tuned on dev, from one search of each text."""
    k = [best["k"]]
    ppl = sweep(sotu.cache_batch(test, test_found), [best["lmbda"]], [best["temperature"]], k)[0]["knn_ppl"]
    dev_batch = sotu.cache_batch(dev, dev_found)
    retuned = min(
        sweep(dev_batch, [best["lmbda"]], temperature_grid(dev_batch), k), key=lambda p: p["knn_ppl"]
    )
    ppl_retuned = sweep(sotu.cache_batch(test, test_found), [best["lmbda"]], [retuned["temperature"]], k)
    return {"ppl": ppl, "ppl_retuned_T": ppl_retuned[0]["knn_ppl"], "retuned_T": retuned["temperature"]}


def compressed(store, folder: Path, train_size: int, kwargs: dict):
    """``(compressed store, seconds it took)``: reused when ``folder`` holds one made with the same
    options by an earlier run (its time read back), else written anew."""
    from hf_knnlm import Datastore
    from hf_knnlm.datastore import CONFIG_NAME

    timing = folder.parent / f"{folder.name}.json"
    if (folder / CONFIG_NAME).is_file() and timing.is_file():
        saved = json.loads(timing.read_text())
        if saved["options"] == {**kwargs, "train_size": train_size, "source_entries": len(store)}:
            small = Datastore.from_pretrained(folder, verify=False, nprobe=store.nprobe)
            return small, saved["seconds"]
    for stale in folder.parent.glob(f"*_neighbours_{folder.name}.safetensors"):
        stale.unlink()
    small, seconds = timed(compress_datastore, store, folder, train_size=train_size, overwrite=True, **kwargs)
    options = {**kwargs, "train_size": train_size, "source_entries": len(store)}
    timing.write_text(json.dumps({"options": options, "seconds": seconds}))
    small.nprobe = store.nprobe
    return small, seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sotu.add_run_args(parser)
    parser.add_argument("--merge-k", type=int, default=8)
    args = parser.parse_args()
    t0 = time.time()
    torch.manual_seed(0)
    run = sotu.load_run(args)
    store, work, best, dev, test = run.store, run.work, run.best, run.dev, run.test
    rows = [
        {
            "store": "full",
            "entries": len(store),
            "key_dim": store.key_dim,
            "bytes": folder_bytes(store.folder),
            "build_s": 0.0,
            **evaluate(dev, test, run.dev_found, run.test_found, best),
        }
    ]
    del run
    variants = [
        ("PCA to half the dimensions", {"pca_dim": store.key_dim // 2}),
        (f"pruned to half the entries (merge_k={args.merge_k})", {"prune_to": 0.5, "merge_k": args.merge_k}),
    ]
    for name, kwargs in variants:
        folder = work / ("pca_half" if "pca_dim" in kwargs else "pruned_half")
        small, build_s = compressed(store, folder, args.train_size, kwargs)
        found = [
            sotu.neighbours_cache(
                small, cache, best["k_searched"], work / f"{part}_neighbours_{folder.name}.safetensors"
            )
            for part, cache in (("dev", dev), ("test", test))
        ]
        rows.append(
            {
                "store": name,
                "entries": len(small),
                "key_dim": small.key_dim,
                "bytes": folder_bytes(folder),
                "build_s": build_s,
                **evaluate(dev, test, *found, best),
            }
        )
        print(f"  {name}: {rows[-1]}", flush=True)
    full = rows[0]
    print(f"\nsetting {best}; test tokens {len(test['targets']):,}")
    print(
        "| store | entries | key dims | size on disk | ppl (tuned T) | vs full "
        "| ppl (T re-tuned on dev) | vs full | compress time |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['store']} | {r['entries']:,} | {r['key_dim']} "
            f"| {r['bytes'] / 2**20:.0f} MiB ({r['bytes'] / full['bytes']:.0%}) "
            f"| {r['ppl']:.3f} | {r['ppl'] / full['ppl'] - 1:+.2%} "
            f"| {r['ppl_retuned_T']:.3f} (T={r['retuned_T']:.3g}) "
            f"| {r['ppl_retuned_T'] / full['ppl'] - 1:+.2%} | {r['build_s']:.0f} s |"
        )
    print(
        f"\nbase ppl {math.exp(-test['lm_log_probs'].double().mean().item()):.3f}; "
        f"total wall {time.time() - t0:.0f} s"
    )
    if args.output_json:
        args.output_json.write_text(json.dumps({"best": best, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
