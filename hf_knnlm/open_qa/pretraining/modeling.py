"""REALM pre-training: a retrieval-augmented masked LM trained on the marginal likelihood.

Guu et al. (2020), section 2-3: the masked text x is embedded by the query encoder, the top-k documents z
are found by maximum inner product search in a [`DocumentIndex`][hf_knnlm.retrieval.DocumentIndex], and a
knowledge-augmented encoder reads ``[CLS] x [SEP] title [SEP] text [SEP]`` for each z and predicts the masked
tokens y. Training maximises

    log p(y|x) = log sum_z p(y|z, x) p(z|x),   p(y|z, x) = prod_j p(y_j|z, x),

with p(z|x) a softmax of f(x, z) = Embed_input(x) . Embed_doc(z) over the retrieved candidates. The search
runs outside the model (with the index's possibly stale vectors, see
[`RealmPretrainingCollator`][hf_knnlm.open_qa.pretraining.RealmPretrainingCollator]); here the query *and*
the retrieved documents are embedded again with the current weights, so the gradient of the loss reaches
both encoders. The null document (``RealmMaskedLMConfig.null_document``) is the last candidate: it has the
fixed score f(x, null) = 0 and the encoder reads ``[CLS] x [SEP]`` alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModel, AutoModelForMaskedLM, PreTrainedModel
from transformers.utils import ModelOutput

from ...retrieval.embedder import RetrieverEmbedder
from ..heads import SPAN_MASK_VALUE
from ..modeling import _embedder
from .configuration import RealmMaskedLMConfig

IGNORE_INDEX = -100


@dataclass
class RealmMaskedLMOutput(ModelOutput):
    """Output of [`RealmForMaskedLM.forward`][hf_knnlm.open_qa.pretraining.RealmForMaskedLM.forward].

    Args:
        loss: -log p(y|x), averaged over the batch.
        retriever_logits: ``[batch, candidates]`` scaled f(x, z) (the null document last, 0; padding
            documents a large negative value).
        mlm_log_likelihood: ``[batch, candidates]`` log p(y|z, x), the summed log-probabilities of the masked
            tokens given each candidate.
        log_marginal: ``[batch]`` log p(y|x).

    Examples:

    ```python
    >>> import torch
    >>> from hf_knnlm.open_qa.pretraining import RealmMaskedLMOutput
    >>> out = RealmMaskedLMOutput(loss=torch.tensor(1.5), log_marginal=torch.tensor([-1.5]))
    >>> float(out.loss), out["log_marginal"].tolist()
    (1.5, [-1.5])
    ```
    """

    loss: torch.FloatTensor | None = None
    retriever_logits: torch.FloatTensor | None = None
    mlm_log_likelihood: torch.FloatTensor | None = None
    log_marginal: torch.FloatTensor | None = None


def marginal_log_likelihood(retriever_logits: torch.Tensor, mlm_log_likelihood: torch.Tensor) -> torch.Tensor:
    """log sum_z softmax(retriever_logits)_z exp(mlm_log_likelihood_z) over the last axis.

    Examples:

    ```python
    >>> import math, torch
    >>> from hf_knnlm.open_qa.pretraining.modeling import marginal_log_likelihood
    >>> value = marginal_log_likelihood(torch.tensor([[0.0, 0.0]]), torch.tensor([[-1.0, -3.0]]))
    >>> round(float(value), 6) == round(math.log(0.5 * math.exp(-1) + 0.5 * math.exp(-3)), 6)
    True
    ```
    """
    log_p_doc = torch.log_softmax(retriever_logits.float(), dim=-1)
    return torch.logsumexp(log_p_doc + mlm_log_likelihood.float(), dim=-1)


def _marginal_argmax(
    log_probs: torch.Tensor, selected: torch.Tensor, log_p_doc: torch.Tensor, shape: torch.Size, width: int
) -> torch.Tensor:
    """``[b, width]`` argmax over the vocabulary of sum_z p(z|x) p(y_j|z, x) at every masked position j
    (-100 elsewhere): ``log_probs`` ``[n, vocab]`` at the ``selected`` ``[b * c, seq]`` positions of
    joined inputs of ``shape`` ``[b, c, seq]``, ``log_p_doc`` ``[b, c]``."""
    batch, candidates, seq = shape
    rows, positions = selected.nonzero(as_tuple=True)
    weighted = (log_probs + log_p_doc.reshape(-1)[rows, None]).exp()
    example = rows // candidates  # x leads every joined input, so a position means the same token in all
    keys, inverse = torch.unique(example * seq + positions, return_inverse=True)
    marginal = weighted.new_zeros(len(keys), weighted.shape[1]).index_add_(0, inverse, weighted)
    out = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long, device=log_probs.device)
    out[keys // seq, keys % seq] = marginal.argmax(dim=-1)
    return out


class RealmForMaskedLM(PreTrainedModel):
    """REALM's pre-training model: query and document embedders plus a knowledge-augmented masked-LM encoder.

    Start one from checkpoints with
    [`from_encoders`][hf_knnlm.open_qa.pretraining.RealmForMaskedLM.from_encoders], train it with
    [`pretrain_realm`][hf_knnlm.open_qa.pretraining.pretrain_realm] (or ``Trainer`` and
    [`RealmPretrainingCollator`][hf_knnlm.open_qa.pretraining.RealmPretrainingCollator]) and hand it to
    open-QA fine-tuning with
    [`save_for_open_qa`][hf_knnlm.open_qa.pretraining.save_for_open_qa].

    Examples:

    ```python
    >>> from hf_knnlm.open_qa.pretraining.testing import tiny_realm_mlm
    >>> model, tokenizer, index = tiny_realm_mlm(top_k=1)  # a random 1-layer RealmForMaskedLM, 2 documents
    >>> from hf_knnlm.open_qa.pretraining import RealmPretrainingCollator
    >>> x = tokenizer("[MASK] is the capital of france")["input_ids"]  # "paris" masked
    >>> labels = [-100, tokenizer.convert_tokens_to_ids("paris")] + [-100] * (len(x) - 2)
    >>> batch = RealmPretrainingCollator(model, tokenizer, index)([{"input_ids": x, "labels": labels}])
    >>> out = model(**batch)  # 1 retrieved document + the null document
    >>> tuple(out.retriever_logits.shape), out.loss.requires_grad
    ((1, 2), True)
    ```
    """

    config_class = RealmMaskedLMConfig
    base_model_prefix = "realm"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, config: RealmMaskedLMConfig):
        super().__init__(config)
        self.query_embedder = _embedder(config)
        self.doc_embedder = None if config.share_retriever_encoders else _embedder(config)
        self.encoder = AutoModelForMaskedLM.from_config(config.reader_encoder_config)
        self.post_init()

    @classmethod
    def from_encoders(
        cls, retriever_name_or_path: Any, encoder_name_or_path: Any = None, **config_kwargs: Any
    ) -> RealmForMaskedLM:
        """Query and document embedders from one ``AutoModel`` checkpoint (e.g. all-MiniLM-L6-v2), the
        knowledge-augmented encoder from another (default: the same), with its masked-LM head when the
        checkpoint has one and a fresh head otherwise. ``config_kwargs`` are
        [`RealmMaskedLMConfig`][hf_knnlm.open_qa.pretraining.RealmMaskedLMConfig] fields.

        Examples:

        ```python
        >>> from transformers import BertConfig, BertModel
        >>> from hf_knnlm.open_qa.pretraining import RealmForMaskedLM
        >>> tiny = BertConfig(vocab_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                   intermediate_size=64)
        >>> BertModel(tiny).save_pretrained("encoder")  # e.g. sentence-transformers/all-MiniLM-L6-v2
        >>> model = RealmForMaskedLM.from_encoders("encoder", retriever_pooling="mean",
        ...                                        retriever_proj_size=None, retriever_normalize=True)
        >>> type(model.encoder).__name__, model.config.null_document
        ('BertForMaskedLM', True)
        ```
        """
        from transformers import AutoConfig

        encoder_name_or_path = encoder_name_or_path or retriever_name_or_path
        shared = str(encoder_name_or_path) == str(retriever_name_or_path)
        config = cls.config_class(
            encoder_config=AutoConfig.from_pretrained(retriever_name_or_path),
            reader_config=None if shared else AutoConfig.from_pretrained(encoder_name_or_path),
            **config_kwargs,
        )
        model = cls(config)
        state = AutoModel.from_pretrained(retriever_name_or_path).state_dict()
        for embedder in (model.query_embedder, model.doc_embedder):
            if embedder is not None:
                embedder.encoder.load_state_dict(state)
        model.encoder = AutoModelForMaskedLM.from_pretrained(encoder_name_or_path)
        model.config.name_or_path = str(retriever_name_or_path)
        return model

    @property
    def document_embedder(self) -> RetrieverEmbedder:
        """The module that embeds documents (the query embedder when they are shared)."""
        return self.doc_embedder if self.doc_embedder is not None else self.query_embedder

    def retriever_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        doc_input_ids: torch.Tensor | None,
        doc_attention_mask: torch.Tensor | None = None,
        doc_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scaled f(x, z) ``[b, candidates]`` with the current weights: ``doc_input_ids`` ``[b, k, l]`` are
        the retrieved documents' ``title [SEP] text``; the null document's 0 is appended when configured."""
        query = self.query_embedder(input_ids, attention_mask)
        batch = input_ids.shape[0]
        logits = query.new_zeros(batch, 0)
        if doc_input_ids is not None and doc_input_ids.shape[1] > 0:
            k, length = doc_input_ids.shape[1:]
            mask = None if doc_attention_mask is None else doc_attention_mask.reshape(batch * k, length)
            docs = self.document_embedder(doc_input_ids.reshape(batch * k, length), mask)
            logits = torch.einsum("bd,bkd->bk", query, docs.view(batch, k, -1))
            logits = logits * self.config.retriever_score_scale
            if doc_valid is not None:
                logits = logits.masked_fill(~doc_valid.bool(), SPAN_MASK_VALUE)
        if self.config.null_document:
            logits = torch.cat([logits, logits.new_zeros(batch, 1)], dim=1)
        return logits

    def _masked_logits(self, inputs: dict[str, torch.Tensor], selected: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits at the ``selected`` ``[n, seq]`` positions only (the head runs on those rows)."""
        head = getattr(self.encoder, "cls", None) or getattr(self.encoder, "lm_head", None)
        base = getattr(self.encoder, self.encoder.base_model_prefix, None)
        if head is None or base is None:
            return self.encoder(**inputs).logits[selected]
        return head(base(**inputs).last_hidden_state[selected])

    def _masked_log_probs(
        self,
        joined_input_ids: torch.Tensor,
        labels: torch.Tensor,
        joined_attention_mask: torch.Tensor | None = None,
        joined_token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``([n, vocab] log-probabilities at the n masked positions, [b * c, seq] where they are)`` of the
        joined inputs ``[b, c, seq]``: one encoder pass, the head on the masked rows only."""
        seq = joined_input_ids.shape[-1]
        inputs = {"input_ids": joined_input_ids.reshape(-1, seq)}
        for name, tensor in (
            ("attention_mask", joined_attention_mask),
            ("token_type_ids", joined_token_type_ids),
        ):
            if tensor is not None:
                inputs[name] = tensor.reshape(-1, seq)
        selected = labels.reshape(-1, seq) != IGNORE_INDEX
        return torch.log_softmax(self._masked_logits(inputs, selected).float(), dim=-1), selected

    @staticmethod
    def _summed_targets(
        log_probs: torch.Tensor, selected: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """log p(y|z, x) ``[b, c]``: the target tokens' log-probabilities summed per joined input."""
        token_ll = log_probs.gather(-1, labels.reshape(selected.shape)[selected].unsqueeze(-1)).squeeze(-1)
        totals = token_ll.new_zeros(selected.shape[0]).index_add(0, selected.nonzero()[:, 0], token_ll)
        return totals.view(labels.shape[:2])

    def mlm_log_likelihood(
        self,
        joined_input_ids: torch.Tensor,
        labels: torch.Tensor,
        joined_attention_mask: torch.Tensor | None = None,
        joined_token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """log p(y|z, x) ``[b, c]``: the masked tokens' summed log-probabilities for every joined input
        ``[b, c, seq]`` (``labels`` hold the target ids at masked positions and -100 elsewhere)."""
        log_probs, selected = self._masked_log_probs(
            joined_input_ids, labels, joined_attention_mask, joined_token_type_ids
        )
        return self._summed_targets(log_probs, selected, labels)

    @torch.no_grad()
    def masked_predictions(
        self,
        input_ids: torch.Tensor,
        joined_input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        doc_input_ids: torch.Tensor | None = None,
        doc_attention_mask: torch.Tensor | None = None,
        doc_valid: torch.Tensor | None = None,
        joined_attention_mask: torch.Tensor | None = None,
        joined_token_type_ids: torch.Tensor | None = None,
        return_log_marginal: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The most likely token at every masked position of x under the marginal
        p(y_j|x) = sum_z p(z|x) p(y_j|z, x): ``[b, q]`` ids, -100 where x is not masked. Takes the batch
        ``forward`` takes; with ``return_log_marginal``, also the ``[b]`` log p(y|x) that ``forward``
        returns, from the same model pass (an evaluation that needs both runs the model once).

        Examples:

        ```python
        >>> from hf_knnlm.open_qa.pretraining.testing import tiny_realm_mlm
        >>> model, tokenizer, index = tiny_realm_mlm()
        >>> from hf_knnlm.open_qa.pretraining import RealmPretrainingCollator
        >>> x = tokenizer("[MASK] is the capital of france")["input_ids"]
        >>> row = {"input_ids": x, "labels": [-100, 11] + [-100] * (len(x) - 2)}
        >>> predicted = model.masked_predictions(**RealmPretrainingCollator(model, tokenizer, index)([row]))
        >>> predicted.shape, (predicted[0] != -100).tolist().count(True)  # one masked token, one prediction
        (torch.Size([1, 8]), 1)
        ```
        """
        retriever_logits = self.retriever_logits(
            input_ids, attention_mask, doc_input_ids, doc_attention_mask, doc_valid
        )
        log_probs, selected = self._masked_log_probs(
            joined_input_ids, labels, joined_attention_mask, joined_token_type_ids
        )
        log_p_doc = torch.log_softmax(retriever_logits.float(), dim=-1)
        predicted = _marginal_argmax(
            log_probs, selected, log_p_doc, joined_input_ids.shape, input_ids.shape[1]
        )
        if not return_log_marginal:
            return predicted
        mlm = self._summed_targets(log_probs, selected, labels)
        return predicted, marginal_log_likelihood(retriever_logits, mlm)

    def forward(
        self,
        input_ids: torch.Tensor,
        joined_input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        doc_input_ids: torch.Tensor | None = None,
        doc_attention_mask: torch.Tensor | None = None,
        doc_valid: torch.Tensor | None = None,
        joined_attention_mask: torch.Tensor | None = None,
        joined_token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> RealmMaskedLMOutput:
        """Score the candidates and, with ``labels``, the loss -log sum_z p(y|z, x) p(z|x).

        Shapes: ``input_ids`` / ``attention_mask`` ``[b, q]``: the masked text for the query embedder;
        ``doc_*`` ``[b, k, l]``: the k retrieved documents (``doc_valid`` false for padding); ``joined_*`` and
        ``labels`` ``[b, c, seq]``: ``[CLS] x [SEP] title [SEP] text [SEP]`` of each candidate, c = k (+ 1
        for the null document, last), labels -100 except at the masked tokens.
        """
        retriever_logits = self.retriever_logits(
            input_ids, attention_mask, doc_input_ids, doc_attention_mask, doc_valid
        )
        loss = mlm = log_marginal = None
        if labels is not None:
            mlm = self.mlm_log_likelihood(
                joined_input_ids, labels, joined_attention_mask, joined_token_type_ids
            )
            log_marginal = marginal_log_likelihood(retriever_logits, mlm)
            loss = -log_marginal.mean()
        return RealmMaskedLMOutput(
            loss=loss, retriever_logits=retriever_logits, mlm_log_likelihood=mlm, log_marginal=log_marginal
        )


AutoModel.register(RealmMaskedLMConfig, RealmForMaskedLM, exist_ok=True)
AutoModelForMaskedLM.register(RealmMaskedLMConfig, RealmForMaskedLM, exist_ok=True)

__all__ = ["RealmForMaskedLM", "RealmMaskedLMOutput", "marginal_log_likelihood"]
