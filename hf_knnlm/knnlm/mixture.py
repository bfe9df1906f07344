"""The kNN-LM distribution and its interpolation with the LM, in log space, from the
[`Neighbours`][hf_knnlm.Neighbours] of a search.

p_kNN(w) = sum over neighbours j with value w of softmax(-d_j / T + log count_j), and the output is
log(lmbda * p_kNN + (1 - lmbda) * p_LM), computed with ``logaddexp`` so that lmbda = 0 returns the
LM log-probs bit for bit and lmbda = 1 returns log p_kNN. Every caller (processor, wrapper,
evaluation, tuning, RetoMaton, gate, attribution, RAG + kNN, compression checks) goes through
[`mix`][hf_knnlm.mix] (a whole vocabulary) or [`mix_targets`][hf_knnlm.knnlm.mix_targets] (the observed
tokens only).
"""

from __future__ import annotations

import math

import torch

from ..datastore.neighbours import Neighbours
from .settings import KNNSettings


def neighbour_log_weights(
    distances: torch.Tensor, temperature: float, log_counts: torch.Tensor | None = None
) -> torch.Tensor:
    """log softmax(-d / T + log count) over the neighbours; missing neighbours (d = inf) get -inf.

    ``log_counts`` weighs entries of a pruned store by how many entries were merged into each.
    """
    logits = -distances.float() / temperature
    if log_counts is not None:
        logits = logits + log_counts.to(logits.device, torch.float32)
    weights = torch.log_softmax(logits, dim=-1)
    # A row with no neighbour at all (every d = inf) would be NaN; it has no kNN mass instead.
    return torch.nan_to_num(weights, nan=-math.inf)


def neighbour_weights(neighbours: Neighbours, temperature: float) -> torch.Tensor:
    """log of each neighbour's share of p_kNN, ``[Q, k]``."""
    return neighbour_log_weights(neighbours.distances, temperature, neighbours.log_counts)


def knn_log_probs(neighbours: Neighbours, vocab_size: int, temperature: float) -> torch.Tensor:
    """log p_kNN over the whole vocabulary, ``[Q, vocab_size]``.

    Examples:

    ```python
    >>> import torch
    >>> from hf_knnlm import Neighbours, knn_log_probs
    >>> nb = Neighbours(torch.tensor([[0.0, 0.0, 2.0]]), torch.tensor([[4, 5, 6]]), torch.tensor([[1, 1, 2]]))
    >>> knn_log_probs(nb, vocab_size=3, temperature=1.0).exp().round(decimals=3)
    tensor([[0.0000, 0.9370, 0.0630]])
    ```
    """
    probs = neighbour_weights(neighbours, temperature).exp()
    dense = torch.zeros(*probs.shape[:-1], vocab_size, dtype=probs.dtype, device=probs.device)
    dense.scatter_add_(-1, neighbours.token_ids.to(probs.device).clamp(0, vocab_size - 1).long(), probs)
    return dense.log()


def knn_target_log_probs(neighbours: Neighbours, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p_kNN(target) of each row, without materialising the vocabulary: ``[Q, k]`` -> ``[Q]``.

    Args:
        neighbours (`Neighbours`): ``[Q, k]`` neighbours of ``Q`` queries.
        targets (`torch.Tensor`): ``[Q]`` the token id to score in each row.
        temperature (`float`): divides the squared L2 distances before the softmax over neighbours.

    Returns:
        `torch.Tensor`: ``[Q]`` log p_kNN(target), ``-inf`` where no neighbour has the target as value;
        the same numbers as [`knn_log_probs`][hf_knnlm.knn_log_probs] gathered at ``targets``.

    Examples:

    ```python
    >>> import torch
    >>> from hf_knnlm import Neighbours
    >>> from hf_knnlm.knnlm import knn_target_log_probs
    >>> nb = Neighbours(torch.tensor([[0.0, 0.0, 2.0]]), torch.tensor([[4, 5, 6]]), torch.tensor([[1, 1, 2]]))
    >>> for target in (1, 2, 0):  # two near neighbours say 1, a farther one says 2, none says 0
    ...     print(target, knn_target_log_probs(nb, torch.tensor([target]), temperature=1.0).exp())
    1 tensor([0.9366])
    2 tensor([0.0634])
    0 tensor([0.])
    ```
    """
    weights = neighbour_weights(neighbours, temperature)
    matches = neighbours.token_ids.to(weights.device).long() == targets.to(weights.device).long().unsqueeze(
        -1
    )
    return torch.logsumexp(weights.masked_fill(~matches, -math.inf), dim=-1)


def interpolate(
    lm_log_probs: torch.Tensor, knn_log_probs: torch.Tensor, lmbda: float | torch.Tensor
) -> torch.Tensor:
    """log(lmbda * exp(knn) + (1 - lmbda) * exp(lm)), exact at lmbda in {0, 1}.

    Args:
        lm_log_probs (`torch.Tensor`): LM log-probs, ``[Q, V]`` or ``[Q]``.
        knn_log_probs (`torch.Tensor`): log p_kNN of the same shape.
        lmbda (`float` or `torch.Tensor`): the weight of p_kNN: one for every row, or one per row
            (``[Q]``, e.g. from a retrieval gate).

    Returns:
        `torch.Tensor`: the mixed log-probs (float32), of the shape of ``lm_log_probs``.

    Examples:

    ```python
    >>> import torch
    >>> from hf_knnlm import interpolate
    >>> lm, knn = torch.tensor([0.5, 0.1]).log(), torch.tensor([0.1, 0.9]).log()
    >>> interpolate(lm, knn, 0.5).exp()  # the average of the two probabilities
    tensor([0.3000, 0.5000])
    >>> interpolate(lm, knn, torch.tensor([0.0, 1.0])).exp()  # row 0: the LM, row 1: p_kNN
    tensor([0.5000, 0.9000])
    ```
    """
    if isinstance(lmbda, torch.Tensor):
        lmbda = lmbda.float().to(lm_log_probs.device)
        lmbda = lmbda.reshape(*lmbda.shape, *([1] * (lm_log_probs.dim() - lmbda.dim())))
        return torch.logaddexp(knn_log_probs.float() + lmbda.log(), lm_log_probs.float() + (-lmbda).log1p())
    log_l = math.log(lmbda) if lmbda > 0 else -math.inf
    log_1ml = math.log1p(-lmbda) if lmbda < 1 else -math.inf
    return torch.logaddexp(knn_log_probs.float() + log_l, lm_log_probs.float() + log_1ml)


def _temperature(settings: KNNSettings) -> float:
    if settings.temperature is None:
        raise ValueError(
            "settings.temperature is None (the datastore's calibrated temperature): resolve the settings "
            "for a store first, settings.resolve(datastore)."
        )
    return settings.temperature


def mix(
    neighbours: Neighbours,
    lm_log_probs: torch.Tensor,
    settings: KNNSettings,
    lmbda: torch.Tensor | None = None,
) -> torch.Tensor:
    """The kNN-LM log-probs over the vocabulary, ``[Q, V]``, from ``[Q, V]`` LM log-probs.

    Args:
        neighbours (`Neighbours`): ``[Q, k]`` neighbours of the ``Q`` queries.
        lm_log_probs (`torch.Tensor`): ``[Q, V]`` LM log-probs.
        settings (`KNNSettings`): ``lmbda`` and ``temperature`` (resolved for the
            store: ``settings.resolve(datastore)``).
        lmbda (`torch.Tensor`, *optional*): ``[Q]`` per-row weights (a gate's); overrides
            ``settings.lmbda``.

    Returns:
        `torch.Tensor`: ``[Q, V]`` log(lmbda p_kNN + (1 - lmbda) p_LM).

    Examples:

    ```python
    >>> import torch
    >>> from hf_knnlm import KNNSettings, Neighbours, mix
    >>> nb = Neighbours(torch.tensor([[0.0, 0.0, 2.0]]), torch.tensor([[4, 5, 6]]), torch.tensor([[1, 1, 2]]))
    >>> lm = torch.log_softmax(torch.tensor([[1.0, 2.0, 3.0]]), dim=-1)
    >>> settings = KNNSettings(k=3, lmbda=0.0, temperature=1.0)
    >>> torch.equal(mix(nb, lm, settings), lm)  # lmbda=0: the LM log-probs, bit for bit
    True
    >>> mix(nb, lm, settings.replace(lmbda=1.0)).exp()  # lmbda=1: p_kNN alone
    tensor([[0.0000, 0.9366, 0.0634]])
    >>> mix(nb, lm, settings.replace(lmbda=0.5)).exp()
    tensor([[0.0450, 0.5907, 0.3643]])
    ```
    """
    knn = knn_log_probs(neighbours, lm_log_probs.shape[-1], _temperature(settings))
    return interpolate(lm_log_probs, knn.to(lm_log_probs.device), settings.lmbda if lmbda is None else lmbda)


def mix_targets(
    neighbours: Neighbours,
    lm_target_log_probs: torch.Tensor,
    targets: torch.Tensor,
    settings: KNNSettings,
    lmbda: torch.Tensor | None = None,
) -> torch.Tensor:
    """The kNN-LM log-prob of each target, ``[Q]``, from the LM's log-prob of it (``[Q]``).

    What [`mix`][hf_knnlm.mix] gives at the targets, without a ``[Q, V]`` tensor: evaluation and tuning
    score every token of a text this way.

    Args:
        neighbours (`Neighbours`): ``[Q, k]`` neighbours of the ``Q`` queries.
        lm_target_log_probs (`torch.Tensor`): ``[Q]`` the LM's log-prob of each target.
        targets (`torch.Tensor`): ``[Q]`` the target token ids.
        settings (`KNNSettings`): ``lmbda`` and ``temperature`` (resolved).
        lmbda (`torch.Tensor`, *optional*): ``[Q]`` per-row weights (a gate's); overrides
            ``settings.lmbda``.

    Returns:
        `torch.Tensor`: ``[Q]`` log(lmbda p_kNN(target) + (1 - lmbda) p_LM(target)).

    Examples:

    ```python
    >>> import torch
    >>> from hf_knnlm import KNNSettings, Neighbours, mix
    >>> from hf_knnlm.knnlm import mix_targets
    >>> nb = Neighbours(torch.tensor([[0.0, 0.0, 2.0]]), torch.tensor([[4, 5, 6]]), torch.tensor([[1, 1, 2]]))
    >>> lm = torch.log_softmax(torch.tensor([[1.0, 2.0, 3.0]]), dim=-1)
    >>> settings = KNNSettings(k=3, lmbda=0.5, temperature=1.0)
    >>> target = torch.tensor([2])
    >>> mix_targets(nb, lm[:, 2], target, settings).exp()  # p(2) of the mixture
    tensor([0.3643])
    >>> torch.allclose(mix_targets(nb, lm[:, 2], target, settings), mix(nb, lm, settings)[:, 2])
    True
    ```
    """
    knn = knn_target_log_probs(neighbours, targets, _temperature(settings)).to(lm_target_log_probs.device)
    return interpolate(lm_target_log_probs, knn, settings.lmbda if lmbda is None else lmbda)


__all__ = [
    "interpolate",
    "knn_log_probs",
    "knn_target_log_probs",
    "mix",
    "mix_targets",
    "neighbour_log_weights",
    "neighbour_weights",
]
