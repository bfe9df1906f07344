"""The training loop the warm starts share: plain AdamW steps on a sampled batch, no Trainer.

[`ict_warm_start`][hf_knnlm.open_qa.pretraining.ict_warm_start] and
[`head_warm_start`][hf_knnlm.open_qa.pretraining.head_warm_start] are short, in-place stages before
[`pretrain_realm`][hf_knnlm.open_qa.pretraining.pretrain_realm]; they differ only in their loss and batches.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

Row = TypeVar("Row")


def warm_start_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    pool: Sequence[Row],
    loss_of: Callable[[list[Row]], torch.Tensor],
    *,
    steps: int,
    batch_size: int,
    seed: int = 0,
) -> list[float]:
    """``steps`` optimizer steps of ``loss_of(batch)``, each batch ``batch_size`` rows sampled from ``pool``
    without replacement (seeded), the model in training mode and then back as it was; every step's loss.

    Examples:

    ```python
    >>> import torch
    >>> from hf_knnlm.open_qa.pretraining.warm_start import warm_start_steps
    >>> weight = torch.nn.Linear(1, 1, bias=False)
    >>> optimizer = torch.optim.SGD(weight.parameters(), lr=0.1)
    >>> losses = warm_start_steps(weight, optimizer, [1.0, 2.0], lambda xs: (weight.weight * sum(xs)) ** 2,
    ...                           steps=3, batch_size=2)
    >>> len(losses), losses[-1] < losses[0]
    (3, True)
    ```
    """
    rows: list[Any] = list(pool)
    rng, losses = random.Random(seed), []
    was_training = model.training
    model.train()
    try:
        for _ in range(steps):
            loss = loss_of(rng.sample(rows, min(batch_size, len(rows))))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        model.train(was_training)
    return losses


__all__ = ["warm_start_steps"]
