"""Fine-tune :class:`RealmForOpenQA` with the stock ``transformers.Trainer``.

Nothing here is a custom loop: the model returns its loss first, :class:`RealmDataCollator` does retrieval and
labelling, and the only additions are two learning rates (pre-trained encoders vs. the freshly initialised
span head and projections) and the optional index-refresh callback.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from .callbacks import IndexRefreshCallback
from .data import RealmDataCollator
from .document_index import DocumentIndex

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
    encoder (``retriever_learning_rate``, default ``learning_rate``) and the freshly initialised span head and
    projections (``head_learning_rate``, default ``learning_rate``)."""
    rates = {
        "reader": learning_rate,
        "retriever": retriever_learning_rate or learning_rate,
        "head": head_learning_rate or learning_rate,
    }
    params: dict[str, list[torch.nn.Parameter]] = {group: [] for group in rates}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if any(part in name for part in _NEW_PARAMETERS):
            params["head"].append(parameter)
        elif name.startswith("query_embedder."):
            params["retriever"].append(parameter)
        else:
            params["reader"].append(parameter)
    groups = [{"params": params[group], "lr": rate} for group, rate in rates.items()]
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=weight_decay)


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
    warmup_steps: int = 0,
    refresh_index_every: int = 0,
    top_k: int | None = None,
    seed: int = 0,
    logging_steps: int = 10,
    disable_tqdm: bool = False,
    **training_arguments: Any,
) -> Trainer:
    """Run ``Trainer.train`` on rows with ``question`` and ``answers``; returns the trainer (its
    ``state.log_history`` has the losses). ``refresh_index_every=0`` keeps the index fixed, as REALM
    fine-tuning does."""
    args = TrainingArguments(
        output_dir=str(output_dir),
        remove_unused_columns=False,  # the collator needs the raw question / answers columns
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
        **training_arguments,
    )
    callbacks = [IndexRefreshCallback(index, tokenizer, refresh_index_every)] if refresh_index_every else []
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


__all__ = ["realm_optimizer", "train_realm"]
