"""Training and filling a faiss index: faiss called directly vs the library's build path, same keys.

    python bench/index_training.py --entries 100000 --dim 576 --factory IVF4096,PQ64 [--store DIR]

Every row gets the same float16 keys (random clustered keys, or the first ``--entries`` keys of an
existing datastore with ``--store``).

- "faiss index_factory" is what a user would write: ``index_factory`` with faiss's defaults (for
  ``...,PQ<m>`` these turn polysemous training on), ``train`` on every key as float32, one ``add``.
- "hf_knnlm build_index" is what a datastore build runs (a sample of at most ``train_size`` rows
  read from the memory-mapped keys, chunked adds).
- "faiss, no polysemous training" is the direct path with ``do_polysemous_training = False``: what
  the library sets (its searches never use polysemous codes), and the default of an
  ``IndexIVFPQ(quantizer, d, nlist, m, 8)`` built by hand, as knn-transformers does.

All rows run in this one process, interleaved ``--repeats`` times (the fastest of each is
reported: the least disturbed by other load), with the thread counts printed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch  # noqa: F401  (loaded first, as in a build: faiss then shares torch's OpenMP runtime)
from _common import timed

from hf_knnlm.datastore.index import build_index, skip_polysemous_training
from hf_knnlm.datastore.storage import ShardedArray, open_memmap, write_sharded
from hf_knnlm.utils.faiss_support import import_faiss


def random_keys(entries: int, dim: int, seed: int = 0) -> np.ndarray:
    """Clustered fp16 keys (256 Gaussian blobs), so that IVF and PQ have structure to find."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((256, dim)).astype(np.float32) * 3
    noise = rng.standard_normal((entries, dim), dtype=np.float32)
    return (centers[rng.integers(0, 256, entries)] + noise).astype(np.float16)


def store_keys(store: Path, entries: int) -> np.ndarray:
    from hf_knnlm import Datastore

    keys = Datastore.from_pretrained(store).keys
    return np.asarray(keys.take(np.arange(min(entries, len(keys)))), dtype=np.float16)


def direct(keys16: np.ndarray, factory: str, polysemous: bool) -> dict:
    faiss = import_faiss()
    x, prep = timed(lambda: keys16.astype(np.float32))
    index = faiss.index_factory(keys16.shape[1], factory)
    if not polysemous:
        skip_polysemous_training(index)
    _, train = timed(lambda: index.train(x))
    _, add = timed(lambda: index.add(x))
    return {"prep_s": prep, "train_s": train, "add_s": add, "total_s": prep + train + add}


def library(keys16: np.ndarray, factory: str, folder: Path) -> dict:
    write_sharded(folder, "keys", "keys", np.float16, (keys16.shape[1],), [(0, len(keys16))], [keys16])
    keys = ShardedArray([open_memmap(folder / "keys.safetensors", "keys")])
    _, total = timed(lambda: build_index(factory, keys16.shape[1], keys, keys.iter_rows(65536)))
    return {"total_s": total}


ROWS = ("hf_knnlm build_index", "faiss index_factory", "faiss, no polysemous training")


def measure(name: str, keys16: np.ndarray, factory: str) -> dict:
    if name == ROWS[0]:
        with tempfile.TemporaryDirectory() as tmp:
            return library(keys16, factory, Path(tmp))
    return direct(keys16, factory, polysemous=name == ROWS[1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--factory", default="IVF4096,PQ64")
    parser.add_argument("--store", type=Path, default=None, help="take the keys from this datastore")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output-json", type=Path, default=None)
    args = parser.parse_args()

    faiss = import_faiss()
    keys16 = store_keys(args.store, args.entries) if args.store else random_keys(args.entries, args.dim)
    probe_parent = faiss.index_factory(8, "IVF4,PQ2")  # kept alive: the IVF part is owned by it
    probe = faiss.downcast_index(faiss.try_extract_index_ivf(probe_parent))
    print(
        f"{len(keys16)} keys x {keys16.shape[1]}, {args.factory}, threads: torch "
        f"{torch.get_num_threads()} faiss {faiss.omp_get_max_threads()}; index_factory's IVF-PQ "
        f"do_polysemous_training={probe.do_polysemous_training}",
        flush=True,
    )
    runs: dict[str, list[dict]] = {name: [] for name in ROWS}
    for repeat in range(args.repeats):
        for name in ROWS if repeat % 2 == 0 else ROWS[::-1]:
            runs[name].append(r := measure(name, keys16, args.factory))
            parts = ", ".join(f"{k[:-2]} {v:.1f}" for k, v in r.items() if k != "total_s")
            print(f"  {name + ':':32s} {r['total_s']:7.1f} s {f'({parts})' if parts else ''}", flush=True)
    best = {name: min(r["total_s"] for r in rs) for name, rs in runs.items()}
    for name, seconds in best.items():
        print(f"fastest {name + ':':32s} {seconds:7.1f} s  ({seconds / best[ROWS[1]]:.2f}x index_factory)")
    if args.output_json:
        record = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "fastest_s": best}
        args.output_json.write_text(json.dumps(record, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
