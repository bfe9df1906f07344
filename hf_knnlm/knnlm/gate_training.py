"""Fitting the adaptive-retrieval gate ([`RetrievalGate`][hf_knnlm.RetrievalGate]) on held-out text.

The model runs once over the text and every token is searched once (``hf_knnlm.knnlm.scored``);
the gate is then fitted on the cached LM features, queries and target log-probs under the LM and under
p_kNN, full-batch, to maximise log(lmbda_t p_kNN(y) + (1 - lmbda_t) p_LM(y)).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from torch import nn

from ..lm.corpus import CorpusLike
from ..lm.forward import check_forward_args
from ..lm.windows import WindowSettings
from ..utils.checks import check_flag
from ..utils.files import folder_lock
from .evaluation import recorded_windows
from .gate import RetrievalGate, lm_features
from .gate_settings import GateTraining
from .mixture import knn_target_log_probs
from .policies import PlainSearch
from .scored import ScoredTokens, iter_scored_batches, scored_tokens
from .settings import KNNSettings, settings_from


def _split(n: int, calibration_fraction: float) -> int:
    """How many of ``n`` tokens are fitted (the rest calibrate the skip threshold)."""
    fit = n - int(calibration_fraction * n)
    if fit < 1 or (calibration_fraction > 0 and fit == n):
        raise ValueError(
            f"{n} tokens cannot be split by calibration_fraction={calibration_fraction}; pass more text or "
            "calibration_fraction=0."
        )
    return fit


def _initial_gate(
    features: torch.Tensor, queries: torch.Tensor | None, training: GateTraining
) -> RetrievalGate:
    torch.manual_seed(training.seed)
    gate = RetrievalGate(0 if queries is None else queries.shape[-1], training.width)
    raw = torch.cat([features.float()] + ([] if queries is None else [queries.float()]), -1)
    gate.mean.copy_(raw.mean(0))
    gate.std.copy_(raw.std(0).clamp_min(1e-6))
    return gate


def _optimise(gate, features, queries, lm_target, knn_target, training: GateTraining) -> float:
    lm_target, knn_target = lm_target.float(), knn_target.float()
    optimizer = torch.optim.Adam(
        gate.parameters(), lr=training.learning_rate, weight_decay=training.weight_decay
    )
    for _ in range(training.epochs):
        optimizer.zero_grad()
        z = gate.logits(features, queries)
        mixed = torch.logaddexp(
            nn.functional.logsigmoid(z) + knn_target, nn.functional.logsigmoid(-z) + lm_target
        )
        loss = -mixed.mean()
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def fit_gate(
    features: torch.Tensor,
    queries: torch.Tensor | None,
    lm_target: torch.Tensor,
    knn_target: torch.Tensor,
    training: GateTraining | None = None,
    **overrides: Any,
) -> RetrievalGate:
    """Fit a gate on cached tokens: LM features ``[n, 3]``, queries ``[n, d]`` (or None: LM features
    only), and the log-probs of the target under the LM and under p_kNN (``[n]``).

    ``skip_below`` is set to the ``skip_fraction`` quantile of lmbda_t. With ``calibration_fraction``
    > 0 the last such share of the tokens is not fitted and the quantile is taken on it: a gate that
    reads queries fits its training tokens closely, so a quantile taken there skips less than
    ``skip_fraction`` of unseen text.

    Args:
        features (`torch.Tensor`): ``[n, 3]`` LM features (``RetrievalGate.lm_features``).
        queries (`torch.Tensor`, *optional*): ``[n, d]`` query vectors, or None for a gate that reads
            the LM features only.
        lm_target (`torch.Tensor`): ``[n]`` log p_LM of each target.
        knn_target (`torch.Tensor`): ``[n]`` log p_kNN of each target
            ([`knn_target_log_probs`][hf_knnlm.knnlm.knn_target_log_probs]).
        training (`GateTraining`, *optional*): how the gate is fitted;
            ``overrides`` change single fields of it, e.g. ``epochs=100``.

    Returns:
        [`RetrievalGate`][hf_knnlm.RetrievalGate]: the fitted gate (in eval mode), with ``skip_below``
        set and what it was fitted on in ``info``.

    Examples:

    ```python
    >>> import torch
    >>> from hf_knnlm.knnlm import fit_gate
    >>> _ = torch.manual_seed(0)
    >>> unsure = torch.arange(200) % 2 == 0  # where the LM is unsure, the datastore knows the token
    >>> features = torch.stack([torch.where(unsure, 5.0, 0.5), torch.where(unsure, -5.0, -0.1),
    ...                         torch.where(unsure, 0.1, 3.0)], dim=-1) + 0.01 * torch.randn(200, 3)
    >>> lm_target = torch.where(unsure, -5.0, -0.1)
    >>> knn_target = torch.where(unsure, -0.1, -8.0)
    >>> gate = fit_gate(features, None, lm_target, knn_target, skip_fraction=0.4,
    ...                 calibration_fraction=0.0, epochs=100)
    >>> lmbda = gate.lmbda(features)
    >>> bool(lmbda[unsure].min() > 0.9), bool(lmbda[~unsure].max() < 0.05)  # trusts p_kNN where it helps
    (True, True)
    >>> int((lmbda == 0).sum())  # skip_fraction=0.4 of the 200 tokens are not searched
    80
    ```
    """
    training = (training or GateTraining()).replace(**overrides)
    fit = _split(len(lm_target), training.calibration_fraction)
    held = (features[fit:], None if queries is None else queries[fit:])
    features, queries = features[:fit], None if queries is None else queries[:fit]
    calibration = held if len(held[0]) else (features, queries)
    gate = _initial_gate(features, queries, training)
    train_nll = _optimise(gate, features, queries, lm_target[:fit], knn_target[:fit], training)
    gate.eval()
    with torch.no_grad():
        lam = torch.sigmoid(gate.logits(*calibration))
    skip = training.skip_fraction
    gate.skip_below = float(torch.quantile(lam, skip)) if skip > 0 else 0.0
    gate.info = {
        "train_tokens": fit,
        "calibration_tokens": len(held[0]),
        "skip_fraction": skip,
        "train_nll": train_nll,
    }
    return gate


def _gate_data(
    model, tokenizer, data, datastore, settings, windows, training, text_column, max_tokens, progress
):
    """One pass over ``data``: every token searched once, with the LM features and queries kept, and
    ``log p_kNN(target)`` of every token; the ``[tokens x k]`` neighbours are dropped batch by batch."""
    windows = windows.resolve(recorded_windows(datastore))
    check_forward_args(model, windows.max_length, windows.stride, windows.batch_size)
    tokens = scored_tokens(model, tokenizer, data, datastore, text_column, max_tokens)
    policy = PlainSearch(datastore, settings)
    batches = iter_scored_batches(
        model,
        tokens,
        datastore,
        policy,
        windows,
        keep_queries=training.use_queries,
        lm_features=lm_features,
        disable_progress=progress,
        desc="gate data",
    )
    parts, knn = [], []
    for batch in batches:  # neighbours held for the whole text would grow with it (8 kB a token at k 1024)
        knn.append(knn_target_log_probs(batch.neighbours, batch.targets, settings.temperature))
        batch.neighbours = None
        parts.append(batch)
    return ScoredTokens.cat(parts), torch.cat(knn), windows


def train_gate(
    model: torch.nn.Module,
    tokenizer,
    data: CorpusLike,
    datastore,
    *,
    settings: KNNSettings | None = None,
    windows: WindowSettings | None = None,
    training: GateTraining | None = None,
    text_column: str = "text",
    max_tokens: int | None = None,
    save: bool = True,
    disable_progress: bool | None = None,
    **overrides: Any,
) -> RetrievalGate:
    """Run the model over held-out ``data``, search every token once, fit a gate and save it with the
    store (unless ``save=False``).

    Args:
        settings (`KNNSettings`, *optional*): the k and temperature the kNN-LM will use (default: the
            store's calibrated temperature).
        windows (`WindowSettings`, *optional*): the windows (default: the store's).
        training (`GateTraining`, *optional*): how the gate is fitted.
        overrides: single fields of any of the three, e.g. ``k=64, skip_fraction=0.4, max_length=512``.

    Returns:
        [`RetrievalGate`][hf_knnlm.RetrievalGate]: the fitted gate; ``info`` records the tokens, k,
        temperature and windows it was fitted with.

    Examples:

    ```python
    >>> from hf_knnlm.datastore.testing import tiny_datastore
    >>> from hf_knnlm import evaluate_perplexity, train_gate
    >>> text = ["The cat sat on the mat. The dog sat on the log."]
    >>> model, tokenizer, store = tiny_datastore("store", text, seed=0)
    >>> gate = train_gate(model, tokenizer, text, store, k=4, epochs=20, calibration_fraction=0.0,
    ...                   disable_progress=True)  # held-out text in practice
    >>> (store.folder / "gate.safetensors").is_file(), gate.info["train_tokens"]
    (True, 13)
    >>> result = evaluate_perplexity(model, tokenizer, text, store, k=4, lmbda=0.5, gate=True,
    ...                              disable_progress=True)
    >>> result.steps, result.searches < result.steps  # the gate skipped some searches
    (13, True)
    >>> result.knn_ppl < result.base_ppl
    True
    ```
    """
    check_flag("save", save)
    gate_changes = {name: overrides.pop(name) for name in list(overrides) if name in _TRAINING_FIELDS}
    training = (training or GateTraining()).replace(**gate_changes)
    settings, windows = settings_from(settings, windows, overrides)
    settings = settings.replace(retomaton=None, gate=False).resolve(datastore)
    # Held from the start: a build or save of the store under way fails this at once, not after the pass.
    with folder_lock(datastore.folder) if save else contextlib.nullcontext():
        cache, knn, windows = _gate_data(
            model,
            tokenizer,
            data,
            datastore,
            settings,
            windows,
            training,
            text_column,
            max_tokens,
            disable_progress,
        )
        queries = cache.queries if training.use_queries else None
        gate = fit_gate(cache.lm_features, queries, cache.lm_log_probs, knn, training)
        gate.info.update({"k": settings.k, "temperature": settings.temperature, **windows.to_dict()})
        if save:
            gate.save_to_datastore(datastore, lock=False)  # this call holds the lock
    return gate


_TRAINING_FIELDS = tuple(f.name for f in dataclasses.fields(GateTraining))


__all__ = ["GateTraining", "fit_gate", "train_gate"]
