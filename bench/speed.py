"""Speed and scale benchmark of hf_knnlm: ratios P2-P6 measured in one run on this machine.

    PYTHONPATH=. nice -n 10 python bench/speed.py --quick      # a few minutes
    PYTHONPATH=. nice -n 10 python bench/speed.py              # the full run (1M store, 10M P6 store)
    PYTHONPATH=. nice -n 10 python bench/speed.py --real-store --quick  # real keys only: real_store.py

P2  kNN-LM evaluation throughput / base evaluation throughput (same model, same text, one run),
    IVFPQ store of ``--store-size`` entries; kNN-LM perplexity vs exact (Flat) search on the same keys.
P3  datastore build throughput / plain forward throughput (same windows, same batch size).
P4  per-token ``generate`` latency with a KNNProcessor / without.
P5  peak RSS of a fresh process searching the memory-mapped P6 index vs the index file size.
P6  search latency at 1M and 10M entries (synthetic clustered keys, built streaming in a child
    process that reports its own peak RSS).

The P2/P4 store holds the real keys of SmolLM2-135M over ``--build-tokens`` WikiText-2 (valid) tokens
plus perturbed copies of them (key + Gaussian noise, same value) up to ``--store-size`` entries:
running the model over 1M tokens does not fit a 2-core budget. P5/P6 keys are synthetic.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import real_store
from _common import BENCH, REPO, load_smollm2, log, read_shared


def _wiki(name: str, max_chars: int) -> str:
    return read_shared("wikitext-2", name, max_chars=max_chars)


# ----------------------------------------------------------------- P3: build vs forward
def bench_build(
    model, tokenizer, text: str, folder: Path, max_length: int, stride: int, batch_size: int
) -> dict:
    import torch

    from hf_knnlm import Datastore
    from hf_knnlm.lm import pad_batch
    from hf_knnlm.lm.corpus import tokenize_corpus
    from hf_knnlm.lm.windows import sliding_windows

    tokens = tokenize_corpus(tokenizer, [text])
    windows = list(sliding_windows(len(tokens), max_length, stride))
    t = time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(windows), batch_size):
            ids, mask = pad_batch(tokens, windows[first : first + batch_size], torch.device("cpu"))
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    forward_s = time.perf_counter() - t
    t = time.perf_counter()
    store = Datastore.build(
        model,
        tokenizer,
        [text],
        folder,
        max_length=max_length,
        stride=stride,
        batch_size=batch_size,
        disable_progress=True,
        overwrite=True,
    )
    build_s = time.perf_counter() - t
    n = len(tokens) - 1
    return {
        "tokens": n,
        "forward_s": forward_s,
        "build_s": build_s,
        "forward_tok_s": n / forward_s,
        "build_tok_s": n / build_s,
        "P3": forward_s / build_s,
        "store": store,
    }


# ----------------------------------------------------------------- the >= 1M-entry IVFPQ store
def make_big_store(real, folder: Path, size: int, factory: str, noise: float, train_size: int):
    """Real keys plus perturbed copies (key + N(0, (noise * per-dim std)^2), same value), streamed."""
    from hf_knnlm import Datastore
    from hf_knnlm.datastore.config import CONFIG_NAME, DatastoreConfig
    from hf_knnlm.datastore.index import INDEX_NAME, build_index, write_index
    from hf_knnlm.datastore.shards import KEYS_PREFIX, VALUES_PREFIX
    from hf_knnlm.datastore.storage import ShardedArray, open_memmap, shard_bounds, write_sharded
    from hf_knnlm.utils.files import file_hashes

    folder.mkdir(parents=True, exist_ok=True)
    keys = real.keys.to_numpy().astype(np.float32)
    values = real.values.to_numpy().astype(np.int32)
    std = keys.std(0, keepdims=True)
    rng = np.random.default_rng(0)

    def chunks(with_keys: bool):
        left, copy = size, 0
        while left > 0:
            take = min(left, len(keys))
            if with_keys:
                block = (
                    keys[:take]
                    if copy == 0
                    else keys[:take]
                    + noise * std * rng.standard_normal((take, keys.shape[1]), dtype=np.float32)
                )
                yield block.astype(np.float16)
            else:
                yield values[:take]
            left, copy = left - take, copy + 1

    dim = keys.shape[1]
    bounds = shard_bounds(size, dim * 2, "2GB")
    key_files = write_sharded(folder, KEYS_PREFIX, "keys", np.float16, (dim,), bounds, chunks(True))
    value_files = write_sharded(folder, VALUES_PREFIX, "values", np.int32, (), bounds, chunks(False))
    final = ShardedArray([open_memmap(folder / f, "keys") for f in key_files])
    t = time.perf_counter()
    index = build_index(factory, dim, final, final.iter_rows(65536), train_size=train_size)
    index_s = time.perf_counter() - t
    write_index(index, folder / INDEX_NAME)
    config = DatastoreConfig.from_dict(real.config.to_dict())
    config.index_factory, config.num_entries = factory, size
    config.shards = [
        {"keys": k, "values": v, "start": s, "end": e}
        for k, v, (s, e) in zip(key_files, value_files, bounds, strict=True)
    ]
    config.files = file_hashes(folder, [*key_files, *value_files, INDEX_NAME])
    config.save(folder / CONFIG_NAME)
    return Datastore.from_pretrained(folder, verify=False), index_s


def exact_index(store):
    """A Flat index over the same keys (float32 in RAM: the exact-search reference)."""
    import faiss

    flat = faiss.IndexFlatL2(store.hidden_size)
    for block in store.keys.iter_rows(65536):
        flat.add(np.ascontiguousarray(block, dtype=np.float32))
    return flat


# ----------------------------------------------------------------- P2: evaluation throughput
def bench_eval(model, tokenizer, text, store, args) -> dict:
    from hf_knnlm import evaluate_perplexity

    common = {
        "max_length": args.max_length,
        "stride": args.stride,
        "batch_size": args.batch_size,
        "k": args.k,
        "lmbda": 0.25,
        "disable_progress": True,
    }
    times = {"base": [], "knn": []}
    result = {}
    for _ in range(args.repeats):  # interleaved, best of N: the cores are shared with other jobs
        for name, ds in (("base", None), ("knn", store)):
            t = time.perf_counter()
            result[name] = evaluate_perplexity(model, tokenizer, [text], ds, **common)
            times[name].append(time.perf_counter() - t)
    t = time.perf_counter()
    recomputed = evaluate_perplexity(model, tokenizer, [text], store, recompute_dists=True, **common)
    recompute_s = time.perf_counter() - t
    log("exact reference: Flat index over the same keys")
    approx_index = store.index
    store.index = exact_index(store)
    t = time.perf_counter()
    exact = evaluate_perplexity(model, tokenizer, [text], store, **common)
    exact_s = time.perf_counter() - t
    store.index = approx_index
    n = result["knn"]["num_tokens"]
    base_s, knn_s = min(times["base"]), min(times["knn"])
    return {
        "tokens": n,
        "base_s": base_s,
        "knn_s": knn_s,
        "base_tok_s": n / base_s,
        "knn_tok_s": n / knn_s,
        "P2": base_s / knn_s,
        "knn_recompute_s": recompute_s,
        "P2_recompute": base_s / recompute_s,
        "base_ppl": result["base"]["base_ppl"],
        "knn_ppl": result["knn"]["knn_ppl"],
        "knn_ppl_recompute": recomputed["knn_ppl"],
        "exact_knn_ppl": exact["knn_ppl"],
        "exact_s": exact_s,
        "ppl_gap_pct": 100 * (result["knn"]["knn_ppl"] / exact["knn_ppl"] - 1),
        "ppl_gap_recompute_pct": 100 * (recomputed["knn_ppl"] / exact["knn_ppl"] - 1),
    }


# ----------------------------------------------------------------- P4: generate latency
def bench_generate(model, tokenizer, prompt: str, store, k: int, new_tokens: int, repeats: int) -> dict:
    from transformers import LogitsProcessorList

    from hf_knnlm import KNNProcessor

    inputs = tokenizer(prompt, return_tensors="pt")
    kw = {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": tokenizer.eos_token_id,
    }
    times = {"base": [], "knn": []}
    with KNNProcessor(model, store, k=k) as processor:
        model.generate(**inputs, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        for _ in range(repeats):
            for name, procs in (("base", []), ("knn", [processor])):
                t = time.perf_counter()
                model.generate(**inputs, **kw, logits_processor=LogitsProcessorList(procs))
                times[name].append((time.perf_counter() - t) / new_tokens)
    base, knn = min(times["base"]), min(times["knn"])
    return {"new_tokens": new_tokens, "base_ms": 1e3 * base, "knn_ms": 1e3 * knn, "P4": knn / base}


# ----------------------------------------------------------------- P5/P6: synthetic stores in child processes
_CHILD_PREAMBLE = """
import json, sys, time, types
import numpy as np
package = types.ModuleType("hf_knnlm")  # datastore.index/storage + files only: no transformers
package.__path__ = [sys.argv[1]]
sys.modules["hf_knnlm"] = package
from _common import AnonymousPeak, rss_bytes as rss
peak_anon = AnonymousPeak()
"""

_BUILD_CHILD = (
    _CHILD_PREAMBLE
    + """
import faiss
from hf_knnlm.datastore.index import build_index, write_index
from hf_knnlm.datastore.storage import ShardedArray, StreamingSafetensorsWriter, open_memmap
folder, factory = sys.argv[2], sys.argv[5]
n, dim, train = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[6])
rng = np.random.default_rng(0)
centers = rng.standard_normal((4096, dim), dtype=np.float32)
t = time.perf_counter()
with StreamingSafetensorsWriter(folder + "/keys.safetensors", "keys", np.float16, (n, dim)) as w:
    for start in range(0, n, 1 << 18):
        m = min(1 << 18, n - start)
        w.write(centers[rng.integers(0, 4096, m)] + 0.3 * rng.standard_normal((m, dim), dtype=np.float32))
write_s = time.perf_counter() - t
keys = ShardedArray([open_memmap(folder + "/keys.safetensors", "keys")])
t = time.perf_counter()
index = build_index(factory, dim, keys, keys.iter_rows(1 << 17), train_size=train)
write_index(index, folder + "/index.faiss")
index_s = time.perf_counter() - t
print(json.dumps({"write_keys_s": write_s, "index_s": index_s, "build_peak_rss": rss("VmHWM"),
                  "build_peak_anon": peak_anon.peak}))
"""
)

_SEARCH_CHILD = (
    _CHILD_PREAMBLE
    + """
import faiss
from hf_knnlm.datastore.index import read_index, set_nprobe
path, dim, nprobe, k = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
faiss.omp_set_num_threads(int(sys.argv[6]))
base_rss = rss("VmRSS")
index = read_index(path, mmap=True)
set_nprobe(index, nprobe)
opened_rss = rss("VmRSS")
rng = np.random.default_rng(1)
centers = np.random.default_rng(0).standard_normal((4096, dim), dtype=np.float32)
queries = centers[rng.integers(0, 4096, 1000)] + 0.3 * rng.standard_normal((1000, dim), dtype=np.float32)
index.search(queries[:8], k)  # warm-up
t = time.perf_counter()
for q in queries[:100]:
    index.search(q[None], k)
single = (time.perf_counter() - t) / 100
t = time.perf_counter()
index.search(queries, k)
batched = (time.perf_counter() - t) / len(queries)
print(json.dumps({"ms_per_query_single": 1e3 * single, "ms_per_query_batch1000": 1e3 * batched,
                  "peak_rss": rss("VmHWM"), "peak_anon": peak_anon.peak,
                  "rss_before_open": base_rss, "rss_after_open": opened_rss,
                  "rss_anon_end": rss("RssAnon"), "rss_file_end": rss("RssFile")}))
"""
)


def _child(script: str, *argv) -> dict:
    child_path = os.pathsep.join(filter(None, [str(BENCH), os.environ.get("PYTHONPATH")]))  # for _common
    out = subprocess.run(
        [sys.executable, "-c", script, str(REPO / "hf_knnlm"), *map(str, argv)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": child_path},
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_synthetic(n: int, dim: int, factory: str, root: Path, args) -> dict:
    folder = Path(tempfile.mkdtemp(prefix=f"knnlm-p6-{n}-", dir=root))
    try:
        log(f"P6: building a {n:,}-entry synthetic store (dim {dim}, {factory}) in {folder}")
        built = _child(_BUILD_CHILD, folder, n, dim, factory, args.train_size)
        size = (folder / "index.faiss").stat().st_size
        keys_size = (folder / "keys.safetensors").stat().st_size
        log(f"P6: searching it ({built})")
        searched = _child(_SEARCH_CHILD, folder / "index.faiss", dim, args.nprobe, args.k, args.faiss_threads)
        log(f"P6: {searched}")
        return {
            "entries": n,
            "dim": dim,
            "factory": factory,
            "index_bytes": size,
            "keys_bytes": keys_size,
            **built,
            **searched,
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: a few minutes")
    p.add_argument("--build-tokens", type=int, default=None, help="real WikiText-2 tokens in the store")
    p.add_argument("--store-size", type=int, default=None, help="entries of the P2/P4 IVFPQ store")
    p.add_argument("--eval-chars", type=int, default=None, help="characters of wiki.test scored for P2")
    p.add_argument("--factory", default="IVF1024,PQ64", help="index of the P2/P4 store")
    p.add_argument("--noise", type=float, default=0.1, help="perturbation, in per-dimension std units")
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--train-size", type=int, default=65536, help="keys sampled to train each index")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--faiss-threads", type=int, default=None, help="default: torch's count (see index.py)")
    p.add_argument("--p6-sizes", default=None, help="comma-separated entry counts for P6")
    p.add_argument("--p6-dim", type=int, default=128)
    p.add_argument("--p6-factory", default="IVF1024,PQ16")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: p2,p4,p6")
    p.add_argument("--workdir", default=None, help="default: a temporary folder under /tmp")
    p.add_argument("--output-json", default=None)
    real_store.add_arguments(p)
    args = p.parse_args(argv)
    quick = {"build_tokens": 6000, "store_size": 200_000, "eval_chars": 12_000, "p6_sizes": "1000000"}
    full = {
        "build_tokens": 30_000,
        "store_size": 1_000_000,
        "eval_chars": 40_000,
        "p6_sizes": "1000000,10000000",
    }
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.real_store:
        return real_store.run(args)
    from hf_knnlm.datastore.index import configure_threads

    args.faiss_threads, torch_threads = configure_threads(args.faiss_threads)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="knnlm-speed-", dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    results: dict = {
        "machine": f"{os.cpu_count()} CPU cores, no GPU",
        "faiss_threads": args.faiss_threads,
        "torch_threads": torch_threads,
        "args": {k: v for k, v in vars(args).items()},
    }
    try:
        if not {"p2", "p3", "p4"} <= skip:
            _run_model_parts(args, skip, root, results)
        if "p6" not in skip:
            results["P6"] = [
                bench_synthetic(int(n), args.p6_dim, args.p6_factory, root, args)
                for n in args.p6_sizes.split(",")
            ]
            largest = results["P6"][-1]
            results["P5"] = {
                "entries": largest["entries"],
                "index_bytes": largest["index_bytes"],
                "peak_rss": largest["peak_rss"],
                "peak_anon": largest["peak_anon"],
                "peak_rss_over_index": largest["peak_rss"] / largest["index_bytes"],
            }
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    _print_table(results)
    return results


def _run_model_parts(args, skip: set, root: Path, results: dict) -> None:
    """P3, then P2 and P4 on the store grown from P3's real keys (the only parts that run the model)."""
    import torch

    log("loading SmolLM2-135M-Instruct (GGUF)")
    model, tokenizer = load_smollm2()
    torch.set_grad_enabled(False)
    sample = _wiki("wiki.valid.tokens", 200_000)
    ratio = len(sample) / len(tokenizer(sample)["input_ids"])  # characters per token
    build_text = _wiki("wiki.valid.tokens", int(args.build_tokens * ratio))
    log(f"P3: build vs forward over {args.build_tokens} tokens")
    p3 = bench_build(
        model, tokenizer, build_text, root / "real", args.max_length, args.stride, args.batch_size
    )
    real = p3.pop("store")
    results["P3"] = p3
    log(f"P3 = {p3['P3']:.3f}  ({p3})")
    if not {"p2", "p4"} <= skip:
        log(f"building the {args.store_size:,}-entry {args.factory} store")
        t = time.perf_counter()
        store, index_s = make_big_store(
            real, root / "big", args.store_size, args.factory, args.noise, args.train_size
        )
        store.nprobe = args.nprobe
        results["store"] = {
            "entries": len(store),
            "factory": args.factory,
            "nprobe": args.nprobe,
            "build_s": time.perf_counter() - t,
            "index_s": index_s,
            "real_keys": len(real),
            "index_bytes": (root / "big" / "index.faiss").stat().st_size,
        }
    if "p2" not in skip:
        log("P2: evaluation throughput, kNN-LM vs base")
        eval_text = _wiki("wiki.test.tokens", args.eval_chars)
        results["P2"] = bench_eval(model, tokenizer, eval_text, store, args)
        log(f"P2 = {results['P2']['P2']:.3f}  ({results['P2']})")
    if "p4" not in skip:
        log("P4: generate latency")
        prompt = _wiki("wiki.test.tokens", 600)[100:600]
        results["P4"] = bench_generate(model, tokenizer, prompt, store, args.k, args.new_tokens, args.repeats)
        log(f"P4 = {results['P4']['P4']:.3f}  ({results['P4']})")


def _print_table(r: dict) -> None:
    print(
        f"\n=== hf_knnlm speed ({r['machine']}; faiss threads {r['faiss_threads']}, "
        f"torch threads {r['torch_threads']}) ==="
    )
    if "P2" in r:
        p2, s = r["P2"], r["store"]
        print(
            f"P2 eval throughput kNN-LM/base : {p2['P2']:.3f}  ({p2['knn_tok_s']:.0f} vs "
            f"{p2['base_tok_s']:.0f} "
            f"tok/s, {p2['tokens']} tokens; store {s['entries']:,} x {s['factory']} nprobe={s['nprobe']})"
        )
        print(
            f"   kNN-LM ppl {p2['knn_ppl']:.3f} vs exact search {p2['exact_knn_ppl']:.3f} "
            f"({p2['ppl_gap_pct']:+.2f}%); with recompute_dists {p2['knn_ppl_recompute']:.3f} "
            f"({p2['ppl_gap_recompute_pct']:+.2f}%, throughput ratio {p2['P2_recompute']:.3f}); "
            f"base ppl {p2['base_ppl']:.3f}"
        )
    p3 = r.get("P3")
    if p3:
        print(
            f"P3 build/forward throughput    : {p3['P3']:.3f}  ({p3['build_tok_s']:.0f} vs "
            f"{p3['forward_tok_s']:.0f} "
            f"tok/s, {p3['tokens']} tokens)"
        )
    if "P4" in r:
        p4 = r["P4"]
        print(
            f"P4 generate latency kNN/base   : {p4['P4']:.3f}  ({p4['knn_ms']:.1f} vs "
            f"{p4['base_ms']:.1f} ms/token)"
        )
    if "P5" in r:
        p5 = r["P5"]
        print(
            f"P5 peak RSS / index size       : {p5['peak_rss_over_index']:.3f}  "
            f"({p5['peak_rss'] / 2**20:.0f} MiB "
            f"vs {p5['index_bytes'] / 2**20:.0f} MiB, {p5['entries']:,} entries, mmap; peak anonymous "
            f"{p5['peak_anon'] / 2**20:.0f} MiB)"
        )
    for p6 in r.get("P6", []):
        print(
            f"P6 {p6['entries']:>11,} entries d={p6['dim']} {p6['factory']}: "
            f"{p6['ms_per_query_single']:.2f} ms/query (1 at a time), "
            f"{p6['ms_per_query_batch1000']:.3f} ms/query "
            f"(batch 1000); build peak RSS {p6['build_peak_rss'] / 2**20:.0f} MiB (anonymous "
            f"{p6['build_peak_anon'] / 2**20:.0f} MiB), keys "
            f"{p6['keys_bytes'] / 2**30:.2f} GiB, index {p6['index_bytes'] / 2**20:.0f} MiB"
        )


if __name__ == "__main__":
    main()
