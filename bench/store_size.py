"""Bytes on disk and memory of an exact (Flat) datastore, written and opened by this tree and by another.

    python bench/store_size.py --entries 100000 --dim 576 [--compare OTHER_SOURCE_TREE]

Each tree runs in its own process (``PYTHONPATH`` = the tree) on the same random fp16 keys and
int32 values: it writes a store with ``write_store`` + ``finish_folder`` (what a build's last
step does), sums the bytes of every file, then opens it with ``Datastore.from_pretrained`` and
reports the anonymous memory that adds (``RssAnon``, Linux), the opening time, and whether every
stored key sampled is its own nearest neighbour at distance 0. With ``--compare`` (e.g. a tree
exported from an older commit) both rows and their ratios come from one run.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _trees import add_tree_args, run_probe, trees

_PROBE = r"""
import json, sys, time
from pathlib import Path
import numpy as np
from _common import rss_bytes
from hf_knnlm.datastore.builder import write_store
from hf_knnlm.datastore.card import datastore_card
from hf_knnlm.datastore.config import DatastoreConfig
from hf_knnlm.utils.hub_mixin import finish_folder
from hf_knnlm import Datastore

entries, dim, folder = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
rng = np.random.default_rng(0)
keys = rng.standard_normal((entries, dim), dtype=np.float32).astype(np.float16)
values = rng.integers(0, 50000, entries, dtype=np.int32)
config = DatastoreConfig(model_type="llama", hook_module="model.layers.29.mlp", hidden_size=dim,
                         vocab_size=50000, index_factory="Flat", max_length=1024, stride=512)
folder.mkdir(parents=True)
files = write_store(folder, config, [keys], [values], [(0, entries)])
finish_folder(folder, config, files, datastore_card)
sizes = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}

before, start = rss_bytes("RssAnon"), time.perf_counter()
store = Datastore.from_pretrained(folder)
seconds, grown = time.perf_counter() - start, rss_bytes("RssAnon") - before
rows = np.arange(0, entries, max(1, entries // 200))
distances, ids = store.search_ids(keys[rows].astype(np.float32), 1)
print(json.dumps({"files": sizes, "open_seconds": seconds, "open_anon_bytes": grown,
                  "self_at_zero": bool((distances[:, 0] == 0).all())}))
"""


def probe(tree: Path, entries: int, dim: int, workdir: Path) -> dict:
    folder = workdir / f"store-{len(list(workdir.iterdir()))}"
    return run_probe(tree, _PROBE, str(entries), str(dim), str(folder))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=576, help="key width (576: SmolLM2-135M)")
    add_tree_args(parser)
    args = parser.parse_args()
    measured = trees(args)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, tree in measured.items():
            results[name] = probe(tree, args.entries, args.dim, Path(tmp))
    keys_bytes = args.entries * args.dim * 2
    print(f"{args.entries} entries, keys of width {args.dim}: {keys_bytes / 1e6:.1f} MB of fp16 keys")
    for name, r in results.items():
        total = sum(r["files"].values())
        files = ", ".join(f"{f} {b / 1e6:.1f} MB" for f, b in sorted(r["files"].items()) if b > 1e5)
        print(f"{name:14s} {measured[name]}")
        print(f"  on disk: {total / 1e6:.1f} MB ({total / keys_bytes:.2f}x the keys): {files}")
        print(
            f"  open: {r['open_seconds']:.2f} s, +{r['open_anon_bytes'] / 1e6:.1f} MB anonymous memory; "
            f"stored keys are their own nearest neighbour at distance 0: {r['self_at_zero']}"
        )
    if args.compare:
        before, after = (sum(results[n]["files"].values()) for n in ("compared tree", "this tree"))
        print(f"on disk, compared / this: {before / after:.2f}x")


if __name__ == "__main__":
    main()
