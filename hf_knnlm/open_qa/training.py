"""Fine-tune [`RealmForOpenQA`][hf_knnlm.open_qa.RealmForOpenQA] with the stock ``transformers.Trainer``.

Nothing here is a custom loop: the model returns its loss first,
[`RealmDataCollator`][hf_knnlm.open_qa.RealmDataCollator] does retrieval and labelling, and the only additions
are two learning rates (pre-trained encoders vs. the freshly initialised span head and projections) and the
optional index-refresh callback.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..retrieval.document_index import DocumentIndex
from .callbacks import IndexRefreshCallback
from .data import RealmDataCollator

# Parameters that start random in ``from_encoder``: they need a larger step than the pre-trained encoders.
_NEW_PARAMETERS = ("span_head.", "projection.")


def realm_optimizer(
    model: torch.nn.Module,
    learning_rate: float,
    head_learning_rate: float | None = None,
    weight_decay: float = 0.0,
    retriever_learning_rate: float | None = None,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters in three groups: the reader encoder (``learning_rate``), the query
    and document encoders (``retriever_learning_rate``, default ``learning_rate``) and the freshly
    initialised span head and projections (``head_learning_rate``, default ``learning_rate``).

    Examples:

    ```python
    >>> from hf_knnlm.open_qa.testing import tiny_realm
    >>> model, tokenizer, index = tiny_realm()  # a random 1-layer REALM, documents paris and rome
    >>> from hf_knnlm.open_qa import realm_optimizer
    >>> optimizer = realm_optimizer(model, learning_rate=1e-5, head_learning_rate=1e-3,
    ...                             retriever_learning_rate=3e-6)
    >>> sorted({group["lr"] for group in optimizer.param_groups})  # query encoder, reader, fresh heads
    [3e-06, 1e-05, 0.001]
    ```
    """
    rates = {
        "reader": learning_rate,
        "retriever": learning_rate if retriever_learning_rate is None else retriever_learning_rate,
        "head": learning_rate if head_learning_rate is None else head_learning_rate,
    }
    params: dict[str, list[torch.nn.Parameter]] = {group: [] for group in rates}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if any(part in name for part in _NEW_PARAMETERS):
            params["head"].append(parameter)
        elif name.startswith(("query_embedder.", "doc_embedder.")):
            params["retriever"].append(parameter)
        else:
            params["reader"].append(parameter)
    groups = [{"params": params[group], "lr": rate} for group, rate in rates.items()]
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=weight_decay)


class FreezeRetrieverCallback(TrainerCallback):
    """Keep the query encoder frozen for the first ``steps`` optimizer steps, while the span head and reader
    adapt to retrieved documents; its gradients through p(z|x) are noisiest while the reader is still moving.
    """

    def __init__(self, steps: int):
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}.")
        self.steps = steps

    def _set(self, model: Any, trainable: bool) -> None:
        if model is not None:
            model.query_embedder.requires_grad_(trainable)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._set(model, state.global_step >= self.steps)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.steps:
            self._set(model, True)
        return control


def training_arguments_for(
    output_dir: str | os.PathLike,
    *,
    batch_size: int,
    epochs: float,
    max_steps: int,
    warmup_steps: float,
    logging_steps: float,
    seed: int,
    disable_tqdm: bool,
    **extra: Any,
) -> TrainingArguments:
    """The ``TrainingArguments`` both open-QA trainings share: no reporting, no pinned memory, and by
    default no Trainer checkpoints (the trained model is saved as safetensors at the end); ``extra``
    overrides any of these (``train_reader(save_steps=...)`` turns checkpoints on: a resumable run)."""
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        num_train_epochs=epochs,
        max_steps=max_steps,
        warmup_steps=warmup_steps,
        logging_steps=logging_steps,
        save_strategy="no",
        report_to=[],
        seed=seed,
        disable_tqdm=disable_tqdm,
        dataloader_pin_memory=False,
    )
    return TrainingArguments(**{**settings, **extra})


def _check_workers(num_workers: int, train_dataset: Any, refresh_index_every: int) -> None:
    """Refuse ``dataloader_num_workers > 0`` where workers would retrieve or read a stale index."""
    if num_workers == 0:
        return
    columns = getattr(train_dataset, "column_names", None) or []
    if "doc_positions" not in columns:
        raise ValueError(
            f"dataloader_num_workers={num_workers}: the collator retrieves with the live query encoder, "
            "which a worker process only holds a stale copy of. Use dataloader_num_workers=0, or first run "
            "precompute_retrieval(train_dataset, model, tokenizer, index) so workers only build features."
        )
    if refresh_index_every:
        raise ValueError(
            f"dataloader_num_workers={num_workers} with refresh_index_every={refresh_index_every}: workers "
            "keep the document vectors of the index as it was when they started and never see a refresh. Use "
            "dataloader_num_workers=0 or refresh_index_every=0."
        )


def train_realm(
    model: Any,
    tokenizer: Any,
    index: DocumentIndex,
    train_dataset: Any,
    *,
    output_dir: str | os.PathLike,
    epochs: float = 1.0,
    max_steps: int = -1,
    batch_size: int = 2,
    learning_rate: float = 3e-5,
    head_learning_rate: float | None = 1e-3,
    retriever_learning_rate: float | None = None,
    warmup_steps: float = 0,
    retriever_frozen_steps: int = 0,
    refresh_index_every: int = 0,
    top_k: int | None = None,
    seed: int = 0,
    logging_steps: int = 10,
    disable_tqdm: bool = False,
    **training_arguments: Any,
) -> Trainer:
    """Run ``Trainer.train`` on rows with ``question`` and ``answers``; returns the trainer (its
    ``state.log_history`` has the losses). ``refresh_index_every=0`` keeps the index fixed, as REALM
    fine-tuning does. ``warmup_steps`` is a step count, or a ratio of the steps when below 1. The query
    encoder trains at ``learning_rate`` from the first step unless ``retriever_learning_rate`` (a rate of its
    own) or ``retriever_frozen_steps`` say otherwise; with a warm-started reader that default kept the most
    held-out recall on SQuAD (docs/benchmarks/index.md, "REALM open-domain QA").

    Examples:

    ```python
    >>> from hf_knnlm.open_qa import train_realm
    >>> from hf_knnlm.open_qa.testing import tiny_questions, tiny_realm
    >>> model, tokenizer, index = tiny_realm()  # a random 1-layer REALM, documents paris and rome
    >>> rows = tiny_questions()  # a datasets.Dataset: question, answers
    >>> trainer = train_realm(model, tokenizer, index, rows, output_dir="realm-out", max_steps=2,
    ...                       batch_size=2, disable_tqdm=True, logging_steps=1, report_to=[])
    {...}
    >>> trainer.state.global_step, "loss" in trainer.state.log_history[0]
    (2, True)
    ```
    """
    args = training_arguments_for(
        output_dir,
        batch_size=batch_size,
        epochs=epochs,
        max_steps=max_steps,
        warmup_steps=warmup_steps,
        logging_steps=logging_steps,
        seed=seed,
        disable_tqdm=disable_tqdm,
        remove_unused_columns=False,  # the collator needs the raw question / answers columns
        **training_arguments,
    )
    _check_workers(args.dataloader_num_workers, train_dataset, refresh_index_every)
    callbacks = [IndexRefreshCallback(index, tokenizer, refresh_index_every)] if refresh_index_every else []
    if retriever_frozen_steps:
        callbacks.append(FreezeRetrieverCallback(retriever_frozen_steps))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=RealmDataCollator(model, tokenizer, index, top_k=top_k),
        optimizers=(
            realm_optimizer(
                model, learning_rate, head_learning_rate, retriever_learning_rate=retriever_learning_rate
            ),
            None,
        ),
        callbacks=callbacks,
    )
    trainer.train()
    return trainer


__all__ = ["FreezeRetrieverCallback", "realm_optimizer", "train_realm", "training_arguments_for"]
