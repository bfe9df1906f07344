"""KNNProcessor: kNN-LM as a transformers ``LogitsProcessor`` for ``model.generate``."""

from __future__ import annotations

import math
import os
import threading

import torch
from transformers import LogitsProcessor

from ..datastore.datastore import Datastore
from ..datastore.neighbours import Neighbours
from ..lm.hooks import FFNInputCapture
from .gate import load_gate
from .mixture import mix
from .policies import (
    GateLike,
    GenerationHistory,
    RetrievalStats,
    SearchPolicy,
    Step,
    search_policy,
    split_gate,
)
from .settings import KNNSettings


def load_datastore(datastore: Datastore | str | os.PathLike, **kwargs) -> Datastore:
    return datastore if isinstance(datastore, Datastore) else Datastore.from_pretrained(datastore, **kwargs)


class KNNProcessor(LogitsProcessor):
    r"""
    [`LogitsProcessor`](https://huggingface.co/docs/transformers/main/en/internal/generation_utils#logitsprocessor)
    that turns a causal LM into a kNN-LM (Khandelwal et al., 2020) during generation: the next-token
    distribution becomes ``lmbda * p_kNN + (1 - lmbda) * p_LM``, where p_kNN is a softmax over the
    negative squared L2 distances (divided by ``temperature``) of the ``k`` nearest datastore keys to
    the current FFN input, summed per stored next token.

    The processor hooks ``model`` itself (the input of the last layer's FFN) and reads the vector of
    the last position of every sequence. The returned scores are log-probabilities (the incoming
    scores are normalised first, so logits and log-probs are both accepted); they are new tensors,
    the input is never modified.

    Supported decoding modes: greedy search, sampling (with any warpers) and beam search (with or
    without sampling), where every call scores the last position of the model's latest forward pass.
    Assisted decoding (``assistant_model``), prompt-lookup decoding (``prompt_lookup_num_tokens``)
    and contrastive search score several positions or candidates per forward pass; the processor
    detects this (a second call for one forward pass, or scores for other rows than that pass had)
    and raises a ValueError instead of mixing in the wrong neighbours.

    One processor may be used by several threads at once (each generating with the same model): the
    captured FFN input, and RetoMaton's pointer state, are kept per thread.

    Args:
        model (`PreTrainedModel`):
            The model that generates; it must be the model (or a fine-tune of it) that built the store.
        datastore (`Datastore`, `str` or `os.PathLike`):
            A datastore, or a local folder / Hub repo id to load one from.
        k, lmbda, temperature, recompute_dists, retomaton (*optional*):
            Override single fields of ``settings`` (see [`KNNSettings`][hf_knnlm.KNNSettings]: by default
            k=1024, lmbda=0.25, the store's calibrated temperature, approximate distances, no RetoMaton).
        hook_module (`str`, *optional*):
            The module to hook; defaults to the one recorded in the datastore.
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            The tokenizer that encodes the prompts; checked against the datastore's tokenizer
            fingerprint (a tokenizer with the same vocabulary size but other ids is refused).
        gate (`RetrievalGate`, `bool` or a path, *optional*):
            Adaptive retrieval: a gate (`True`: the one saved with the store) sets lmbda per step
            and skips the search where it predicts no gain.
        settings (`KNNSettings`, *optional*):
            All of the above at once; the processor keeps them, resolved for the store, as ``settings``.

    Examples:

    ```python
    >>> import tempfile
    >>> from transformers import LogitsProcessorList
    >>> from hf_knnlm.datastore.testing import tiny_datastore
    >>> from hf_knnlm import KNNProcessor
    >>> model, tokenizer, store = tiny_datastore(tempfile.mkdtemp())
    >>> inputs = tokenizer("The cat", return_tensors="pt")
    >>> knn = KNNProcessor(model, store, k=4, lmbda=1.0)  # lmbda=1: p_kNN alone
    >>> out = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id,
    ...                      logits_processor=LogitsProcessorList([knn]))
    >>> tokenizer.decode(out[0])  # the only continuations the store knows
    'The cat sat on the mat.'
    >>> knn.retrieval_stats.searches
    5
    ```
    """

    supports_continuous_batching = False  # reads the FFN input the model's own forward just captured

    def __init__(
        self,
        model: torch.nn.Module,
        datastore: Datastore | str | os.PathLike,
        k: int | None = None,
        lmbda: float | None = None,
        temperature: float | None = None,
        recompute_dists: bool | None = None,
        hook_module: str | None = None,
        tokenizer=None,
        retomaton: int | None = None,
        gate: GateLike = None,
        *,
        settings: KNNSettings | None = None,
    ) -> None:
        flag, gate = split_gate(gate)
        settings = KNNSettings.merge(
            settings,
            k=k,
            lmbda=lmbda,
            temperature=temperature,
            recompute_dists=recompute_dists,
            retomaton=retomaton,
            gate=flag,
        )
        self.datastore = load_datastore(datastore)
        self.datastore.check_compatible(model, tokenizer)
        self.settings = settings.resolve(self.datastore)
        # A gate is read (and a bad one refused) now, once, not at the first step of every thread.
        self._gate = (
            load_gate(gate if gate is not None else True, self.datastore) if self.settings.gate else None
        )
        self._capture = FFNInputCapture(model, hook_module or self.datastore.config.hook_module)
        self._local = threading.local()  # per thread: the last forward pass used, policy, history
        self._policies: list[SearchPolicy] = []
        self._lock = threading.Lock()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        queries = self._queries(scores.shape[0])
        lm_log_probs = torch.log_softmax(scores.float(), dim=-1)
        neighbours, lmbda = self.neighbours(input_ids, queries, lm_log_probs)
        mixed = mix(neighbours, lm_log_probs, self.settings, lmbda)
        # Tokens an earlier processor banned (-inf) stay banned whatever the neighbours say.
        return mixed.masked_fill(torch.isneginf(scores), -math.inf).to(scores.dtype)

    def _queries(self, rows: int) -> torch.Tensor:
        """The FFN input at the last position of this thread's latest forward pass, used once."""
        count = self._capture.forward_count
        if count == getattr(self._local, "count", 0):
            raise ValueError(
                "KNNProcessor was called without a new forward pass of its model in this thread (a "
                "second call for one pass, or a call for another model's scores): assisted and "
                "prompt-lookup decoding score several positions per pass and are not supported. Use "
                "greedy search, sampling or beam search (no assistant_model / prompt_lookup_num_tokens)."
            )
        self._local.count = count
        try:
            # At the prefill step the model saw the whole prompt; only the last position predicts.
            return self._capture.hidden_states(rows)[:, -1, :]
        except ValueError as err:
            raise ValueError(
                f"KNNProcessor got scores for {rows} rows, but {err} Decoding modes that score other "
                f"rows than the forward pass (contrastive search) are not supported; use greedy "
                f"search, sampling or beam search."
            ) from err

    def neighbours(
        self, input_ids: torch.LongTensor, queries: torch.Tensor, lm_log_probs: torch.Tensor
    ) -> tuple[Neighbours, torch.Tensor | None]:
        """This step's neighbours (searched, or followed by RetoMaton) and the gate's lmbda, if any."""
        policy = self._policy()
        step = Step(queries, lm_log_probs=lm_log_probs)
        if policy.follows_tokens:
            step.tokens, step.parents, fresh = self._local.history.step(input_ids)
            if fresh:
                policy.reset()
        return policy(step)

    def _policy(self) -> SearchPolicy:
        """This thread's search policy (RetoMaton keeps one generation's pointers: one per thread)."""
        policy = getattr(self._local, "policy", None)
        if policy is None:
            policy = self._local.policy = search_policy(self.datastore, self.settings, self._gate)
            self._local.history = GenerationHistory()
            with self._lock:
                self._policies.append(policy)
        return policy

    @property
    def retrieval_stats(self) -> RetrievalStats:
        """Steps answered and searches run so far, over every thread that used this processor."""
        with self._lock:
            return sum((p.stats for p in self._policies), RetrievalStats())

    def remove(self) -> None:
        """Detach the hook from the model (the processor cannot be used afterwards)."""
        self._capture.remove()

    def __del__(self) -> None:
        # The hook lives on the model and would keep the last FFN input alive after we are gone.
        capture = self.__dict__.get("_capture")
        if capture is not None:
            try:
                capture.remove()
            except Exception:  # noqa: BLE001 - at interpreter exit torch may already be half torn down
                pass

    def __enter__(self) -> KNNProcessor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
