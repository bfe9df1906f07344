"""The kNN-LM distribution and its interpolation with the LM, in log space.

p_kNN(w) = sum over neighbours j with value w of softmax(-d_j / T), and the output is
log(lmbda * p_kNN + (1 - lmbda) * p_LM), computed with ``logaddexp`` so that lmbda = 0 returns the
LM log-probs bit for bit and lmbda = 1 returns log p_kNN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def check_knn_args(k: int, lmbda: float, temperature: float) -> None:
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k={k!r} must be a positive integer (the number of neighbours, e.g. k=1024).")
    if not 0.0 <= lmbda <= 1.0:
        raise ValueError(f"lmbda={lmbda!r} must be in [0, 1]: it is the weight of p_kNN in the mixture.")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0; it divides the neighbour distances.")


@dataclass
class KNNSettings:
    """k, lmbda and temperature of the mixture, validated once."""

    k: int = 1024
    lmbda: float = 0.25
    temperature: float = 1.0
    recompute_dists: bool = False

    def __post_init__(self) -> None:
        check_knn_args(self.k, self.lmbda, self.temperature)


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


def knn_log_probs(
    distances: torch.Tensor,
    token_ids: torch.Tensor,
    vocab_size: int,
    temperature: float,
    log_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """log p_kNN over the whole vocabulary: ``[..., k]`` neighbours -> ``[..., vocab_size]``."""
    probs = neighbour_log_weights(distances, temperature, log_counts).exp()
    dense = torch.zeros(*probs.shape[:-1], vocab_size, dtype=probs.dtype, device=probs.device)
    dense.scatter_add_(-1, token_ids.clamp(0, vocab_size - 1).long(), probs)
    return dense.log()


def knn_target_log_probs(
    distances: torch.Tensor,
    token_ids: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    log_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """log p_kNN(target) only, without materialising the vocabulary: ``[Q, k]`` -> ``[Q]``."""
    weights = neighbour_log_weights(distances, temperature, log_counts)
    matches = token_ids.long() == targets.long().unsqueeze(-1)
    return torch.logsumexp(weights.masked_fill(~matches, -math.inf), dim=-1)


def interpolate(
    lm_log_probs: torch.Tensor, knn_log_probs: torch.Tensor, lmbda: float | torch.Tensor
) -> torch.Tensor:
    """log(lmbda * exp(knn) + (1 - lmbda) * exp(lm)), exact at lmbda in {0, 1}.

    ``lmbda`` is one weight, or one per row (``[Q]``, e.g. from a retrieval gate) for ``[Q, V]`` or
    ``[Q]`` log-probs.
    """
    if isinstance(lmbda, torch.Tensor):
        lmbda = lmbda.float().to(lm_log_probs.device)
        lmbda = lmbda.reshape(*lmbda.shape, *([1] * (lm_log_probs.dim() - lmbda.dim())))
        return torch.logaddexp(knn_log_probs.float() + lmbda.log(), lm_log_probs.float() + (-lmbda).log1p())
    log_l = math.log(lmbda) if lmbda > 0 else -math.inf
    log_1ml = math.log1p(-lmbda) if lmbda < 1 else -math.inf
    return torch.logaddexp(knn_log_probs.float() + log_l, lm_log_probs.float() + log_1ml)
