"""REALM pre-training benchmark: all-MiniLM-L6-v2 pre-trained on SQuAD v1.1 dev paragraphs.

* corpus: the SQuAD v1.1 dev paragraphs (all 2,067, with all 1,988 evaluation questions, by default;
  ``--quick``: the 421 paragraphs that the questions of the 10 evaluation articles are about, and 300 of
  those questions; both presets train 300 steps of 4 sentences at top-k 2), the knowledge corpus *and*
  the source of the masked sentences (one salient span each, the sentence's own paragraph never
  retrieved); every 10th masked sentence is held out of training;
* model: query and document embedders and the knowledge-augmented encoder all start from all-MiniLM-L6-v2
  (mean pooling, unit vectors, score scale 20; the masked-LM head starts fresh, the checkpoint has none, and
  is warmed up by ``head_warm_start``: plain masked LM with the null document only, before both runs);
* rows: masked salient-span accuracy on the held-out sentences (every token of the span right, under the
  marginal over the retrieved documents and the null document) and the NLL per masked token, with
  retrieval and with the null document alone, before pre-training, after the head's warm start, after a
  run whose index is refreshed in the background (every 50 steps quick, 100 full) and after one whose
  index is never refreshed; zero-shot recall@1/5/20 of the questions of the 10 evaluation articles (the
  open-QA benchmark's split; no question is used in pre-training) before and after; steps/s of both
  runs; the wall time of every stage; and the accuracy on the held-out sentences whose span a retrieved
  document holds word for word where the encoder reads it (the ones retrieval can help most).

End-to-end EM / F1 after reader warm-start and REALM fine-tuning from the pre-trained retriever is
``bench/open_qa.py``'s pipeline, run on a checkpoint this writes (``<output-dir>/refreshed``)::

    python bench/open_qa.py --retrievers pretrained minilm \
        --pretrained-retriever runs/realm-pretrain/refreshed

    python bench/realm_pretrain.py --quick --output-dir runs/realm-pretrain
    python bench/realm_pretrain.py --output-dir runs/realm-pretrain-full
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch
from _common import minilm_path, squad_path
from transformers import AutoTokenizer

from hf_knnlm.open_qa import DocumentIndex, load_squad_open
from hf_knnlm.open_qa.evaluation import retrieval_recall
from hf_knnlm.open_qa.pretraining import (
    AsyncIndexRefresh,
    RealmForMaskedLM,
    RealmPretrainingCollator,
    RealmPretrainingSettings,
    head_warm_start,
    masked_examples,
    pretrain_realm,
)
from hf_knnlm.open_qa.pretraining.head_warmup import null_document_batch
from hf_knnlm.utils.files import atomic_write_json

EVAL_ARTICLES = slice(38, 48)
MODEL = dict(
    retriever_pooling="mean", retriever_proj_size=None, retriever_normalize=True, retriever_score_scale=20.0,
    max_question_length=48, max_doc_embed_length=128,
)  # fmt: skip
PRESETS = {
    "quick": dict(
        steps=300,
        batch_size=4,
        top_k=2,
        max_reader_length=112,
        refresh_every=50,
        eval_questions=300,
        head_warmup_steps=200,
    ),
    # every paragraph and every evaluation question, the same steps: about 40 minutes on 2 CPU cores
    "full": dict(
        steps=300,
        batch_size=4,
        top_k=2,
        max_reader_length=112,
        refresh_every=100,
        eval_questions=0,
        head_warmup_steps=200,
    ),
}


def _span_in_documents(row: dict, joined: torch.Tensor, top_k: int) -> bool:
    """Whether ``row``'s masked span appears word for word in one of its retrieved documents, within what
    the encoder reads of it (``joined``: the row's joined inputs, retrieved documents first)."""
    span, x = [t for t in row["labels"] if t != -100], len(row["input_ids"])
    docs = [ids[x:].tolist() for ids in joined[:top_k]]
    return any(doc[i : i + len(span)] == span for doc in docs for i in range(len(doc)))


@torch.no_grad()
def span_scores(model, tokenizer, index, rows: list[dict], retrieval: bool, batch_size: int = 16):
    """``(right, nll, in_documents)``: per row, whether its every masked token is predicted right; the mean
    negative log-likelihood per masked token, -log sum_z p(z|x) p(y|z, x) (or p(y|x) alone); per row,
    whether a retrieved document holds its span (all False without retrieval). One batch (one
    retrieval, one model pass) serves all three."""
    collator = RealmPretrainingCollator(model, tokenizer, index)
    model.eval()
    right, in_documents, total, tokens = [], [], 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = collator(chunk) if retrieval else null_document_batch(chunk, tokenizer.pad_token_id)
        predicted, log_marginal = model.masked_predictions(**batch, return_log_marginal=True)  # one pass
        for row, guess, joined in zip(chunk, predicted, batch["joined_input_ids"], strict=True):
            targets = [(i, t) for i, t in enumerate(row["labels"]) if t != -100]
            right.append(all(int(guess[i]) == t for i, t in targets))
            in_documents.append(retrieval and _span_in_documents(row, joined, collator.top_k))
            tokens += len(targets)
        total -= log_marginal.sum().item()
    return right, total / tokens, in_documents


def _recall(model, tokenizer, documents, questions, index=None) -> dict[str, float]:
    """recall@1/5/20 of the questions' gold paragraphs, over an index of ``model``'s document encoder."""
    index = index or DocumentIndex.build(documents, model, tokenizer, show_progress=False)
    return retrieval_recall(
        model, tokenizer, index, questions["question"], questions["gold_doc_id"], ks=(1, 5, 20)
    )


def _accuracies(model, tokenizer, index, held_out) -> dict[str, float]:
    (right, nll_with, in_documents), (right_null, nll_null, _) = (
        span_scores(model, tokenizer, index, held_out, retrieval) for retrieval in (True, False)
    )
    those = [i for i, found in enumerate(in_documents) if found]
    return {
        "with_retrieval": sum(right) / len(right),
        "null_document_only": sum(right_null) / len(right_null),
        "nll_with_retrieval": round(nll_with, 4),
        "nll_null_document_only": round(nll_null, 4),
        "span_in_a_retrieved_document": len(those),  # and the accuracy on those sentences alone:
        "those_with_retrieval": sum(right[i] for i in those) / max(len(those), 1),
        "those_null_document_only": sum(right_null[i] for i in those) / max(len(those), 1),
    }


def _run(args, preset, start, tokenizer, documents, train_rows, refresh_every: int, name: str):
    model = copy.deepcopy(start).train()  # both runs start from the same warmed-up weights
    started = time.perf_counter()
    trainer = pretrain_realm(
        model, tokenizer, documents, output_dir=args.output_dir / name, examples=train_rows,
        settings=RealmPretrainingSettings(refresh_index_every=refresh_every), max_steps=preset["steps"],
        batch_size=preset["batch_size"], learning_rate=args.learning_rate,
        retriever_learning_rate=args.retriever_learning_rate, logging_steps=10, use_cpu=True,
        disable_tqdm=True,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    steps_per_second = trainer.state.global_step / next(
        e["train_runtime"] for e in trainer.state.log_history if "train_runtime" in e
    )
    refresh = next(c for c in trainer.callback_handler.callbacks if isinstance(c, AsyncIndexRefresh))
    refresh.wait()
    index = refresh.index  # the index the run searched: refreshed, or the starting one
    return model.eval(), index, {"seconds": round(seconds, 1), "steps_per_second": round(steps_per_second, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the evaluation articles' paragraphs, 300 steps")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=None, help="pre-training steps (default 300)")
    parser.add_argument("--learning-rate", type=float, default=2e-4, help="the encoder's, pre-training")
    parser.add_argument(
        "--warm-start-learning-rate", type=float, default=5e-5, help="the encoder's, the head's warm start"
    )
    parser.add_argument("--retriever-learning-rate", type=float, default=5e-6, help="the two embedders'")
    parser.add_argument("--head-learning-rate", type=float, default=1e-3, help="the fresh head's, warming up")
    args = parser.parse_args()
    preset = PRESETS["quick" if args.quick else "full"] | ({"steps": args.steps} if args.steps else {})
    out = args.output_dir / f"results_{'quick' if args.quick else 'full'}.json"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    timings, results = (
        {},
        {"preset": preset, "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads"},
    )
    started = time.perf_counter()
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    documents, questions = load_squad_open(squad_path(), articles=EVAL_ARTICLES)
    if args.quick:
        gold = set(questions["gold_doc_id"])
        documents = documents.filter(lambda row: row["id"] in gold)
    if preset["eval_questions"]:
        questions = questions.shuffle(seed=0).select(range(min(preset["eval_questions"], len(questions))))
    rows = masked_examples(documents, tokenizer, max_length=MODEL["max_question_length"])
    held_out, train_rows = rows[::10], [r for i, r in enumerate(rows) if i % 10]
    results["learning_rates"] = {
        "encoder": args.learning_rate,
        "encoder_warm_start": args.warm_start_learning_rate,
        "retriever": args.retriever_learning_rate,
        "head": args.head_learning_rate,
    }
    results |= {"documents": len(documents), "train_sentences": len(train_rows), "held_out": len(held_out)}
    timings["data"] = time.perf_counter() - started

    started = time.perf_counter()
    torch.manual_seed(0)  # the fresh masked-LM head's initial weights
    start_model = RealmForMaskedLM.from_encoders(
        str(path), top_k=preset["top_k"], max_reader_length=preset["max_reader_length"], **MODEL
    ).eval()
    start_index = DocumentIndex.build(documents, start_model, tokenizer, show_progress=False)
    results["before"] = _accuracies(start_model, tokenizer, start_index, held_out)
    results["recall_before"] = _recall(start_model, tokenizer, documents, questions, start_index)
    timings["before"] = time.perf_counter() - started
    atomic_write_json(out, results | {"seconds": timings})  # every finished stage is kept

    started = time.perf_counter()
    losses = head_warm_start(
        start_model, tokenizer, train_rows, steps=preset["head_warmup_steps"], batch_size=16,
        learning_rate=args.warm_start_learning_rate, head_learning_rate=args.head_learning_rate,
    )  # fmt: skip
    timings["head_warmup"] = time.perf_counter() - started
    results["after_head_warmup"] = _accuracies(start_model.eval(), tokenizer, start_index, held_out)
    results["head_warmup_loss"] = [round(losses[0], 3), round(losses[-1], 3)] if losses else []
    timings["head_warmup_eval"] = time.perf_counter() - started - timings["head_warmup"]
    atomic_write_json(out, results | {"seconds": timings})

    for name, every in (("refreshed", preset["refresh_every"]), ("never_refreshed", 0)):
        model, index, run = _run(args, preset, start_model, tokenizer, documents, train_rows, every, name)
        started = time.perf_counter()
        results[name] = _accuracies(model, tokenizer, index, held_out) | run
        if name == "refreshed":
            results["recall_after"] = _recall(model, tokenizer, documents, questions)
        timings[f"{name}_train"], timings[f"{name}_eval"] = run["seconds"], time.perf_counter() - started
        atomic_write_json(out, results | {"seconds": timings})
    results["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    atomic_write_json(out, results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
