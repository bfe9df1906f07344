"""Where a step's neighbours come from: a plain search, RetoMaton's pointers or the adaptive-retrieval gate.

One protocol ([`SearchPolicy`][hf_knnlm.knnlm.SearchPolicy]) and one resolver
([`search_policy`][hf_knnlm.knnlm.search_policy]) serve generation ([`KNNProcessor`][hf_knnlm.KNNProcessor]),
the wrapper's forward ([`KNNLMForCausalLM`][hf_knnlm.KNNLMForCausalLM]) and teacher-forced evaluation
([`evaluate_perplexity`][hf_knnlm.evaluate_perplexity]) alike. A policy maps a [`Step`][hf_knnlm.knnlm.Step]
(the queries of a batch and what it needs to know about them) to the step's
[`Neighbours`][hf_knnlm.Neighbours] and, for the gate, a per-row lmbda; every policy counts its steps and
searches ([`RetrievalStats`][hf_knnlm.knnlm.RetrievalStats]).

Policies with state (RetoMaton's pointer sets) serve one sequence stream at a time: their users
keep one per thread.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from ..datastore.neighbours import Neighbours
from .gate import RetrievalGate, gated_neighbours, lm_features, load_gate
from .retomaton import RetoMaton
from .settings import KNNSettings

if TYPE_CHECKING:
    from ..datastore import Datastore

GateLike = RetrievalGate | str | os.PathLike | bool | None


@dataclass
class Step:
    """The queries of one batch and what a policy may need about them.

    Args:
        queries: ``[Q, d]`` FFN inputs.
        lm_log_probs: ``[Q, V]`` LM log-probs (generation and the wrapper), or None.
        lm_features: ``[Q, F]`` features of those log-probs computed upstream (evaluation), or None.
        tokens: the token at each row's own position (what the previous step produced or observed),
            None for a row that starts a sequence; read by policies that follow the corpus.
        parents: for rows that are parallel sequences (generation), the row of the previous call each
            row continues (-1: a new sequence); None means the rows are consecutive positions of one
            stream (teacher forcing), row 0 continuing the last row of the previous call.

    Examples:

    ```python
    >>> import torch
    >>> from hf_knnlm.datastore.testing import tiny_datastore
    >>> from hf_knnlm import KNNSettings
    >>> from hf_knnlm.knnlm import Step, search_policy
    >>> model, tokenizer, store = tiny_datastore("step-store")
    >>> policy = search_policy(store, KNNSettings(k=4).resolve(store))
    >>> queries = torch.from_numpy(store.keys.take([0, 1, 2]).astype("float32"))
    >>> found, lmbda = policy(Step(queries))  # three queries of one batch
    >>> found.ids[:, 0].tolist(), lmbda  # each stored key is its own nearest; no per-row lmbda
    ([0, 1, 2], None)
    ```
    """

    queries: torch.Tensor
    lm_log_probs: torch.Tensor | None = None
    lm_features: torch.Tensor | None = None
    tokens: Sequence[int | None] | None = None
    parents: Sequence[int] | None = None


@dataclass
class RetrievalStats:
    """Steps (queries) answered and faiss searches run (one per searched query).

    Every policy counts its own; [`KNNProcessor`][hf_knnlm.KNNProcessor] adds those of its threads up
    as ``retrieval_stats``, and [`evaluate_perplexity`][hf_knnlm.evaluate_perplexity] reports them.

    Args:
        steps (`int`, defaults to 0): queries answered.
        searches (`int`, defaults to 0): queries answered by a faiss search (the others by RetoMaton's
            pointers, or skipped by the gate).

    Examples:

    ```python
    >>> from transformers import LogitsProcessorList
    >>> from hf_knnlm.datastore.testing import tiny_datastore
    >>> from hf_knnlm import KNNProcessor
    >>> from hf_knnlm.knnlm import RetrievalStats
    >>> text = ["The cat sat on the mat. The dog sat on the log."]
    >>> model, tokenizer, store = tiny_datastore("stats-store", text)
    >>> inputs = tokenizer("The cat", return_tensors="pt")
    >>> knn = KNNProcessor(model, store, k=4, lmbda=1.0, retomaton=1)  # RetoMaton: follow the corpus
    >>> out = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id,
    ...                      logits_processor=LogitsProcessorList([knn]))
    >>> tokenizer.decode(out[0])
    'The cat sat on the mat. The'
    >>> knn.retrieval_stats  # one search, then the stored continuation's pointers
    RetrievalStats(steps=6, searches=1)
    >>> (RetrievalStats(10, 4) + RetrievalStats(6, 6)).to_dict()
    {'steps': 16, 'searches': 10, 'searches_saved': 0.375}
    ```
    """

    steps: int = 0
    searches: int = 0

    @property
    def searches_saved(self) -> float:
        """Fraction of steps answered without a search."""
        return 1.0 - self.searches / self.steps if self.steps else 0.0

    def __add__(self, other: RetrievalStats) -> RetrievalStats:
        return RetrievalStats(self.steps + other.steps, self.searches + other.searches)

    def to_dict(self) -> dict[str, float | int]:
        return {"steps": self.steps, "searches": self.searches, "searches_saved": self.searches_saved}


class SearchPolicy(Protocol):
    """What the kNN-LM entry points call for the neighbours of a step.

    A policy is called with a [`Step`][hf_knnlm.knnlm.Step] and returns the step's
    [`Neighbours`][hf_knnlm.Neighbours] and, for the gate, a ``[Q]`` lmbda per row (else None); rows
    without a search have no neighbour (id -1, distance ``inf``) and so no kNN mass. ``stats`` counts
    steps and searches; ``reset`` forgets the state of a sequence stream (RetoMaton's pointers).
    [`search_policy`][hf_knnlm.knnlm.search_policy] makes the one that settings ask for.

    Examples:

    ```python
    >>> import torch
    >>> from hf_knnlm.datastore.testing import tiny_datastore
    >>> from hf_knnlm import KNNSettings, RetrievalGate
    >>> from hf_knnlm.knnlm import Step, search_policy
    >>> model, tokenizer, store = tiny_datastore("policy-store")
    >>> gate = RetrievalGate(hidden_size=0, skip_below=1.0)  # a gate that skips every search
    >>> policy = search_policy(store, KNNSettings(k=4, gate=True).resolve(store), gate)
    >>> queries = torch.from_numpy(store.keys.take([0, 1, 2]).astype("float32"))
    >>> lm_log_probs = torch.log_softmax(torch.zeros(3, model.config.vocab_size), dim=-1)
    >>> found, lmbda = policy(Step(queries, lm_log_probs=lm_log_probs))
    >>> lmbda, found.ids[:, 0].tolist()  # lmbda 0 and no neighbour: these steps keep p_LM exactly
    (tensor([0., 0., 0.]), [-1, -1, -1])
    >>> policy.stats
    RetrievalStats(steps=3, searches=0)
    ```
    """

    lm_features: Callable[[torch.Tensor], torch.Tensor] | None  # what it needs from the LM, if anything
    follows_tokens: bool  # whether Step.tokens / Step.parents matter

    def __call__(self, step: Step) -> tuple[Neighbours, torch.Tensor | None]: ...

    def reset(self) -> None: ...

    @property
    def stats(self) -> RetrievalStats: ...


class PlainSearch:
    """One faiss search for every query (the kNN-LM of the paper)."""

    lm_features = None
    follows_tokens = False

    def __init__(self, datastore: Datastore, settings: KNNSettings):
        self.datastore, self.settings = datastore, settings
        self.stats = RetrievalStats()

    def __call__(self, step: Step) -> tuple[Neighbours, None]:
        found = self.datastore.search(step.queries, self.settings.k, self.settings.recompute_dists)
        self.stats += RetrievalStats(len(found), len(found))
        return found, None

    def reset(self) -> None:
        pass


class GatedSearch:
    """Adaptive retrieval: the gate sets lmbda per query and skips the search where it predicts no gain."""

    lm_features = staticmethod(lm_features)
    follows_tokens = False

    def __init__(self, gate: RetrievalGate, datastore: Datastore, settings: KNNSettings):
        self.gate, self.datastore, self.settings = gate, datastore, settings
        self.stats = RetrievalStats()

    def __call__(self, step: Step) -> tuple[Neighbours, torch.Tensor]:
        features = step.lm_features if step.lm_features is not None else lm_features(step.lm_log_probs)
        found, lam = gated_neighbours(self.gate, self.datastore, step.queries, features, self.settings)
        self.stats += RetrievalStats(len(lam), int((lam > 0).sum()))
        return found, lam

    def reset(self) -> None:
        pass


class RetoMatonSearch:
    """RetoMaton: follow the previous step's corpus pointers; search when too few of them survive."""

    lm_features = None
    follows_tokens = True

    def __init__(self, automaton: RetoMaton):
        self.automaton = automaton

    def __call__(self, step: Step) -> tuple[Neighbours, None]:
        tokens = step.tokens if step.tokens is not None else [None] * len(step.queries)
        if step.parents is None:
            return self.automaton.stream(step.queries, tokens), None
        known = None if step.tokens is None else list(tokens)
        return self.automaton.neighbours(step.queries, known, step.parents), None

    def reset(self) -> None:
        self.automaton.reset()

    @property
    def stats(self) -> RetrievalStats:
        return RetrievalStats(self.automaton.steps, self.automaton.searches)


class GenerationHistory:
    """During ``generate``: which row of the previous step each row continues, and the token it added.

    A call whose ``input_ids`` are one token longer than the last call's continues it (beam search
    reorders rows: each row's parent is the previous row it extends); anything else starts afresh.
    """

    def __init__(self) -> None:
        self._last: torch.Tensor | None = None

    def step(self, input_ids: torch.Tensor) -> tuple[list[int] | None, list[int], bool]:
        """``(tokens, parents, fresh)`` for this step's rows; ``fresh`` when a new generation starts."""
        ids = input_ids.detach().cpu()
        last, self._last = self._last, ids
        if last is not None and ids.shape[1] == last.shape[1] + 1:
            match = (ids[:, None, :-1] == last[None]).all(-1)  # [rows, previous rows]
            parents = torch.where(match.any(1), match.float().argmax(1), -1).tolist()
            return ids[:, -1].tolist(), parents, False
        return None, [-1] * len(ids), True


def split_gate(gate: GateLike) -> tuple[bool | None, RetrievalGate | str | os.PathLike | None]:
    """A ``gate=`` argument as (the ``KNNSettings.gate`` override, a gate object or file to use)."""
    if gate is None or isinstance(gate, bool):
        return gate, None
    return True, gate


def _plain(datastore: Datastore, settings: KNNSettings, gate) -> PlainSearch:
    return PlainSearch(datastore, settings)


def _gated(datastore: Datastore, settings: KNNSettings, gate) -> GatedSearch:
    return GatedSearch(load_gate(gate if gate is not None else True, datastore), datastore, settings)


def _retomaton(datastore: Datastore, settings: KNNSettings, gate) -> RetoMatonSearch:
    return RetoMatonSearch(RetoMaton(datastore, settings.retomaton, settings.k, settings.recompute_dists))


_POLICIES = {"plain": _plain, "gate": _gated, "retomaton": _retomaton}


def policy_name(settings: KNNSettings) -> str:
    """Which policy ``settings`` ask for: ``"retomaton"``, ``"gate"`` or ``"plain"``."""
    return "retomaton" if settings.retomaton is not None else "gate" if settings.gate else "plain"


def search_policy(
    datastore: Datastore, settings: KNNSettings, gate: RetrievalGate | str | os.PathLike | None = None
) -> SearchPolicy:
    """The policy ``settings`` ask for: RetoMaton (``settings.retomaton``), the adaptive-retrieval gate
    (``settings.gate``) or one plain faiss search per query.

    Args:
        datastore (`Datastore`): the store searched.
        settings (`KNNSettings`): already resolved for ``datastore``
            (``settings.resolve(datastore)``).
        gate (`RetrievalGate`, `str` or `os.PathLike`, *optional*): a gate, or
            a gate file, to use instead of the one saved with the store.

    Returns:
        [`SearchPolicy`][hf_knnlm.knnlm.SearchPolicy]: a new policy (with its own counts and state).

    Examples:

    ```python
    >>> from hf_knnlm.datastore.testing import tiny_datastore
    >>> from hf_knnlm import KNNSettings, RetrievalGate
    >>> from hf_knnlm.knnlm import search_policy
    >>> model, tokenizer, store = tiny_datastore("resolve-store")
    >>> for settings in (KNNSettings(k=4), KNNSettings(k=4, retomaton=8), KNNSettings(k=4, gate=True)):
    ...     policy = search_policy(store, settings.resolve(store), gate=RetrievalGate(hidden_size=0))
    ...     print(type(policy).__name__, policy.follows_tokens)
    PlainSearch False
    RetoMatonSearch True
    GatedSearch False
    ```
    """
    return _POLICIES[policy_name(settings)](datastore, settings, gate)


__all__ = [
    "GatedSearch",
    "GenerationHistory",
    "PlainSearch",
    "RetoMatonSearch",
    "RetrievalStats",
    "SearchPolicy",
    "Step",
    "policy_name",
    "search_policy",
    "split_gate",
]
