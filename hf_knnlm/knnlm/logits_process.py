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
from .mixture import KNNSettings, interpolate
from .policies import search_skipper


def load_datastore(datastore: Datastore | str | os.PathLike, **kwargs) -> Datastore:
    return datastore if isinstance(datastore, Datastore) else Datastore.from_pretrained(datastore, **kwargs)


def mix_with_datastore(
    datastore: Datastore, queries: torch.Tensor, lm_log_probs: torch.Tensor, settings: KNNSettings
) -> torch.Tensor:
    """log(lmbda * p_kNN + (1 - lmbda) * p_LM) for ``[Q, d]`` queries and ``[Q, V]`` LM log-probs.

    One faiss search covers every query.
    """
    found = datastore.search_entries(queries, settings.k, settings.recompute_dists)
    return mix_neighbours(found, lm_log_probs, settings)


def mix_neighbours(
    neighbours: Neighbours,
    lm_log_probs: torch.Tensor,
    settings: KNNSettings,
    lmbda: torch.Tensor | None = None,
) -> torch.Tensor:
    """The mixture from given neighbours; ``lmbda`` (``[Q]``, a gate's) overrides ``settings.lmbda``."""
    knn = neighbours.log_probs(lm_log_probs.shape[-1], settings.temperature)
    return interpolate(lm_log_probs, knn.to(lm_log_probs.device), settings.lmbda if lmbda is None else lmbda)


class KNNProcessor(LogitsProcessor):
    r"""
    [`LogitsProcessor`] that turns a causal LM into a kNN-LM (Khandelwal et al., 2020) during
    generation: the next-token distribution becomes ``lmbda * p_kNN + (1 - lmbda) * p_LM``, where
    p_kNN is a softmax over the negative squared L2 distances (divided by ``temperature``) of the
    ``k`` nearest datastore keys to the current FFN input, summed per stored next token.

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
    captured FFN input is kept per thread. With ``retomaton`` it holds per-generation state and
    serves one generation at a time.

    Args:
        model (`PreTrainedModel`):
            The model that generates; it must be the model (or a fine-tune of it) that built the store.
        datastore (`Datastore`, `str` or `os.PathLike`):
            A datastore, or a local folder / Hub repo id to load one from.
        k (`int`, *optional*, defaults to 1024):
            Number of neighbours retrieved per step (clamped to the store size with a warning).
        lmbda (`float`, *optional*, defaults to 0.25):
            Weight of p_kNN in the mixture, in [0, 1]; 0 gives the base model exactly.
        temperature (`float`, *optional*, defaults to 1.0):
            Divides the distances before the softmax over neighbours.
        recompute_dists (`bool`, *optional*, defaults to `False`):
            Use exact distances from the stored keys (useful with PQ-compressed indexes).
        hook_module (`str`, *optional*):
            The module to hook; defaults to the one recorded in the datastore.
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            The tokenizer that encodes the prompts; checked against the datastore's tokenizer
            fingerprint (a tokenizer with the same vocabulary size but other ids is refused).
        retomaton (`int`, *optional*):
            RetoMaton: follow the corpus pointers of the previous step's neighbours that predicted
            the chosen token, and search only when fewer than this many survive. The processor then
            holds per-generation state: use one per generation at a time.
        gate (`RetrievalGate`, `True` or a path, *optional*):
            Adaptive retrieval: a gate (`True`: the one saved with the store) sets lmbda per step
            and skips the search where it predicts no gain.

    Examples:

    ```python
    >>> import tempfile
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LogitsProcessorList
    >>> from hf_knnlm import Datastore, KNNProcessor
    >>> tokenizer = AutoTokenizer.from_pretrained("gpt2")
    >>> model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2))
    >>> store = Datastore.build(model, tokenizer, ["The cat sat on the mat."], tempfile.mkdtemp(),
    ...                         max_length=16, stride=8)
    >>> inputs = tokenizer("The cat", return_tensors="pt")
    >>> out = model.generate(**inputs, max_new_tokens=5, do_sample=False,
    ...                      logits_processor=LogitsProcessorList([KNNProcessor(model, store, k=4)]))
    ```
    """

    def __init__(
        self,
        model: torch.nn.Module,
        datastore: Datastore | str | os.PathLike,
        k: int = 1024,
        lmbda: float = 0.25,
        temperature: float = 1.0,
        recompute_dists: bool = False,
        hook_module: str | None = None,
        tokenizer=None,
        retomaton: int | None = None,
        gate=None,
    ) -> None:
        self.settings = KNNSettings(
            k=k, lmbda=lmbda, temperature=temperature, recompute_dists=recompute_dists
        )
        self.datastore = load_datastore(datastore)
        self.datastore.check_compatible(model, tokenizer)
        self.settings.k = self.datastore.clamp_k(k)
        self.retrieval = search_skipper(self.datastore, self.settings, retomaton, gate, stream=False)
        self._capture = FFNInputCapture(model, hook_module or self.datastore.config.hook_module)
        self._used = threading.local()  # per thread: the forward pass whose query was last used

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        queries = self._queries(scores.shape[0])
        lm_log_probs = torch.log_softmax(scores.float(), dim=-1)
        neighbours, lmbda = self.neighbours(input_ids, queries, lm_log_probs)
        mixed = mix_neighbours(neighbours, lm_log_probs, self.settings, lmbda)
        # Tokens an earlier processor banned (-inf) stay banned whatever the neighbours say.
        return mixed.masked_fill(torch.isneginf(scores), -math.inf).to(scores.dtype)

    def _queries(self, rows: int) -> torch.Tensor:
        """The FFN input at the last position of this thread's latest forward pass, used once."""
        count = self._capture.forward_count
        if count == getattr(self._used, "count", 0):
            raise ValueError(
                "KNNProcessor was called without a new forward pass of its model in this thread (a "
                "second call for one pass, or a call for another model's scores): assisted and "
                "prompt-lookup decoding score several positions per pass and are not supported. Use "
                "greedy search, sampling or beam search (no assistant_model / prompt_lookup_num_tokens)."
            )
        self._used.count = count
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
        if self.retrieval is not None:
            return self.retrieval(input_ids, queries, lm_log_probs)
        return self.datastore.search_entries(queries, self.settings.k, self.settings.recompute_dists), None

    def remove(self) -> None:
        """Detach the hook from the model (the processor cannot be used afterwards)."""
        self._capture.remove()

    def __del__(self) -> None:
        # The hook lives on the model and would keep the last FFN input alive after we are gone.
        capture = self.__dict__.get("_capture")
        if capture is not None:
            capture.remove()

    def __enter__(self) -> KNNProcessor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
