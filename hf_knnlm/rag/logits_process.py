"""In-Context RALM and REPLUG as transformers ``LogitsProcessor``\\ s for ``model.generate``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from transformers import LogitsProcessor

from ..retrieval.retriever import Retriever
from .prefix import (
    DocumentTokens,
    cache_kwargs,
    cache_of,
    document_log_weights,
    last_log_probs,
    left_pad,
    max_positions,
    pad_token_id,
)
from .settings import RetrievalSettings


class _DocumentEnsembleProcessor(LogitsProcessor):
    """``log sum_d w_d p_LM(y | d ⊕ x)`` for the next token, with a KV cache over the ``B x k``
    document-prefixed copies of the batch that is reused while the sequences only grow and the passages
    stay the same."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        retriever: Retriever,
        settings: RetrievalSettings,
        *,
        queries: Sequence[str] | None = None,
        max_input_length: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.retriever = retriever
        self.settings = settings
        self.queries = list(queries) if queries is not None else None
        self.max_input_length = max_input_length or max_positions(model)
        self.doc_tokens = DocumentTokens(tokenizer, retriever, settings.max_document_tokens)
        self.pad_id = pad_token_id(tokenizer)
        self.num_retrievals = 0
        self.retrieved: list[np.ndarray] = []  # doc ids of every retrieval, for inspection
        self._reset()

    def _reset(self) -> None:
        self._seen: torch.Tensor | None = None
        self._doc_ids: np.ndarray | None = None
        self._log_weights: torch.Tensor | None = None
        self._retrieved_at = 0
        self._cache = self._mask = self._next_position = None

    def _row_tokens(self, row: torch.Tensor) -> list[int]:
        """A sequence without its left padding (generate left-pads batched prompts)."""
        ids = row.tolist()
        start = 0
        while start < len(ids) - 1 and ids[start] == self.pad_id:
            start += 1
        return ids[start:]

    def _retrieve(self, input_ids: torch.Tensor, first: bool) -> tuple[np.ndarray, torch.Tensor]:
        if first and self.queries is not None:
            if len(self.queries) != input_ids.shape[0]:
                raise ValueError(
                    f"{len(self.queries)} queries for a batch of {input_ids.shape[0]} sequences; pass one "
                    "query per prompt (num_return_sequences and beams repeat prompts)."
                )
            queries = self.queries
        else:
            n = self.settings.query_length
            queries = [self.tokenizer.decode(self._row_tokens(row)[-n:]) for row in input_ids]
        scores, doc_ids = self.retriever.search(queries, self.settings.num_documents)
        log_weights = document_log_weights(scores, doc_ids, self.settings.document_temperature)
        # A row that found nothing reads no passage: one "empty passage" of weight 1 is the plain LM.
        empty = torch.isneginf(log_weights).all(dim=-1)
        log_weights[empty, 0] = 0.0
        self.num_retrievals += 1
        self.retrieved.append(doc_ids)
        return doc_ids, log_weights

    def _prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = []
        for b, row in enumerate(input_ids):
            tokens = self._row_tokens(row)
            for doc in self._doc_ids[b].tolist():
                rows.append((self.doc_tokens(doc) + tokens)[-self.max_input_length :])
        padded = left_pad(rows, self.pad_id, input_ids.device)
        log_probs, output = last_log_probs(self.model, padded, 1, use_cache=True)
        self._cache, self._mask = cache_of(output), padded.attention_mask
        self._next_position = padded.position_ids[:, -1:] + 1
        return log_probs[:, -1]

    def _extend(self, new_tokens: torch.Tensor) -> torch.Tensor:
        k, n = self.settings.num_documents, new_tokens.shape[1]
        ids = new_tokens.repeat_interleave(k, dim=0)
        self._mask = torch.cat([self._mask, self._mask.new_ones(ids.shape)], dim=1)
        positions = self._next_position + torch.arange(n, device=ids.device)
        output = self.model(
            input_ids=ids,
            attention_mask=self._mask,
            position_ids=positions,
            use_cache=True,
            **cache_kwargs(self.model, self._cache),
        )
        self._cache, self._next_position = cache_of(output), positions[:, -1:] + 1
        return torch.log_softmax(output.logits[:, -1].float(), dim=-1)

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        seen = self._seen
        continuing = (
            seen is not None
            and seen.shape[0] == input_ids.shape[0]
            and seen.shape[1] < input_ids.shape[1]
            and torch.equal(input_ids[:, : seen.shape[1]], seen)
        )
        stride = self.settings.retrieval_stride
        due = stride is not None and input_ids.shape[1] - self._retrieved_at >= stride
        rebuild = not continuing
        if not continuing or due:
            doc_ids, log_weights = self._retrieve(input_ids, first=not continuing)
            rebuild = rebuild or not np.array_equal(doc_ids, self._doc_ids)
            self._doc_ids, self._log_weights, self._retrieved_at = doc_ids, log_weights, input_ids.shape[1]
        new = input_ids.shape[1] - (seen.shape[1] if continuing else 0)
        if not rebuild and self._mask.shape[1] + new > self.max_input_length:
            rebuild = True  # the copies no longer fit: start again from the left-truncated rows
        log_probs = self._prefill(input_ids) if rebuild else self._extend(input_ids[:, -new:])
        self._seen = input_ids.clone()
        log_probs = log_probs.view(input_ids.shape[0], self.settings.num_documents, -1)
        weights = self._log_weights.to(log_probs.device)[:, :, None]
        mixed = torch.logsumexp(weights + log_probs, dim=1)
        # Tokens an earlier processor banned (-inf) stay banned.
        return mixed.masked_fill(torch.isneginf(scores), -math.inf).to(scores.dtype)


class InContextRALMProcessor(_DocumentEnsembleProcessor):
    r"""
    A transformers
    [`LogitsProcessor`](https://huggingface.co/docs/transformers/main/en/internal/generation_utils#logitsprocessor)
    for In-Context RALM (Ram et al., 2023): the next token is predicted from
    ``p_LM(y | d ⊕ x)``, where ``d`` is the top passage retrieved with the last ``query_length`` tokens of
    the sequence, retrieved again every ``retrieval_stride`` generated tokens.

    The processor runs ``model`` itself on the passage-prefixed sequences (with its own KV cache, rebuilt
    when the passage changes) and returns those log-probabilities in place of the incoming scores, so put it
    first in the list; tokens an earlier processor set to ``-inf`` stay banned. Left-padded batches work
    (padding is recognised as leading pad tokens). Beam search works but rebuilds the cache every step.
    A processor holds the state of one ``generate`` call: use one per call, not from several threads.

    Args:
        model (`PreTrainedModel`): the causal LM that generates.
        tokenizer: its tokenizer (decodes queries, encodes passages).
        retriever (`Retriever`): ``search(queries, k) -> (scores, doc_ids)``, e.g.
            [`BM25Retriever`][hf_knnlm.retrieval.BM25Retriever].
        retrieval_stride (`int` or `None`, defaults to 4): tokens between retrievals; `None`: once.
        query_length (`int`, defaults to 32): tokens of the sequence used as the query.
        max_document_tokens (`int`, defaults to 256): a passage is cut from the left to this many tokens.
        queries (`list[str]`, *optional*): the first query of each prompt (e.g. the bare question
            rather than the whole prompt); later retrievals use the sequence.
        max_input_length (`int`, *optional*): passage + sequence are cut from the left to this many
            tokens (default: the model's maximum positions).

    Examples:

    ```python
    >>> from transformers import LogitsProcessorList
    >>> from hf_knnlm.lm.testing import tiny_causal_lm
    >>> from hf_knnlm.rag import BM25Retriever, InContextRALMProcessor
    >>> model, tokenizer = tiny_causal_lm()  # a random 2-layer GPT-2, GPT-2's tokenizer
    >>> bm25 = BM25Retriever.build([{"text": "The cat sat on the mat."}, {"text": "Dogs bark."}])
    >>> ralm = InContextRALMProcessor(model, tokenizer, bm25)
    >>> inputs = tokenizer("Where did the cat sit?", return_tensors="pt")
    >>> out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id,
    ...                      logits_processor=LogitsProcessorList([ralm]))
    >>> ralm.num_retrievals  # at the prompt, then after 4 generated tokens
    2
    ```
    """

    def __init__(
        self, model: torch.nn.Module, tokenizer, retriever: Retriever, *, retrieval_stride: int | None = 4,
        query_length: int = 32, max_document_tokens: int = 256, **options,
    ) -> None:  # fmt: skip
        settings = RetrievalSettings(1, retrieval_stride, query_length, 1.0, max_document_tokens)
        super().__init__(model, tokenizer, retriever, settings, **options)


class REPLUGProcessor(_DocumentEnsembleProcessor):
    r"""
    A transformers
    [`LogitsProcessor`](https://huggingface.co/docs/transformers/main/en/internal/generation_utils#logitsprocessor)
    for REPLUG inference (Shi et al., 2023): the top-``k`` passages for the prompt are
    each prepended to it and the next-token distributions are ensembled,
    ``p(y | x) = sum_d softmax(score(d) / temperature) · p_LM(y | d ⊕ x)``, computed as one batched forward
    pass over the ``k`` copies of every sequence (with a KV cache, so each step costs ``k`` one-token passes).

    Same mechanics and caveats as [`InContextRALMProcessor`][hf_knnlm.rag.InContextRALMProcessor] (put it
    first; one processor per ``generate`` call). With ``k=1`` it is exactly the LM reading the top passage.

    Args:
        model (`PreTrainedModel`): the causal LM that generates.
        tokenizer: its tokenizer.
        retriever (`Retriever`): ``search(queries, k) -> (scores, doc_ids)``.
        k (`int`, defaults to 4): passages in the ensemble.
        temperature (`float`, defaults to 1.0): divides the retrieval scores before the softmax.
        retrieval_stride (`int` or `None`, defaults to `None`): retrieve once from the prompt, or every
            this many tokens.
        query_length, max_document_tokens, queries, max_input_length: as for
            [`InContextRALMProcessor`][hf_knnlm.rag.InContextRALMProcessor].

    Examples:

    ```python
    >>> import torch
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config
    >>> from hf_knnlm.rag import BM25Retriever, REPLUGProcessor
    >>> passages = [{"title": "Mats", "text": "The cat sat on the mat."}, {"text": "The cat purrs."}]
    >>> replug = REPLUGProcessor(AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2)),
    ...                          AutoTokenizer.from_pretrained("gpt2"), BM25Retriever.build(passages), k=2)
    >>> prompt = replug.tokenizer("What does the cat do?", return_tensors="pt").input_ids
    >>> log_probs = replug(prompt, torch.zeros(1, replug.model.config.vocab_size))  # the next-token mixture
    >>> replug.retrieved[0].tolist()  # both passages, best first
    [[1, 0]]
    ```
    """

    def __init__(
        self, model: torch.nn.Module, tokenizer, retriever: Retriever, *, k: int = 4,
        temperature: float = 1.0, retrieval_stride: int | None = None, query_length: int = 32,
        max_document_tokens: int = 256, **options,
    ) -> None:  # fmt: skip
        settings = RetrievalSettings(k, retrieval_stride, query_length, temperature, max_document_tokens)
        super().__init__(model, tokenizer, retriever, settings, **options)


__all__ = ["InContextRALMProcessor", "REPLUGProcessor"]
