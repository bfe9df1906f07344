"""Retrieval-augmented LMs next to kNN-LM with SmolLM2-135M-Instruct, offline, on CPU.

(a) Perplexity on the Tiny Shakespeare test slice of bench/quality.py (the last 5% of the file), with the
    first 90% of the file (or its first ``--store-chars`` characters) as both the kNN-LM datastore text and
    the retrieval corpus (cut into passages of 128 tokens, 32 shared): base, kNN-LM, In-Context RALM (BM25
    and dense), REPLUG (k = 4, dense) and kNN-LM + In-Context RALM (BM25), with wall time per scored token
    relative to the base model.
(b) Open-QA on the SQuAD split of bench/open_qa.py (questions of the last 10 articles, the same random
    subset; all 2,067 paragraphs retrievable): closed-book, In-Context RALM (dense and BM25) and REPLUG
    (k = 4, dense) greedy short answers, SQuAD EM / F1.

    PYTHONPATH=. nice -n 10 python bench/rag.py --quick       # minutes
    PYTHONPATH=. nice -n 10 python bench/rag.py               # the documented run

``--ppl-rows`` / ``--qa-rows`` run a subset of the rows (the base / closed-book row always runs, so every
ratio is measured in one process). Each retrieval row of (a) runs with the passage KV cache off, then
on (``--reuse-cache both``), with process CPU time next to wall time, the stride / passage hit rates and
the relative perplexity gap between the two. Not part of the test suite. Text comes from
``../shared/data`` (or ``$HF_KNNLM_SHARED_DATA``).
"""

from __future__ import annotations

import os

# On a shared machine, OpenMP threads that spin at every barrier while another process holds the other
# core make SmolLM2 several times slower (measured here: a batch-8 decoding step 5.5 s with the default
# policy, 0.25 s passive). Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import time
from pathlib import Path

import open_qa
import quality
import torch
from _common import REPO, corpus_splits, load_minilm, load_smollm2, squad_path, timed

from hf_knnlm.knnlm import evaluate_perplexity
from hf_knnlm.open_qa.squad import exact_match, f1_score, load_squad_open
from hf_knnlm.rag import (
    BM25Retriever,
    DenseRetriever,
    answer_questions,
    chunk_documents,
    evaluate_retrieval_perplexity,
)
from hf_knnlm.rag.prefix import tokens_containing
from hf_knnlm.utils.files import atomic_write_json

MAX_LENGTH, STRIDE, BATCH_SIZE = quality.MAX_LENGTH, quality.STRIDE, quality.BATCH_SIZE
# kNN-LM setting tuned by bench/quality.py's full run on this corpus (lambda / T / k).
KNN = {"lmbda": 0.25, "temperature": 1.610, "k": 1024}
PRESETS = {
    "quick": {"test_tokens": 256, "qa_questions": 16, "store_chars": 30_000},
    "full": {"test_tokens": 2048, "qa_questions": 300, "store_chars": None},
}


def cached_bm25(passages, folder: Path) -> BM25Retriever:
    if (folder / "bm25_config.json").exists():
        return BM25Retriever.from_pretrained(folder)
    bm25 = BM25Retriever.build(passages)
    bm25.save_pretrained(folder)
    return bm25


def cached_dense(passages, folder: Path, encoder, tokenizer) -> DenseRetriever:
    if (folder / "document_index.json").exists():
        return DenseRetriever.from_pretrained(folder, encoder, tokenizer)
    dense = DenseRetriever.build(
        passages, encoder, tokenizer, max_length=256, batch_size=32, show_progress=True
    )
    dense.save_pretrained(folder)
    return dense


PPL_ROWS = ("knn", "ralm-bm25", "ralm-dense", "replug")
QA_ROWS = ("ralm-dense", "ralm-bm25", "replug")


def perplexity_rows(model, tokenizer, args, work: Path, save) -> list[dict]:
    splits = corpus_splits("shakespeare", False, args.store_chars)
    passages = chunk_documents([splits["store"]], tokenizer, chunk_tokens=128, overlap=32)
    wanted = set(args.ppl_rows)
    # Only what the asked rows read is built: the datastore alone takes minutes on the whole text.
    bm25 = cached_bm25(passages, work / "bm25") if "ralm-bm25" in wanted else None
    dense = (
        cached_dense(passages, work / "dense", *load_minilm()) if {"ralm-dense", "replug"} & wanted else None
    )
    store = None
    if {"knn", "ralm-bm25"} & wanted:
        store, _ = quality.get_store(model, tokenizer, splits["store"], work / "flat", False)
    print(f"{len(passages):,} passages; {bm25}; {dense}; {store}", flush=True)
    test = [splits["test"]]
    common = dict(
        max_length=MAX_LENGTH, stride=STRIDE, batch_size=BATCH_SIZE, max_tokens=args.test_tokens + 1
    )
    # Untimed first: a process's first forward pass pays one-off start-up costs (allocator, kernels),
    # which would inflate the base time every ratio is divided by.
    evaluate_perplexity(model, tokenizer, test, **common | {"max_tokens": min(args.test_tokens, 64) + 1})
    cpu = time.process_time()
    base, base_s = timed(evaluate_perplexity, model, tokenizer, test, **common)
    base_cpu = time.process_time() - cpu
    rows = [{"method": "base", "ppl": base["base_ppl"], "wall_s": base_s, "wall_ratio": 1.0, "change": 0.0}]
    rows[0] |= {"cpu_s": base_cpu, "cpu_ratio": 1.0}
    print(json.dumps({"scored_tokens": base["num_tokens"], **rows[0]}), flush=True)

    def add(row: dict) -> None:
        row["wall_ratio"] = row["wall_s"] / base_s
        row["change"] = 100 * (row["ppl"] / base["base_ppl"] - 1)
        if "cpu_s" in row:
            row["cpu_ratio"] = row["cpu_s"] / base_cpu
        rows.append(row)
        print(json.dumps(row), flush=True)
        save(rows)

    if "knn" in args.ppl_rows:
        knn, knn_s = timed(evaluate_perplexity, model, tokenizer, test, store, **KNN, **common)
        label = f"kNN-LM (lambda {KNN['lmbda']}, T {KNN['temperature']}, k {KNN['k']})"
        add({"method": label, "ppl": knn["knn_ppl"], "wall_s": knn_s, "entries": len(store)})
    runs = [
        ("ralm-bm25", "In-Context RALM, BM25 (+ kNN-LM)", bm25, 1, store),
        ("ralm-dense", "In-Context RALM, dense", dense, 1, None),
        ("replug", f"REPLUG k=4, dense (tau {args.replug_temperature})", dense, 4, None),
    ]
    for name, label, retriever, k, datastore in runs:
        if name in args.ppl_rows:
            retrieval_rows(model, tokenizer, test, args, common, (label, retriever, k, datastore), base, add)
    print(f"scored tokens: {base['num_tokens']:,}", flush=True)
    return rows


CACHE_MODES = {"both": (False, True), "on": (True,), "off": (False,)}


def retrieval_rows(model, tokenizer, test, args, common, run, base, add) -> None:
    """One row per ``--reuse-cache`` mode (off before on, so both see about the same machine load),
    then how far apart the two modes' perplexities are."""
    label, retriever, k, datastore = run
    extra = {"datastore": datastore, "knn_temperature": KNN["temperature"], "k": KNN["k"]}
    results = {}
    for reuse in CACHE_MODES[args.reuse_cache]:
        cpu = time.process_time()
        result = evaluate_retrieval_perplexity(
            model,
            tokenizer,
            test,
            retriever,
            num_documents=k,
            temperature=args.replug_temperature,
            retrieval_stride=args.retrieval_stride,
            row_batch_size=args.row_batch_size,
            reuse_cache=reuse,
            **({**extra, "lmbda": KNN["lmbda"]} if datastore is not None else {}),
            **common,
        )
        results[reuse] = result
        # Process CPU seconds next to wall: with one thread they are the work done, whatever else the
        # machine runs (the whole call: its plain window pass and retrieval included).
        cpu_s = time.process_time() - cpu
        print(json.dumps({"run": label, **result.to_dict()}), flush=True)
        t = result["times"]
        assert abs(result["base_ppl"] - base["base_ppl"]) < 1e-6 * base["base_ppl"], (result, base)
        ralm_s = t["base_s"] + t["retrieval_s"] + t["prefixed_s"]
        keys = ("retrieved_fraction", "forward_tokens", "padded_tokens", "base_forward_tokens")
        keys += ("stride_hit_rate", "passage_hit_rate", "context_tokens")
        # The call's own plain window pass, next to the base row's: how much the machine's load moved.
        info = {key: result[key] for key in keys} | {"plain_pass_s": t["base_s"], "reuse_cache": reuse}
        info["cpu_s"] = cpu_s
        mode = f" [cache {'on' if reuse else 'off'}]"
        add(
            {
                "method": label.replace(" (+ kNN-LM)", "") + mode,
                "ppl": result["ppl"],
                "wall_s": ralm_s,
                **info,
            }
        )
        if datastore is not None:
            combined = {"method": "kNN-LM + In-Context RALM, BM25" + mode, "ppl": result["knn_ralm_ppl"]}
            add({**combined, "wall_s": ralm_s + t["knn_s"], **info})
    if len(results) == 2:
        gaps = {
            key: abs(results[True][key] - results[False][key]) / results[False][key]
            for key in ("ppl", "knn_ralm_ppl")
            if results[False][key] is not None
        }
        print(json.dumps({"run": label, "cache on vs off, relative perplexity difference": gaps}), flush=True)


def qa_rows(model, tokenizer, args, work: Path, save) -> list[dict]:
    path = squad_path()
    documents, questions = load_squad_open(path, articles=open_qa.EVAL_ARTICLES)
    questions = open_qa.subset(questions, args.qa_questions, 0)
    index, count = args.qa_shard
    if count > 1:  # every count-th question from index: shards run in parallel and merge with --merge
        questions = questions.select(range(index, len(questions), count))
    retrievers = {}
    if {"ralm-dense", "replug"} & set(args.qa_rows):
        retrievers["dense"] = cached_dense(documents, work / "squad_dense", *load_minilm())
    if "ralm-bm25" in args.qa_rows:
        retrievers["bm25"] = cached_bm25(documents, work / "squad_bm25")
    runs = [
        ("closed-book", "closed-book", "closed_book", None),
        ("ralm-dense", "In-Context RALM, dense (top 1)", "ralm", "dense"),
        ("ralm-bm25", "In-Context RALM, BM25 (top 1)", "ralm", "bm25"),
        ("replug", f"REPLUG k=4, dense (tau {args.replug_temperature})", "replug", "dense"),
    ]
    rows, texts, answers = [], list(questions["question"]), list(questions["answers"])
    tokens_containing(tokenizer, ("\n",))  # the stop-token table, built once, outside the timed calls
    for name, label, method, retriever in runs:
        if name != "closed-book" and name not in args.qa_rows:
            continue
        predictions, seconds = timed(
            answer_questions,
            model,
            tokenizer,
            texts,
            method=method,
            retriever=retrievers.get(retriever),
            temperature=args.replug_temperature,
            batch_size=args.qa_batch_size,
            max_new_tokens=16,
        )
        em = 100 * sum(exact_match(p, a) for p, a in zip(predictions, answers, strict=True)) / len(texts)
        f1 = 100 * sum(f1_score(p, a) for p, a in zip(predictions, answers, strict=True)) / len(texts)
        row = {"method": label, "exact_match": em, "f1": f1, "wall_s": seconds, "questions": len(texts)}
        row |= {"wall_ratio": seconds / rows[0]["wall_s"] if rows else 1.0, "examples": predictions[:5]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        save(rows, predictions)
    return rows


def shard(value: str) -> tuple[int, int]:
    index, _, count = value.partition("/")
    try:
        pair = int(index), int(count)
    except ValueError:
        pair = (-1, 0)
    if not 0 <= pair[0] < pair[1]:
        raise argparse.ArgumentTypeError(f"--qa-shard {value!r}: write I/N with 0 <= I < N, e.g. 0/2.")
    return pair


def merge_qa(paths: list[str]) -> dict:
    """One (b) table from the JSON files of --qa-shard runs: EM / F1 weighted by questions, wall times
    summed per method (every shard ran every row, so each ratio divides totals of the same questions)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    shards = sorted(part["args"]["qa_shard"][0] for part in parts)
    count = parts[0]["args"]["qa_shard"][1]
    if shards != list(range(count)):
        raise SystemExit(f"--merge needs shards 0..{count - 1} of one run once each; got {shards}.")
    methods = [row["method"] for row in parts[0]["qa"]]
    rows = []
    for method in methods:
        found = [row for part in parts for row in part["qa"] if row["method"] == method]
        if len(found) != len(parts):
            raise SystemExit(f"--merge: {method!r} is missing from a shard (a stopped run); rerun it.")
        questions = sum(row["questions"] for row in found)
        row = {"method": method, "questions": questions, "wall_s": sum(row["wall_s"] for row in found)}
        for key in ("exact_match", "f1"):
            row[key] = sum(r[key] * r["questions"] for r in found) / questions
        rows.append(row | {"wall_ratio": row["wall_s"] / (rows[0]["wall_s"] if rows else row["wall_s"])})
    return {"merged": list(paths), "qa": rows}


def print_ppl(rows: list[dict]) -> None:
    print("\n| method | perplexity | wall / token vs base | CPU / token vs base | stride / passage hits |")
    for row in rows:
        cpu = f"{row['cpu_ratio']:.2f}x" if "cpu_ratio" in row else ""
        hits = (
            f"{row['stride_hit_rate']:.3f} / {row['passage_hit_rate']:.3f}"
            if "stride_hit_rate" in row
            else ""
        )
        change = f"{row['ppl']:.3f} ({row['change']:+.1f}%)"
        print(f"| {row['method']} | {change} | {row['wall_ratio']:.2f}x | {cpu} | {hits} |")


def print_qa(rows: list[dict]) -> None:
    for row in rows:
        print(f"| {row['method']} | {row['exact_match']:.1f} | {row['f1']:.1f} | {row['wall_ratio']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="30,000 characters of store text, 256 test tokens, 16 questions."
    )
    parser.add_argument(
        "--store-chars", type=int, default=None, help="Datastore / retrieval text: its first ~N characters."
    )
    parser.add_argument("--parts", nargs="+", default=["ppl", "qa"], choices=["ppl", "qa"])
    parser.add_argument("--test-tokens", type=int, default=None, help="Scored test tokens (full: 2048).")
    parser.add_argument("--qa-questions", type=int, default=None, help="SQuAD questions (full: 300).")
    parser.add_argument(
        "--ppl-rows", nargs="+", default=list(PPL_ROWS), choices=PPL_ROWS, help="Rows of (a) next to base."
    )
    parser.add_argument(
        "--qa-rows",
        nargs="+",
        default=list(QA_ROWS),
        choices=QA_ROWS,
        help="Rows of (b) next to closed-book.",
    )
    parser.add_argument("--retrieval-stride", type=int, default=4)
    parser.add_argument("--replug-temperature", type=float, default=0.1)
    parser.add_argument("--row-batch-size", type=int, default=4)
    parser.add_argument(
        "--reuse-cache",
        default="both",
        choices=sorted(CACHE_MODES),
        help="Passage KV reuse in the retrieval rows: both runs each row with it off, then on.",
    )
    parser.add_argument("--qa-batch-size", type=int, default=8)
    parser.add_argument(
        "--qa-shard", type=shard, default=(0, 1), help="I/N: run every N-th question from the I-th (0-based)."
    )
    parser.add_argument(
        "--merge", nargs="+", default=None, help="JSON files of --qa-shard runs: print and write one table."
    )
    parser.add_argument("--workdir", default=str(REPO / "runs" / "rag"))
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    for name, value in PRESETS["quick" if args.quick else "full"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    work = Path(args.workdir) / ("quick" if args.quick else f"full-{args.store_chars or 'all'}")
    started = time.time()
    if args.merge:
        results = merge_qa(args.merge)
        if args.output_json:
            atomic_write_json(args.output_json, results)
        print_qa(results["qa"])
        print(f"questions: {results['qa'][0]['questions']:,}")
        return
    print(f"torch threads: {torch.get_num_threads()}; loading SmolLM2-135M-Instruct ...", flush=True)
    model, tokenizer = load_smollm2()
    results: dict = {"args": vars(args)}

    def save(part: str):
        def write(rows: list[dict], predictions: list[str] | None = None) -> None:
            results[part] = rows
            if predictions is not None:
                results.setdefault("qa_predictions", {})[rows[-1]["method"]] = predictions
            if args.output_json:  # after every row, so that a stopped run keeps the rows it finished
                atomic_write_json(args.output_json, results)

        return write

    if "ppl" in args.parts:
        results["perplexity"] = perplexity_rows(model, tokenizer, args, work, save("perplexity"))
    if "qa" in args.parts:
        results["qa"] = qa_rows(model, tokenizer, args, work, save("qa"))
    results["total_wall_s"] = time.time() - started
    if args.output_json:
        atomic_write_json(args.output_json, results)
    print_ppl(results.get("perplexity", []))
    print_qa(results.get("qa", []))
    print(f"\ntotal wall {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
