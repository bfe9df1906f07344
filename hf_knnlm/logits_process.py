"""KNNProcessor: kNN-LM as a transformers ``LogitsProcessor`` for ``model.generate``."""

from __future__ import annotations

import math
import os

import torch
from transformers import LogitsProcessor

from .datastore.datastore import Datastore
from .hooks import FFNInputCapture
from .knn import KNNSettings, interpolate
from .neighbours import Neighbours
from .skipping import search_skipper


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
    the last position of every sequence, so it works for greedy search, sampling and beam search.
    The returned scores are log-probabilities (the incoming scores are normalised first, so logits
    and log-probs are both accepted); they are new tensors, the input is never modified.

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
        retomaton: int | None = None,
        gate=None,
    ) -> None:
        self.settings = KNNSettings(
            k=k, lmbda=lmbda, temperature=temperature, recompute_dists=recompute_dists
        )
        self.datastore = load_datastore(datastore)
        self.datastore.check_compatible(model)
        self.settings.k = self.datastore.clamp_k(k)
        self.retrieval = search_skipper(self.datastore, self.settings, retomaton, gate, stream=False)
        self._capture = FFNInputCapture(model, hook_module or self.datastore.config.hook_module)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # At the prefill step the model saw the whole prompt; only the last position predicts.
        queries = self._capture.hidden_states(scores.shape[0])[:, -1, :]
        lm_log_probs = torch.log_softmax(scores.float(), dim=-1)
        neighbours, lmbda = self.neighbours(input_ids, queries, lm_log_probs)
        mixed = mix_neighbours(neighbours, lm_log_probs, self.settings, lmbda)
        # Tokens an earlier processor banned (-inf) stay banned whatever the neighbours say.
        return mixed.masked_fill(torch.isneginf(scores), -math.inf).to(scores.dtype)

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
