"""Adaptive retrieval (He et al., 2021): a small learned gate that sets lmbda per token or skips the search.

The gate sees what the LM already knows before any search: the entropy of its next-token
distribution, its top log-prob and the margin to the second, and optionally (``use_queries``) the
query vector itself, which ranks tokens far better but needs tens of thousands of training tokens
and weight decay (on a few thousand it over-fits; docs/benchmarks.md). A two-layer MLP maps them to
lmbda_t in (0, 1), trained on held-out text to maximise log(lmbda_t p_kNN(y) + (1 - lmbda_t) p_LM(y)).
Tokens whose lmbda_t falls below ``skip_below`` (the ``skip_fraction`` quantile of lmbda_t on held-back
calibration tokens, or on the training tokens) are not searched at all and keep p_LM exactly.

The gate is saved with its datastore as ``gate.safetensors`` (weights, feature scaling and
settings in the metadata), hashed in the store's config like every other file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..datastore.extras import GATE_NAME, register_files
from ..datastore.neighbours import Neighbours
from ..utils.files import atomic_path
from .mixture import KNNSettings

LM_FEATURES = ("entropy", "max_log_prob", "top2_margin")


def lm_features(log_probs: torch.Tensor) -> torch.Tensor:
    """``[n, V]`` LM log-probs -> ``[n, 3]``: entropy, top log-prob, top-1 minus top-2 log-prob."""
    log_probs = log_probs.float()
    entropy = -(log_probs.exp() * log_probs.nan_to_num(neginf=0.0)).sum(-1)
    top = log_probs.topk(2, dim=-1).values
    return torch.stack([entropy, top[:, 0], top[:, 0] - top[:, 1]], dim=-1)


class RetrievalGate(nn.Module):
    """lmbda_t = sigmoid(MLP(standardised [LM features, query])); no search below ``skip_below``.

    Args:
        hidden_size (`int`): width of the queries (0: LM features only).
        width (`int`, defaults to 16): hidden units of the MLP.
        skip_below (`float`, defaults to 0.0): tokens whose lmbda_t is below it are not searched.
    """

    def __init__(self, hidden_size: int, width: int = 16, skip_below: float = 0.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.width = width
        self.skip_below = skip_below
        n_in = len(LM_FEATURES) + hidden_size
        self.register_buffer("mean", torch.zeros(n_in))
        self.register_buffer("std", torch.ones(n_in))
        self.mlp = nn.Sequential(nn.Linear(n_in, width), nn.ReLU(), nn.Linear(width, 1))
        self.info: dict = {}

    lm_features = staticmethod(lm_features)

    def inputs(self, features: torch.Tensor, queries: torch.Tensor | None) -> torch.Tensor:
        parts = [features.float()]
        if self.hidden_size:
            if queries is None or queries.shape[-1] != self.hidden_size:
                raise ValueError(f"this gate reads queries of width {self.hidden_size}; pass them.")
            parts.append(queries.float().to(features.device))
        return (torch.cat(parts, -1) - self.mean) / self.std

    def logits(self, features: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        return self.mlp(self.inputs(features, queries)).squeeze(-1)

    @torch.no_grad()
    def lmbda(self, features: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """lmbda_t per token, 0 where the gate skips the search."""
        lam = torch.sigmoid(self.logits(features, queries))
        return torch.where(lam < self.skip_below, torch.zeros_like(lam), lam)

    # ----------------------------------------------------------------- files
    def save(self, path: str | os.PathLike) -> None:
        meta = {"hidden_size": self.hidden_size, "width": self.width, "skip_below": self.skip_below}
        meta = {
            "config": json.dumps(meta),
            "info": json.dumps(self.info),
            "features": json.dumps(LM_FEATURES),
        }
        tensors = {name: t.detach().contiguous() for name, t in self.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> RetrievalGate:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        if json.loads(meta.get("features", "[]")) != list(LM_FEATURES):
            raise ValueError(
                f"{path} was trained on other features {meta.get('features')}; retrain the gate."
            )
        gate = cls(**json.loads(meta["config"]))
        gate.load_state_dict(tensors)
        gate.info = json.loads(meta.get("info", "{}"))
        return gate.eval()

    def save_to_datastore(self, datastore) -> None:
        """Write ``gate.safetensors`` into the store's folder and record its sha256 in the config."""
        self.save(datastore.folder / GATE_NAME)
        register_files(datastore.folder, datastore.config, [GATE_NAME])

    @classmethod
    def from_datastore(cls, datastore) -> RetrievalGate:
        if GATE_NAME not in datastore.config.files:
            raise ValueError(
                f"{datastore.folder} has no retrieval gate; train one with `hf-knnlm train-gate` "
                f"(or hf_knnlm.knnlm.gate.train_gate) on held-out text."
            )
        return cls.from_file(datastore.folder / GATE_NAME)


def load_gate(gate, datastore) -> RetrievalGate:
    """``True`` -> the store's gate; a path -> that file; a :class:`RetrievalGate` -> itself."""
    if isinstance(gate, RetrievalGate):
        return gate
    if gate is True:
        return RetrievalGate.from_datastore(datastore)
    if isinstance(gate, (str, os.PathLike)) and Path(gate).is_file():
        return RetrievalGate.from_file(gate)
    raise ValueError(f"gate={gate!r} is not a RetrievalGate, True (the store's gate) or a gate file.")


# ----------------------------------------------------------------- training
def fit_gate(
    features: torch.Tensor,
    queries: torch.Tensor | None,
    lm_target: torch.Tensor,
    knn_target: torch.Tensor,
    *,
    skip_fraction: float = 0.5,
    calibration_fraction: float = 0.0,
    width: int = 16,
    epochs: int = 300,
    lr: float = 1e-2,
    weight_decay: float = 1e-2,
    seed: int = 0,
) -> RetrievalGate:
    """Fit a gate on cached tokens: LM features ``[n, 3]``, queries ``[n, d]`` (or None), and the
    log-probs of the target under the LM and under p_kNN (``[n]``), full-batch Adam.

    ``skip_below`` is set to the ``skip_fraction`` quantile of lmbda_t. With ``calibration_fraction``
    > 0 the last such share of the tokens is not fitted and the quantile is taken on it: a gate that
    reads queries fits its training tokens closely, so a quantile taken there skips less than
    ``skip_fraction`` of unseen text.
    """
    if not 0.0 <= skip_fraction < 1.0:
        raise ValueError(
            f"skip_fraction={skip_fraction} must be in [0, 1): the share of tokens not searched."
        )
    if not 0.0 <= calibration_fraction < 1.0:
        raise ValueError(
            f"calibration_fraction={calibration_fraction} must be in [0, 1) (e.g. 0.2): the share of "
            "tokens kept out of fitting to set the skip threshold."
        )
    fit = len(lm_target) - int(calibration_fraction * len(lm_target))
    if fit < 1 or (calibration_fraction > 0 and fit == len(lm_target)):
        raise ValueError(
            f"{len(lm_target)} tokens cannot be split by calibration_fraction={calibration_fraction}; "
            "pass more text or calibration_fraction=0."
        )
    held = (features[fit:], None if queries is None else queries[fit:])
    features, queries = features[:fit], None if queries is None else queries[:fit]
    calibration = held if len(held[0]) else (features, queries)
    lm_target, knn_target = lm_target[:fit], knn_target[:fit]
    torch.manual_seed(seed)
    gate = RetrievalGate(0 if queries is None else queries.shape[-1], width)
    raw = torch.cat([features.float()] + ([] if queries is None else [queries.float()]), -1)
    gate.mean.copy_(raw.mean(0))
    gate.std.copy_(raw.std(0).clamp_min(1e-6))
    lm_target, knn_target = lm_target.float(), knn_target.float()
    optimizer = torch.optim.Adam(gate.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        optimizer.zero_grad()
        z = gate.logits(features, queries)
        mixed = torch.logaddexp(
            nn.functional.logsigmoid(z) + knn_target, nn.functional.logsigmoid(-z) + lm_target
        )
        loss = -mixed.mean()
        loss.backward()
        optimizer.step()
    gate.eval()
    with torch.no_grad():
        lam = torch.sigmoid(gate.logits(*calibration))
    gate.skip_below = float(torch.quantile(lam, skip_fraction)) if skip_fraction > 0 else 0.0
    gate.info = {
        "train_tokens": len(lm_target),
        "calibration_tokens": len(held[0]),
        "skip_fraction": skip_fraction,
        "train_nll": float(loss.detach()),
    }
    return gate


def train_gate(
    model: torch.nn.Module,
    tokenizer,
    data,
    datastore,
    *,
    k: int = 1024,
    temperature: float = 1.0,
    recompute_dists: bool = False,
    use_queries: bool = False,
    skip_fraction: float = 0.5,
    calibration_fraction: float = 0.2,
    width: int = 16,
    weight_decay: float = 1e-2,
    max_length: int = 1024,
    stride: int = 512,
    batch_size: int = 8,
    text_column: str = "text",
    max_tokens: int | None = None,
    save: bool = True,
    disable_progress: bool | None = None,
) -> RetrievalGate:
    """Run the model over held-out ``data``, search every token once, fit a gate (and save it with
    the store unless ``save=False``). ``k`` and ``temperature`` are those the kNN-LM will use;
    ``skip_fraction``, ``calibration_fraction``, ``width`` and ``weight_decay`` go to :func:`fit_gate`."""
    from ..lm.forward import iter_window_batches
    from ..lm.windows import sliding_windows
    from .evaluation import scored_tokens

    tokens = scored_tokens(model, tokenizer, data, datastore, text_column, max_tokens)
    k = datastore.clamp_k(k)
    feats, queries, lm_t, knn_t = [], [], [], []
    for batch in iter_window_batches(
        model,
        tokens,
        list(sliding_windows(len(tokens), max_length, stride)),
        batch_size=batch_size,
        hook_module=datastore.config.hook_module,
        with_log_probs=True,
        lm_features=lm_features,
        desc="gate data",
        disable_progress=disable_progress,
    ):
        found = datastore.search_entries(batch.hidden, k, recompute_dists)
        knn_t.append(found.target_log_probs(batch.targets.cpu(), temperature))
        feats.append(batch.lm_features.cpu())
        queries.append(batch.hidden.cpu())
        lm_t.append(batch.lm_log_probs.float().cpu())
    gate = fit_gate(
        torch.cat(feats),
        torch.cat(queries) if use_queries else None,
        torch.cat(lm_t),
        torch.cat(knn_t),
        skip_fraction=skip_fraction,
        calibration_fraction=calibration_fraction,
        width=width,
        weight_decay=weight_decay,
    )
    gate.info.update({"k": k, "temperature": temperature})
    if save:
        gate.save_to_datastore(datastore)
    return gate


# ----------------------------------------------------------------- use
def gated_neighbours(
    gate: RetrievalGate,
    datastore,
    queries: torch.Tensor,
    lm_log_probs: torch.Tensor,
    settings: KNNSettings,
    features: torch.Tensor | None = None,
) -> tuple[Neighbours, torch.Tensor]:
    """Neighbours of the rows the gate searches (the others have none) and lmbda_t of every row."""
    if features is None:
        features = lm_features(lm_log_probs)
    lam = gate.lmbda(features.cpu(), queries.cpu() if gate.hidden_size else None)
    rows = torch.nonzero(lam > 0).flatten()
    distances = torch.full((len(lam), settings.k), math.inf)
    ids = torch.full((len(lam), settings.k), -1, dtype=torch.long)
    if len(rows):
        d, i = datastore.search_ids(queries[rows], settings.k, settings.recompute_dists)
        distances[rows], ids[rows] = torch.from_numpy(d), torch.from_numpy(i)
    return Neighbours.from_ids(datastore, distances, ids), lam


class GateRetrieval:
    """A gate applied to the scored stream of :func:`~hf_knnlm.evaluate_perplexity`."""

    lm_features = staticmethod(lm_features)

    def __init__(self, gate: RetrievalGate, datastore, settings: KNNSettings):
        self.gate, self.datastore, self.settings = gate, datastore, settings
        self.steps = self.searches = 0

    def __call__(self, batch) -> tuple[Neighbours, torch.Tensor]:
        return self._step(batch.hidden, None, batch.lm_features)

    def _step(self, queries, lm_log_probs, features=None) -> tuple[Neighbours, torch.Tensor]:
        found, lam = gated_neighbours(
            self.gate, self.datastore, queries, lm_log_probs, self.settings, features
        )
        self.steps += len(lam)
        self.searches += int((lam > 0).sum())
        return found, lam

    def stats(self) -> dict[str, float | int]:
        saved = 1.0 - self.searches / self.steps if self.steps else 0.0
        return {"steps": self.steps, "searches": self.searches, "searches_saved": saved}


class GateSteps(GateRetrieval):
    """A gate during ``generate``: features from the step's LM log-probs."""

    def __call__(self, input_ids, queries: torch.Tensor, lm_log_probs: torch.Tensor):
        return self._step(queries, lm_log_probs)
