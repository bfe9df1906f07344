"""The kNN-LM distribution and its interpolation with the LM, in log space.

p_kNN(w) = sum over neighbours j with value w of softmax(-d_j / T), and the output is
log(lmbda * p_kNN + (1 - lmbda) * p_LM), computed with ``logaddexp`` so that lmbda = 0 returns the
LM log-probs bit for bit and lmbda = 1 returns log p_kNN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..utils.checks import check_flag, check_fraction, check_positive_finite, check_positive_int


def check_k(k: int) -> None:
    check_positive_int("k", k, "the number of neighbours, e.g. k=1024")


def check_lmbda(lmbda: float) -> None:
    check_fraction("lmbda", lmbda, "it is the weight of p_kNN in the mixture")


def check_temperature(temperature: float) -> None:
    check_positive_finite("temperature", temperature, "it divides the neighbour distances")


_SETTING_CHECKS = {
    "k": check_k,
    "lmbda": check_lmbda,
    "temperature": check_temperature,
    "recompute_dists": lambda value: check_flag("recompute_dists", value),
}


def check_setting(name: str, value) -> None:
    """Validate one field of :class:`KNNSettings` by name."""
    _SETTING_CHECKS[name](value)


def check_knn_args(k: int, lmbda: float, temperature: float) -> None:
    check_k(k)
    check_lmbda(lmbda)
    check_temperature(temperature)


@dataclass
class KNNSettings:
    """k, lmbda, temperature and recompute_dists of the mixture; every assignment is validated."""

    k: int = 1024
    lmbda: float = 0.25
    temperature: float = 1.0
    recompute_dists: bool = False

    def __setattr__(self, name: str, value) -> None:
        if name in _SETTING_CHECKS:
            check_setting(name, value)
        object.__setattr__(self, name, value)


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
