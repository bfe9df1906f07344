"""Optional warm start of a fresh masked-LM head: plain masked LM on the masked text alone.

REALM starts from BERT, whose masked-LM head is trained. Sentence encoders such as all-MiniLM-L6-v2 ship
without one, so [`from_encoders`][hf_knnlm.open_qa.pretraining.RealmForMaskedLM.from_encoders] gives a
random head (its decoder tied to the word embeddings): every masked token is then mispredicted, and the
marginal likelihood cannot tell which retrieved document helped. A few hundred steps of masked LM on the
corpus's masked sentences with the null document only (nothing is retrieved, so nothing reaches the
retriever) give the head its footing first. The head's own parameters (its transform and output bias)
take a larger learning rate than the pre-trained encoder, which must not be pushed far from its weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .collator import _pad
from .modeling import IGNORE_INDEX
from .warm_start import warm_start_steps


def null_document_batch(rows: Sequence[Mapping[str, Any]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """The inputs of [`RealmForMaskedLM`][hf_knnlm.open_qa.pretraining.RealmForMaskedLM] that give it the
    null document alone (the masked text, nothing retrieved) for masked rows (``input_ids``, ``labels``).

    Examples:

    ```python
    >>> from hf_knnlm.open_qa.pretraining.head_warmup import null_document_batch
    >>> batch = null_document_batch([{"input_ids": [2, 4, 7, 3], "labels": [-100, 5, -100, -100]}])
    >>> batch["joined_input_ids"].shape, batch["labels"][0, 0].tolist()  # one candidate: the null document
    (torch.Size([1, 1, 4]), [-100, 5, -100, -100])
    ```
    """
    ids = _pad([row["input_ids"] for row in rows], pad_token_id)
    labels = _pad([row["labels"] for row in rows], IGNORE_INDEX)
    mask = _pad([[1] * len(row["input_ids"]) for row in rows], 0)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "joined_input_ids": ids[:, None],
        "joined_attention_mask": mask[:, None],
        "labels": labels[:, None],
    }


def masked_lm_loss(model: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean negative log-likelihood per masked token of a
    [`null_document_batch`][hf_knnlm.open_qa.pretraining.head_warmup.null_document_batch]."""
    labels = batch["labels"]
    likelihood = model.mlm_log_likelihood(batch["joined_input_ids"], labels, batch["joined_attention_mask"])
    return -likelihood.sum() / (labels != IGNORE_INDEX).sum().clamp(min=1)


def head_parameters(encoder: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """``(head, rest)``: the masked-LM head's own parameters (not those tied to the input embeddings) and
    every other trainable parameter of ``encoder``."""
    head = getattr(encoder, "cls", None) or getattr(encoder, "lm_head", None)
    if head is None:
        raise ValueError(
            f"{type(encoder).__name__} has no masked-LM head (`cls` or `lm_head`); head_warm_start needs "
            "an AutoModelForMaskedLM encoder."
        )
    tied = {id(p) for p in encoder.get_input_embeddings().parameters()}
    own = {id(p) for p in head.parameters() if id(p) not in tied}
    trainable = [p for p in encoder.parameters() if p.requires_grad]
    return [p for p in trainable if id(p) in own], [p for p in trainable if id(p) not in own]


def head_warm_start(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    steps: int = 200,
    batch_size: int = 16,
    learning_rate: float = 5e-5,
    head_learning_rate: float = 1e-3,
    seed: int = 0,
) -> list[float]:
    """Train ``model``'s knowledge-augmented encoder in place as a plain masked LM on ``rows`` (those of
    [`masked_examples`][hf_knnlm.open_qa.pretraining.masked_examples]) with the null document only, for
    ``steps`` AdamW steps of ``batch_size`` rows: the masked-LM head's own parameters at
    ``head_learning_rate``, the rest of the encoder at ``learning_rate``. The retriever is not touched.
    Returns the loss (mean NLL per masked token) of every step.

    Examples:

    ```python
    >>> import torch
    >>> from hf_knnlm.open_qa.pretraining.testing import tiny_realm_mlm
    >>> from hf_knnlm.open_qa.pretraining import head_warm_start, masked_examples
    >>> model, tokenizer, index = tiny_realm_mlm()
    >>> rows = masked_examples(index, tokenizer)
    >>> before = [p.clone() for p in model.query_embedder.parameters()]
    >>> losses = head_warm_start(model, tokenizer, rows, steps=30, batch_size=2, head_learning_rate=1e-2)
    >>> len(losses), sum(losses[-5:]) < sum(losses[:5])
    (30, True)
    >>> kept = zip(before, model.query_embedder.parameters(), strict=True)  # the retriever is not trained
    >>> all(torch.equal(a, b) for a, b in kept)
    True
    ```
    """
    if not rows:
        raise ValueError("rows is empty: pass the masked rows of masked_examples(documents, tokenizer).")
    head, rest = head_parameters(model.encoder)
    optimizer = torch.optim.AdamW(
        [{"params": head, "lr": head_learning_rate}, {"params": rest, "lr": learning_rate}]
    )
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    return warm_start_steps(
        model, optimizer, rows, lambda chunk: masked_lm_loss(model, null_document_batch(chunk, pad)),
        steps=steps, batch_size=batch_size, seed=seed,
    )  # fmt: skip


__all__ = ["head_parameters", "head_warm_start", "masked_lm_loss", "null_document_batch"]
