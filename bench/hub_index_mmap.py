"""Resident memory of an opened datastore index, memory-mapped vs read into RAM, and sha256 speed.

    nice -n 10 env OMP_NUM_THREADS=1 python bench/hub_index_mmap.py --entries 300000 --dim 256

Prints, per faiss index type, the index file size, the RSS growth of ``read_index(mmap=True)``
and of ``read_index(mmap=False)`` (their ratio), whether both return the same neighbours, and the
throughput of the sha256 check ``Datastore.from_pretrained`` runs on every file before loading.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
from pathlib import Path

import faiss
import numpy as np
from _common import rss_bytes, timed

from hf_knnlm.datastore.index import read_index
from hf_knnlm.utils.files import sha256_file


def rss_mib() -> float:
    return rss_bytes("VmRSS") / 2**20


def opened_rss(path: Path, mmap: bool, queries: np.ndarray) -> tuple[float, np.ndarray]:
    gc.collect()
    before = rss_mib()
    index = read_index(path, mmap=mmap)
    grown = rss_mib() - before
    ids = index.search(queries, 8)[1]
    del index
    gc.collect()
    return grown, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=300_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--factories", nargs="+", default=["Flat", "IVF256,Flat", "IVF256,PQ32", "HNSW16"])
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((args.entries, args.dim), dtype=np.float32)
    queries = keys[:16] + 0.01
    print(f"{args.entries} keys of dimension {args.dim}; RSS growth when opening index.faiss")
    print(f"{'index':<14}{'file MiB':>10}{'mmap MiB':>10}{'RAM MiB':>10}{'ratio':>8}  same neighbours")
    with tempfile.TemporaryDirectory() as tmp:
        for factory in args.factories:
            path = Path(tmp) / "index.faiss"
            index = faiss.index_factory(args.dim, factory)
            index.train(keys[: min(len(keys), 50_000)])
            index.add(keys)
            faiss.write_index(index, str(path))
            del index
            mapped, ids_mapped = opened_rss(path, True, queries)
            in_ram, ids_ram = opened_rss(path, False, queries)
            size = path.stat().st_size / 2**20
            ratio = mapped / in_ram if in_ram > 0 else float("nan")
            print(
                f"{factory:<14}{size:>10.1f}{mapped:>10.1f}{in_ram:>10.1f}{ratio:>8.3f}  "
                f"{np.array_equal(ids_mapped, ids_ram)}"
            )
            if factory == "Flat":
                hash_rate = size / timed(sha256_file, path)[1]
            os.remove(path)
    if "Flat" in args.factories:
        print(f"sha256 verification: {hash_rate:.0f} MiB/s (one core)")


if __name__ == "__main__":
    main()
