"""``bench/speed.py --real-store``: issue 27's items 1-3 on a store of real keys only, in one run.

1. **Throughput vs perplexity gap**: the base model and kNN-LM over the same store with each index
   setting of ``--settings`` (``FACTORY[@NPROBE]``; ``Flat`` is exact search, the reference of the
   gap), evaluated interleaved ``--repeats`` times, best of N. Every index is built over the store's
   own keys (cached in ``--workdir``), so the rows differ only in the search.
2. **RetoMaton vs plain kNN-LM**: ``bench/retomaton_speed.py``'s ``compare`` on the same store, with
   the Flat index and with the first IVF setting.
3. **Peak memory**: ``bench/peak_memory.py`` run as a child process with ``--peak-memory-args``.

The store is ``--store PATH`` (a saved store folder, opened read-only), else a Flat store of SmolLM2
keys over the first ``--store-tokens`` tokens of WikiText-2 valid, built once into ``--workdir``.

    PYTHONPATH=. python bench/speed.py --real-store --quick
    PYTHONPATH=. python bench/speed.py --real-store --store /path/to/store --eval-tokens 5000
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from _common import BENCH, cached_flat_store, load_smollm2, log, read_shared

QUICK_SETTINGS = ["Flat", "IVF1024,PQ64@8", "IVF1024,PQ64@32", "IVF1024,PQ32x4fs,RFlat@16"]
FULL_SETTINGS = [*QUICK_SETTINGS[:3], "IVF1024,PQ64@64", QUICK_SETTINGS[3], "IVF1024,PQ64x4fs,RFlat@32"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``--real-store`` (``--k``, ``--max-length``, ``--stride``, ``--batch-size``,
    ``--repeats``, ``--train-size``, ``--workdir``, ``--output-json`` are speed.py's own)."""
    g = p.add_argument_group("--real-store (issue 27, items 1-3 on real keys only)")
    g.add_argument("--real-store", action="store_true", help="run items 1-3 on a store of real keys")
    g.add_argument("--store", default=None, help="a saved store folder (default: build one)")
    g.add_argument("--store-tokens", type=int, default=None, help="WikiText-2 valid tokens stored")
    g.add_argument("--eval-tokens", type=int, default=None, help="WikiText-2 test tokens scored")
    g.add_argument("--settings", nargs="+", default=None, help="FACTORY[@NPROBE] index settings")
    g.add_argument("--peak-memory-args", default=None, help="arguments of bench/peak_memory.py")
    g.add_argument("--skip-items", default="", help="comma-separated items to skip: 1,2,3")


def fill_defaults(args: argparse.Namespace) -> None:
    """Quick (a few minutes on 2 cores) or full sizes for the options left unset."""
    quick = {"store_tokens": 30_000, "eval_tokens": 1_500, "settings": QUICK_SETTINGS}
    full = {"store_tokens": 100_000, "eval_tokens": 5_000, "settings": FULL_SETTINGS}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.peak_memory_args is None:
        args.peak_memory_args = "--tokens 2000 --allocator fixed" if args.quick else ""
    if not any(s.split("@")[0] == "Flat" for s in args.settings):
        args.settings = ["Flat", *args.settings]  # the reference of the perplexity gap


def wiki_tokens(tokenizer, name: str, tokens: int) -> str:
    """About ``tokens`` tokens of a WikiText-2 file, cut at a line end."""
    text = read_shared("wikitext-2", name, max_chars=max(8 * tokens, 40_000))
    ratio = 20_000 / len(tokenizer(text[:20_000])["input_ids"])  # characters per token
    cut = text[: int(tokens * ratio)]
    return cut[: cut.rfind("\n") + 1] or cut


def open_store(model, tokenizer, args):
    """``--store`` (read-only), else the Flat store of ``--store-tokens`` real keys (built once)."""
    from hf_knnlm import Datastore

    if args.store:
        if not (Path(args.store) / "datastore_config.json").is_file():
            raise SystemExit(f"--store {args.store}: no datastore_config.json there; pass a store folder.")
        return Datastore.from_pretrained(args.store, verify=False)
    folder = Path(args.workdir) / f"flat{args.store_tokens}"
    text = wiki_tokens(tokenizer, "wiki.valid.tokens", args.store_tokens)

    store, seconds = cached_flat_store(model, tokenizer, text, folder, args)
    log(f"Flat store of {len(store):,} real entries ({seconds:.0f} s to build)")
    return store


def setting_index(store, factory: str, args):
    """The faiss index ``factory`` over the store's keys: its own, exact, or trained once and cached."""
    from hf_knnlm.datastore.index import build_index, exact_index, read_index, write_index

    if factory == store.config.index_factory:
        return store.index
    if factory == "Flat":
        return exact_index(store.keys.iter_rows(65536), store.hidden_size)
    path = Path(args.workdir) / f"{factory.replace(',', '_')}_{len(store)}.faiss"
    if path.is_file():
        return read_index(path, mmap=False)
    log(f"training {factory} on {min(args.train_size, len(store)):,} of the store's keys")
    index = build_index(
        factory, store.hidden_size, store.keys, store.keys.iter_rows(65536), train_size=args.train_size
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_index(index, path)
    return index


def parse_setting(setting: str) -> tuple[str, int | None]:
    factory, _, nprobe = setting.partition("@")
    return factory, int(nprobe) if nprobe else None


def use_setting(store, indexes: dict, setting: str) -> None:
    factory, nprobe = parse_setting(setting)
    store.index = indexes[factory]
    if nprobe is not None:
        store.nprobe = nprobe


def curve(model, tokenizer, text: str, store, indexes: dict, args) -> list[dict]:
    """Item 1: base and every setting interleaved, best of ``--repeats``; gap vs the Flat row."""
    from hf_knnlm import evaluate_perplexity

    common = dict(
        max_length=args.max_length, stride=args.stride, batch_size=args.batch_size, k=args.k,
        lmbda=0.25, disable_progress=True,
    )  # fmt: skip
    names = ["base", *args.settings]
    times: dict[str, list[float]] = {name: [] for name in names}
    out: dict[str, dict] = {}
    evaluate_perplexity(model, tokenizer, [text[:2000]], store, **common)  # warm-up: first-call costs
    for round_ in range(args.repeats):
        for name in names:
            if name != "base":
                use_setting(store, indexes, name)
            start = time.perf_counter()
            out[name] = evaluate_perplexity(
                model, tokenizer, [text], None if name == "base" else store, **common
            )
            times[name].append(time.perf_counter() - start)
            log(f"round {round_ + 1} {name}: {times[name][-1]:.1f} s")
    exact = next(out[s]["knn_ppl"] for s in args.settings if parse_setting(s)[0] == "Flat")
    base_s, tokens = min(times["base"]), out["base"]["num_tokens"]
    rows = [{"setting": "base", "tok_s": tokens / base_s, "ratio": 1.0, "ppl": out["base"]["base_ppl"]}]
    for s in args.settings:
        ppl = out[s]["knn_ppl"]
        rows.append(
            {"setting": s, "tok_s": tokens / min(times[s]), "ratio": base_s / min(times[s]), "ppl": ppl,
             "gap_pct": 100 * (ppl / exact - 1), "seconds": times[s]}
        )  # fmt: skip
    return rows


def retomaton_rows(model, tokenizer, text: str, store, indexes: dict, args) -> dict:
    """Item 2: ``retomaton_speed.compare`` on the store with Flat and with the first IVF setting."""
    if not (BENCH / "retomaton_speed.py").is_file():
        return {"missing": "bench/retomaton_speed.py is not in this tree"}
    reto = importlib.import_module("retomaton_speed")
    rargs = reto.parse_args(["--quick"] if args.quick else [])
    for key in ("k", "max_length", "stride", "batch_size", "repeats"):
        setattr(rargs, key, getattr(args, key))
    ivf = [s for s in args.settings if parse_setting(s)[0] != "Flat"][:1]
    found = {}
    for setting in ["Flat", *ivf]:
        use_setting(store, indexes, setting)
        log(f"item 2: plain kNN-LM vs RetoMaton (threshold {rargs.threshold}) with {setting}")
        found[setting] = reto.compare(model, tokenizer, text, store, rargs)
        log(f"item 2 {setting}: {found[setting]}")
    return found


def peak_memory(args, store_folder: Path) -> dict:
    """Item 3: ``bench/peak_memory.py`` on the same store, as a child process; its output's last lines."""
    script = BENCH / "peak_memory.py"
    extra = shlex.split(args.peak_memory_args)
    extra += [] if "--store" in extra else ["--store", str(store_folder)]
    command = [sys.executable, str(script), *extra, "--workdir", str(Path(args.workdir) / "peak-memory")]
    log(f"item 3: {' '.join(command[1:])}")
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    tail = (done.stdout + ("\n" + done.stderr[-2000:] if done.returncode else "")).strip().splitlines()
    return {"command": command[1:], "returncode": done.returncode, "seconds": time.perf_counter() - start,
            "tail": tail[-25:]}  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    """Items 1-3 on one real store; prints one table at the end and returns the results."""
    import torch

    fill_defaults(args)
    args.workdir = args.workdir or "/tmp/hf-knnlm-real-store"
    skip = set(filter(None, args.skip_items.split(",")))
    torch.set_grad_enabled(False)
    log("loading SmolLM2-135M-Instruct (GGUF)")
    model, tokenizer = load_smollm2()
    store = open_store(model, tokenizer, args)
    text = wiki_tokens(tokenizer, "wiki.test.tokens", args.eval_tokens)
    factories = dict.fromkeys(parse_setting(s)[0] for s in args.settings)
    indexes = {f: setting_index(store, f, args) for f in factories}
    results = {"machine": f"{os.cpu_count()}-core CPU", "entries": len(store), "args": vars(args)}
    if "1" not in skip:
        results["curve"] = curve(model, tokenizer, text, store, indexes, args)
    if "2" not in skip:
        results["retomaton"] = retomaton_rows(model, tokenizer, text, store, indexes, args)
    if "3" not in skip:
        folder = Path(store.folder)
        del model, store, indexes  # the child measures its own process; free ours first
        results["peak_memory"] = peak_memory(args, folder)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print_table(results)
    return results


def print_table(r: dict) -> None:
    """One Markdown table per item, targets named beside the numbers."""
    a = r["args"]
    print(
        f"\n=== real store: {r['entries']:,} real entries, {r['machine']}, k={a['k']}, "
        f"{a['eval_tokens']:,} WikiText-2 test tokens ==="
    )
    if "curve" in r:
        print("| setting | tok/s | kNN-LM / base | ppl | gap vs Flat | >= 0.85 at <= 1% |")
        print("|---|---|---|---|---|---|")
        for row in r["curve"]:
            gap = row.get("gap_pct")
            met = "" if gap is None else "met" if row["ratio"] >= 0.85 and abs(gap) <= 1 else "missed"
            gap_s = "" if gap is None else f"{gap:+.2f}%"
            cells = [row["setting"], f"{row['tok_s']:.0f}", f"{row['ratio']:.3f}", f"{row['ppl']:.3f}"]
            print("| " + " | ".join([*cells, gap_s, met]) + " |")
    _print_retomaton(r.get("retomaton", {}))
    _print_memory(r.get("peak_memory", {}))


def _print_retomaton(reto: dict) -> None:
    if "missing" in reto:
        print(f"\nitem 2: not run ({reto['missing']})")
    elif reto:
        print("\n| item 2 index | plain s | RetoMaton s | ratio | <= 0.7x at +1% | saved | ppl change |")
        print("|---|---|---|---|---|---|---|")
        for name, x in reto.items():
            met = "met" if x["ratio"] <= 0.7 and x["ppl_change"] <= 0.01 else "missed"
            cells = [name, f"{min(x['plain_s']):.1f}", f"{min(x['retomaton_s']):.1f}", f"{x['ratio']:.2f}x"]
            print(
                "| "
                + " | ".join([*cells, met, f"{x['searches_saved']:.1%}", f"{x['ppl_change']:+.2%}"])
                + " |"
            )


def _print_memory(memory: dict) -> None:
    if "missing" in memory:
        print(f"\nitem 3: not run ({memory['missing']})")
    elif memory:
        command = " ".join(memory["command"])
        print(f"\nitem 3: {command} (exit {memory['returncode']}, {memory['seconds']:.0f} s)")
        print("\n".join(memory["tail"]))
