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
import os
import threading
import weakref
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..datastore.extras import GATE_NAME, add_files
from ..datastore.neighbours import Neighbours
from ..utils.files import atomic_path
from .settings import KNNSettings

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

    [`train_gate`][hf_knnlm.train_gate] fits one on held-out text and saves it with the store;
    ``gate=True`` in [`KNNSettings`][hf_knnlm.KNNSettings] (or ``gate=`` a gate or its file) uses it.

    Examples:

    ```python
    >>> import torch
    >>> from hf_knnlm import RetrievalGate
    >>> _ = torch.manual_seed(0)
    >>> gate = RetrievalGate(hidden_size=0)  # LM features only (no query vector)
    >>> features = gate.lm_features(torch.log_softmax(torch.randn(4, 10), dim=-1))
    >>> features.shape  # entropy, top log-prob, top-1 minus top-2 log-prob
    torch.Size([4, 3])
    >>> lmbda = gate.lmbda(features)
    >>> bool(((lmbda > 0) & (lmbda < 1)).all())  # every token searched, each with its own lmbda
    True
    >>> gate.skip_below = 1.0
    >>> gate.lmbda(features)  # below skip_below: not searched, p_LM kept exactly
    tensor([0., 0., 0., 0.])
    >>> gate.save("gate.safetensors")
    >>> RetrievalGate.from_file("gate.safetensors").skip_below
    1.0
    ```
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

    def save_to_datastore(self, datastore, *, lock: bool = True) -> None:
        """Write ``gate.safetensors`` into the store's folder and record its sha256 in the config.

        Both are written beside the store and swapped in whole under its lock (``lock=False``: the
        caller holds it), so a failed write leaves the store with its old gate.
        """

        def write(folder: Path) -> list[str]:
            self.save(folder / GATE_NAME)
            return [GATE_NAME]

        add_files(datastore, write, lock=lock)

    @classmethod
    def from_datastore(cls, datastore) -> RetrievalGate:
        if GATE_NAME not in datastore.config.files:
            raise ValueError(
                f"{datastore.folder} has no retrieval gate; train one with `hf-knnlm train-gate` "
                f"(or hf_knnlm.knnlm.gate.train_gate) on held-out text."
            )
        return cls.from_file(datastore.folder / GATE_NAME)


# Each store's gate, read once (and again only when a new one is saved: its sha256 changes).
_STORE_GATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_STORE_GATES_LOCK = threading.Lock()


def store_gate(datastore) -> RetrievalGate:
    """The gate saved with ``datastore``, read from disk once per store and gate file."""
    sha = datastore.config.files.get(GATE_NAME)
    with _STORE_GATES_LOCK:
        cached = _STORE_GATES.get(datastore)
        if cached is None or cached[0] != sha:
            cached = _STORE_GATES[datastore] = (sha, RetrievalGate.from_datastore(datastore))
    return cached[1]


def load_gate(gate, datastore) -> RetrievalGate:
    """``True`` -> the store's gate; a path -> that file; a [`RetrievalGate`][hf_knnlm.RetrievalGate] ->
    itself."""
    if isinstance(gate, RetrievalGate):
        return gate
    if gate is True:
        return store_gate(datastore)
    if isinstance(gate, (str, os.PathLike)) and Path(gate).is_file():
        return RetrievalGate.from_file(gate)
    raise ValueError(f"gate={gate!r} is not a RetrievalGate, True (the store's gate) or a gate file.")


# ----------------------------------------------------------------- use
def gated_neighbours(
    gate: RetrievalGate,
    datastore,
    queries: torch.Tensor,
    features: torch.Tensor,
    settings: KNNSettings,
) -> tuple[Neighbours, torch.Tensor]:
    """Neighbours of the rows the gate searches (the others have none) and lmbda_t of every row."""
    lam = gate.lmbda(features.cpu(), queries.cpu() if gate.hidden_size else None)
    rows = torch.nonzero(lam > 0).flatten()
    if not len(rows) and getattr(datastore, "sharded", None) is None:  # a sharded search is collective
        return Neighbours.empty(len(lam), settings.k), lam
    found = datastore.search(queries[rows.to(queries.device)], settings.k, settings.recompute_dists)
    return found.scatter(rows, len(lam)), lam


__all__ = ["LM_FEATURES", "RetrievalGate", "gated_neighbours", "lm_features", "load_gate"]
