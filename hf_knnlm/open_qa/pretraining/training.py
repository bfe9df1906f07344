"""REALM pre-training with the stock ``transformers.Trainer`` (so ``accelerate`` spreads it over devices).

[`pretrain_realm`][hf_knnlm.open_qa.pretraining.pretrain_realm] indexes the corpus with the model's document
encoder, masks one span of every sentence of it
([`masked_examples`][hf_knnlm.open_qa.pretraining.masked_examples]), trains
[`RealmForMaskedLM`][hf_knnlm.open_qa.pretraining.RealmForMaskedLM] on them with
[`RealmPretrainingCollator`][hf_knnlm.open_qa.pretraining.RealmPretrainingCollator] retrieving from the
index and [`AsyncIndexRefresh`][hf_knnlm.open_qa.pretraining.AsyncIndexRefresh] re-embedding it in the
background, and writes the open-QA checkpoint folder
([`save_for_open_qa`][hf_knnlm.open_qa.pretraining.save_for_open_qa]).

A run with ``save_steps`` is resumable as [`train_reader`][hf_knnlm.open_qa.train_reader] is: every
checkpoint in the hidden sibling ``.<output_dir>.trainer`` also holds the index's vectors and the step of
their weights (``realm_index.safetensors``), and a rerun with the same documents and settings continues from
the newest one with that index, so that a stopped and rerun training ends where an uninterrupted one does.
A refresh runs in a thread whose finishing time depends on the machine, so that equality holds with
``refresh_index_every=0``; with refreshes on, a resumed run searches the checkpoint's index until the next
refresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback

from ...retrieval.document_index import DocumentIndex
from ...utils.checks import is_real
from ...utils.files import atomic_path, atomic_write_json, folder_lock
from ...utils.fingerprints import encoder_fingerprint
from ..reader_training import _open_scratch
from ..training import realm_optimizer, training_arguments_for
from .collator import RealmPretrainingCollator
from .export import save_for_open_qa
from .masking import masked_examples
from .refresh import AsyncIndexRefresh
from .settings import RealmPretrainingSettings

logger = logging.getLogger(__name__)

INDEX_CHECKPOINT = "realm_index.safetensors"
SUMMARY = "pretraining.json"


class IndexCheckpoint(TrainerCallback):
    """Saves the searched index's vectors (and the step of their weights) into every Trainer checkpoint,
    and puts them back when training resumes from one (it must follow ``refresh`` among the callbacks)."""

    def __init__(self, index: DocumentIndex, refresh: AsyncIndexRefresh, resume: str | None):
        self.index, self.refresh, self.resume = index, refresh, resume

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            with atomic_path(folder / INDEX_CHECKPOINT) as tmp:
                meta = {"index_step": str(self.refresh.index_step)}
                save_file({"embeddings": self.index.embeddings}, str(tmp), metadata=meta)
        return control

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        saved = Path(self.resume or "") / INDEX_CHECKPOINT
        if self.resume is None:
            return control
        if not saved.is_file():  # stopped between the Trainer's files and ours: re-embed with its weights
            logger.warning(
                "%s has no %s; re-embedding the corpus with its weights", self.resume, INDEX_CHECKPOINT
            )
            self.refresh.on_step_end(args, state, control, model=model)
            self.refresh.wait()
            return control
        from safetensors import safe_open

        with safe_open(str(saved), "pt") as f:
            step = int(f.metadata()["index_step"])
        self.index.replace_embeddings(load_file(str(saved))["embeddings"])
        self.refresh.index_step = step
        return control


def _documents_digest(index: DocumentIndex) -> str:
    rows = json.dumps([index.ids, index.titles, index.texts], ensure_ascii=False)
    return hashlib.sha256(rows.encode("utf-8")).hexdigest()


def _run_settings(model: Any, index: DocumentIndex, settings: dict[str, Any]) -> dict[str, Any]:
    """What a rerun must share with a stopped run to continue it: the start weights, documents, settings."""
    plain = (bool, int, float, str, type(None))
    return {"model": encoder_fingerprint(model), "documents_sha256": _documents_digest(index)} | {
        key: value if isinstance(value, plain) else repr(value) for key, value in settings.items()
    }


def _index_for(
    documents: Any, model: Any, tokenizer: Any, batch_size: int, show_progress: bool
) -> DocumentIndex:
    if isinstance(documents, DocumentIndex):
        documents.check_compatible(model, tokenizer)
        return documents
    return DocumentIndex.build(
        documents, model, tokenizer, batch_size=batch_size, show_progress=show_progress
    )


def _check_run(model: Any, settings: Any, save_steps: int | None, retriever_rate: float | None) -> None:
    if not hasattr(model, "mlm_log_likelihood"):
        raise ValueError(
            f"model is a {type(model).__name__}; pass a RealmForMaskedLM "
            "(RealmForMaskedLM.from_encoders(...) starts one from encoder checkpoints)."
        )
    if not isinstance(settings, RealmPretrainingSettings):
        raise ValueError(f"settings must be a RealmPretrainingSettings, got {type(settings).__name__}.")
    if save_steps is not None and (isinstance(save_steps, bool) or save_steps <= 0):
        raise ValueError(f"save_steps={save_steps} must be a positive number of steps, or None (none).")
    if retriever_rate is not None and (not is_real(retriever_rate) or not 0.0 <= retriever_rate < math.inf):
        raise ValueError(
            f"retriever_learning_rate={retriever_rate!r} must be a finite number >= 0 (e.g. 5e-6; 0 keeps "
            "the retriever as it starts), or None for the learning rate."
        )


def _optimizers(model: Any, learning_rate: float, weight_decay: float, retriever_rate: float | None):
    """The Trainer's own optimizer, unless the retriever has a rate of its own."""
    if retriever_rate is None:
        return (None, None)
    # realm_optimizer's "head" group is the span head and the retriever projections; this model has no
    # span head, so the group is the projections, which are the retriever's here.
    optimizer = realm_optimizer(model, learning_rate, retriever_rate, weight_decay, retriever_rate)
    return (optimizer, None)


def _summary(trainer: Trainer, refresh: AsyncIndexRefresh, rows: int, settings: RealmPretrainingSettings):
    history = trainer.state.log_history
    return {
        "masked_sentences": rows,
        "steps": trainer.state.global_step,
        "losses": [round(e["loss"], 4) for e in history if "loss" in e],
        "index_staleness": [e["index_staleness"] for e in history if "loss" in e and "index_staleness" in e],
        "refreshes": [list(swap) for swap in refresh.swaps],
        "refreshes_skipped": refresh.skipped,
        "settings": settings.to_dict(),
    }


def pretrain_realm(
    model: Any,
    tokenizer: Any,
    documents: Any,
    *,
    output_dir: str | os.PathLike,
    settings: RealmPretrainingSettings | None = None,
    examples: list[dict[str, Any]] | None = None,
    epochs: float = 1.0,
    max_steps: int = -1,
    batch_size: int = 8,
    learning_rate: float = 3e-5,
    retriever_learning_rate: float | None = None,
    warmup_steps: float = 0,
    weight_decay: float = 0.0,
    seed: int = 0,
    logging_steps: float = 10,
    save_steps: int | None = None,
    index_batch_size: int = 64,
    disable_tqdm: bool = False,
    callbacks: list[TrainerCallback] | None = None,
    **training_arguments: Any,
) -> Trainer:
    """REALM-pretrain ``model`` on ``documents`` (rows with ``title`` / ``text`` / ``id``, or a
    [`DocumentIndex`][hf_knnlm.retrieval.DocumentIndex] built with the model) and save the open-QA checkpoint
    folder to ``output_dir``; returns the ``Trainer`` (``state.log_history`` has the losses and
    ``index_staleness``; ``pretraining.json`` in the folder sums the run up).

    ``settings`` sets masking, source exclusion and the refresh interval; ``examples`` are the masked rows
    to train on (default: [`masked_examples`][hf_knnlm.open_qa.pretraining.masked_examples] of every
    document, e.g. a subset that keeps held-out sentences apart); ``retriever_learning_rate`` is the query
    and document encoders' own rate (None: ``learning_rate``; 0 keeps them as they start, and the index
    with them); ``save_steps`` keeps a resumable
    checkpoint every that many steps (see above). Extra keyword arguments go to ``TrainingArguments``.

    Examples:

    ```python
    >>> import torch
    >>> from transformers import BertConfig, BertTokenizerFast
    >>> from hf_knnlm.open_qa.pretraining import (RealmForMaskedLM, RealmMaskedLMConfig,
    ...                                           RealmPretrainingSettings, pretrain_realm)
    >>> docs = [{"id": "fr", "title": "France", "text": "Paris is the capital of France since 987."},
    ...         {"id": "it", "title": "Italy", "text": "Rome is the capital of Italy since 1871."}]
    >>> words = "[PAD] [UNK] [CLS] [SEP] [MASK] paris rome is the capital of france italy since 987 1871 ."
    >>> words = words.split()
    >>> tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(words)}, do_lower_case=True)
    >>> encoder = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1,
    ...                      num_attention_heads=2, intermediate_size=64)
    >>> _ = torch.manual_seed(0)
    >>> model = RealmForMaskedLM(RealmMaskedLMConfig(encoder_config=encoder.to_dict(), top_k=1))
    >>> trainer = pretrain_realm(model, tokenizer, docs, output_dir="realm-pretrained", max_steps=2,
    ...                          batch_size=2, settings=RealmPretrainingSettings(refresh_index_every=1),
    ...                          disable_tqdm=True, logging_steps=1)
    {...}
    >>> trainer.state.global_step, [e["index_staleness"] for e in trainer.state.log_history if "loss" in e][0]
    (2, 1)
    >>> from hf_knnlm.open_qa.pretraining import open_qa_from_pretraining
    >>> type(open_qa_from_pretraining("realm-pretrained")).__name__  # ready for train_realm
    'RealmForOpenQA'
    ```
    """
    settings = settings or RealmPretrainingSettings()
    _check_run(model, settings, save_steps, retriever_learning_rate)
    index = _index_for(documents, model, tokenizer, index_batch_size, not disable_tqdm)
    rows = examples
    if rows is None:
        rows = masked_examples(index, tokenizer, settings, max_length=model.config.max_question_length)
    if not rows:
        raise ValueError("no sentence of the documents could be masked; pass longer documents.")
    import datasets

    trainer_settings = dict(
        epochs=epochs, max_steps=max_steps, batch_size=batch_size, learning_rate=learning_rate,
        warmup_steps=warmup_steps, weight_decay=weight_decay, seed=seed, **training_arguments,
    )  # fmt: skip
    output = Path(output_dir)
    with folder_lock(output, ".train"):
        rows_digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
        run = _run_settings(
            model,
            index,
            {**trainer_settings, **settings.to_dict(), "rows_sha256": rows_digest,
             "retriever_learning_rate": retriever_learning_rate},
        )  # fmt: skip
        scratch, resume = _open_scratch(output, run, "REALM pre-training")
        if save_steps is not None:
            trainer_settings |= dict(save_strategy="steps", save_steps=save_steps, save_total_limit=1)
        args = training_arguments_for(
            scratch, logging_steps=logging_steps, disable_tqdm=disable_tqdm, remove_unused_columns=False,
            **trainer_settings,
        )  # fmt: skip
        refresh = AsyncIndexRefresh(
            index, tokenizer, settings.refresh_index_every, batch_size=index_batch_size
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            data_collator=RealmPretrainingCollator(
                model, tokenizer, index, exclude_source=settings.exclude_source
            ),
            callbacks=[refresh, IndexCheckpoint(index, refresh, resume), *(callbacks or [])],
            optimizers=_optimizers(model, learning_rate, weight_decay, retriever_learning_rate),
        )
        trainer.train(resume_from_checkpoint=resume)
        save_for_open_qa(trainer.model, tokenizer, output)
        atomic_write_json(output / SUMMARY, _summary(trainer, refresh, len(rows), settings))
        shutil.rmtree(scratch, ignore_errors=True)
    return trainer


__all__ = ["IndexCheckpoint", "pretrain_realm"]
