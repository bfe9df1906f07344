"""REALM open-domain QA: dense retriever, span reader and the marginal-likelihood loss.

Fine-tuning follows Guu et al. (2020), section 3.4 / appendix:

* retriever: f(x, z) = Embed_input(x) . Embed_doc(z); p(z|x) is a softmax over the top-k documents only;
* reader: the encoder reads ``[CLS] question [SEP] document [SEP]``; every span of at most ``max_span_width``
  document tokens is scored by an MLP over its start and end vectors, normalised within the document into
  p(s|z, x);
* joint: log p(z, s|x) = log p(z|x) + log p(s|z, x), i.e. the (normalised) retriever score is added to the
  (normalised) span scores;
* loss: -log sum_{z in top-k} sum_{s in z, s matches an answer} p(z|x) p(s|z, x).

Training retrieval is done outside the model (see :mod:`hf_knnlm.open_qa.data`): the collator finds the top-k
with a no-grad query embedding against the frozen document index and hands the stored document embeddings in
the batch; the model recomputes the query embedding *with* gradients, so the query encoder learns through
f(x, z) while the document encoder stays frozen, as in the paper's fine-tuning.

A question whose answer matches no span of any retrieved document has an undefined loss (log 0); it is left
out of the batch mean (``has_answer`` in the output says which questions counted). A batch where no question
has an answer returns a zero loss that is still connected to the graph, so ``Trainer`` steps over it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from ..files import atomic_write_bytes
from .configuration import RealmConfig

if TYPE_CHECKING:
    from .document_index import DocumentIndex

# Score of spans that are not candidates (question tokens, special tokens, padding, too wide). Finite so
# that a document with no candidate at all (padding) still gives finite log-softmax values; exp(-1e4) is
# exactly 0 in float32 and float16, so masked spans never carry probability.
SPAN_MASK_VALUE = -1e4

_CARD = Path(__file__).resolve().parent.parent / "model_cards" / "open_qa.md"


@dataclass
class RealmOpenQAOutput(ModelOutput):
    """Output of :meth:`RealmForOpenQA.forward`.

    Args:
        loss: negative log marginal likelihood, averaged over the questions with ``has_answer``.
        retriever_logits: ``[batch, k]`` scaled f(x, z) of the retrieved documents.
        span_logits: ``[batch, k, seq, max_span_width]`` raw span scores; entry ``[b, z, i, w]`` scores
            the span from token ``i`` to token ``i + w``; non-candidates hold ``SPAN_MASK_VALUE``.
        joint_log_probs: ``[batch, k, seq, max_span_width]`` log p(z|x) + log p(s|z, x).
        has_answer: ``[batch]`` whether any retrieved document has a span matching an answer.
    """

    loss: torch.FloatTensor | None = None
    retriever_logits: torch.FloatTensor | None = None
    span_logits: torch.FloatTensor | None = None
    joint_log_probs: torch.FloatTensor | None = None
    has_answer: torch.BoolTensor | None = None


class RetrieverEmbedder(nn.Module):
    """Encoder + pooling (+ projection, + normalisation): one side of the dense retriever."""

    def __init__(self, config: RealmConfig):
        super().__init__()
        self.encoder = AutoModel.from_config(config.encoder_config)
        hidden = config.encoder_config.hidden_size
        self.projection = (
            nn.Linear(hidden, config.retriever_proj_size) if config.retriever_proj_size else nn.Identity()
        )
        self.pooling = config.retriever_pooling
        self.normalize = config.retriever_normalize

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        if self.pooling == "mean":
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        else:
            pooled = hidden[:, 0]
        embedding = self.projection(pooled)
        if self.normalize:
            embedding = nn.functional.normalize(embedding, dim=-1)
        return embedding


class SpanHead(nn.Module):
    """Scores every span (i, i + w), w < max_span_width, from its start and end token vectors.

    As in REALM's reader: start and end vectors are projected, summed, passed through ReLU and LayerNorm and
    mapped to one score. Spans that do not lie entirely on document tokens get ``SPAN_MASK_VALUE``.
    """

    def __init__(self, hidden_size: int, span_hidden_size: int, max_span_width: int):
        super().__init__()
        self.start = nn.Linear(hidden_size, span_hidden_size)
        self.end = nn.Linear(hidden_size, span_hidden_size)
        self.norm = nn.LayerNorm(span_hidden_size)
        self.score = nn.Linear(span_hidden_size, 1)
        self.max_span_width = max_span_width

    def forward(self, hidden: torch.Tensor, doc_mask: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``[n, seq, h]``, ``doc_mask`` ``[n, seq]`` -> scores ``[n, seq, max_span_width]``."""
        seq = hidden.shape[1]
        widths = min(self.max_span_width, seq)
        start = self.start(hidden)
        end = self.end(hidden)
        doc_mask = doc_mask.bool()
        # End vectors shifted left by w line the end token up with the start token of a width-w span.
        end_shifted = torch.stack([nn.functional.pad(end[:, w:], (0, 0, 0, w)) for w in range(widths)], dim=2)
        end_in_doc = torch.stack([nn.functional.pad(doc_mask[:, w:], (0, w)) for w in range(widths)], dim=2)
        scores = self.score(self.norm(torch.relu(start.unsqueeze(2) + end_shifted))).squeeze(-1)
        # Document tokens are contiguous, so a span whose both ends are document tokens lies inside the
        # document.
        valid = doc_mask.unsqueeze(2) & end_in_doc
        scores = scores.masked_fill(~valid, SPAN_MASK_VALUE)
        if widths < self.max_span_width:
            scores = nn.functional.pad(scores, (0, self.max_span_width - widths), value=SPAN_MASK_VALUE)
        return scores


def answer_span_mask(
    answer_starts: torch.Tensor, answer_ends: torch.Tensor, seq_len: int, max_span_width: int
) -> torch.Tensor:
    """Dense ``[..., seq, max_span_width]`` mask of the labelled answer spans (``-1`` entries are padding)."""
    widths = answer_ends - answer_starts
    ok = (answer_starts >= 0) & (widths >= 0) & (widths < max_span_width) & (answer_ends < seq_len)
    flat_index = answer_starts.clamp(min=0) * max_span_width + widths.clamp(min=0, max=max_span_width - 1)
    # Padding entries write into one extra slot that is dropped, so every write is a True and order-free.
    dump = seq_len * max_span_width
    mask = torch.zeros(*answer_starts.shape[:-1], dump + 1, dtype=torch.bool, device=answer_starts.device)
    mask.scatter_(-1, torch.where(ok, flat_index, dump), True)
    mask = mask[..., :dump]
    return mask.view(*answer_starts.shape[:-1], seq_len, max_span_width)


def marginal_loss(joint_log_probs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-log sum of p(z, s|x) over the target spans, averaged over the questions that have one.

    ``joint_log_probs`` and ``target`` are ``[batch, k, seq, width]``. Returns ``(loss, has_answer)``.
    """
    batch = joint_log_probs.shape[0]
    flat = joint_log_probs.reshape(batch, -1)
    flat_target = target.reshape(batch, -1)
    has_answer = flat_target.any(dim=-1)
    # Rows without a target get an all-true mask: their logsumexp stays finite, so no NaN gradient leaks in
    # through the rows that are dropped from the mean.
    safe_target = flat_target | ~has_answer.unsqueeze(-1)
    log_marginal = torch.logsumexp(flat.masked_fill(~safe_target, float("-inf")), dim=-1)
    if has_answer.any():
        loss = -log_marginal[has_answer].mean()
    else:
        loss = flat.sum() * 0.0
    return loss, has_answer


class RealmPreTrainedModel(PreTrainedModel):
    config_class = RealmConfig
    base_model_prefix = "realm"
    main_input_name = "question_input_ids"
    _supports_sdpa = True


class RealmForOpenQA(RealmPreTrainedModel):
    """REALM retriever + reader for open-domain extractive QA.

    Build one from any BERT-style checkpoint with :meth:`from_encoder`; train it with ``transformers.Trainer``
    and :class:`~hf_knnlm.open_qa.RealmDataCollator`; answer questions with :meth:`answer`.
    """

    def __init__(self, config: RealmConfig):
        super().__init__(config)
        self.query_embedder = RetrieverEmbedder(config)
        self.doc_embedder = None if config.share_retriever_encoders else RetrieverEmbedder(config)
        self.reader = AutoModel.from_config(config.encoder_config)
        self.span_head = SpanHead(
            config.encoder_config.hidden_size, config.span_hidden_size, config.max_span_width
        )
        self.post_init()
        self.freeze_document_embedder()

    def freeze_document_embedder(self) -> None:
        """Fine-tuning keeps the document side frozen, so the index built from it stays valid."""
        if self.doc_embedder is not None:
            self.doc_embedder.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> RealmForOpenQA:
        loaded = super().from_pretrained(*args, **kwargs)
        # Loading swaps in new Parameter objects, which forgets requires_grad=False.
        (loaded[0] if isinstance(loaded, tuple) else loaded).freeze_document_embedder()
        return loaded

    @classmethod
    def from_encoder(cls, encoder_name_or_path: str | os.PathLike, **config_kwargs: Any) -> RealmForOpenQA:
        """A model whose query embedder, document embedder and reader all start from one encoder checkpoint.

        ``config_kwargs`` are :class:`RealmConfig` fields. Projection and span-head weights start random.
        """
        encoder_config = AutoConfig.from_pretrained(encoder_name_or_path)
        model = cls(RealmConfig(encoder_config=encoder_config, **config_kwargs))
        state = AutoModel.from_pretrained(encoder_name_or_path).state_dict()
        encoders = [model.query_embedder.encoder, model.reader]
        if model.doc_embedder is not None:
            encoders.append(model.doc_embedder.encoder)
        for encoder in encoders:
            encoder.load_state_dict(state)
        model.config.name_or_path = str(encoder_name_or_path)
        return model

    @property
    def document_embedder(self) -> RetrieverEmbedder:
        """The module that embeds documents for the index (the query embedder when they are shared)."""
        return self.doc_embedder if self.doc_embedder is not None else self.query_embedder

    def embed_questions(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        return self.query_embedder(input_ids, attention_mask, token_type_ids)

    def embed_documents(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        return self.document_embedder(input_ids, attention_mask, token_type_ids)

    def forward(
        self,
        question_input_ids: torch.Tensor,
        doc_embeddings: torch.Tensor,
        reader_input_ids: torch.Tensor,
        doc_mask: torch.Tensor,
        question_attention_mask: torch.Tensor | None = None,
        question_token_type_ids: torch.Tensor | None = None,
        reader_attention_mask: torch.Tensor | None = None,
        reader_token_type_ids: torch.Tensor | None = None,
        doc_valid: torch.Tensor | None = None,
        answer_starts: torch.Tensor | None = None,
        answer_ends: torch.Tensor | None = None,
    ) -> RealmOpenQAOutput:
        """Score the top-k retrieved documents and their spans; compute the loss when answers are given.

        Shapes: ``question_*`` ``[b, q]``; ``doc_embeddings`` ``[b, k, d]`` (the index vectors of the
        retrieved documents, no gradient); ``reader_*`` and ``doc_mask`` ``[b, k, l]`` (``doc_mask`` marks
        the document tokens of ``[CLS] question [SEP] document [SEP]``); ``doc_valid`` ``[b, k]`` (false for
        padding documents); ``answer_starts`` / ``answer_ends`` ``[b, k, m]`` inclusive token positions of
        the spans that match an answer, ``-1`` for padding.
        """
        batch, k, seq = reader_input_ids.shape
        query = self.embed_questions(question_input_ids, question_attention_mask, question_token_type_ids)
        retriever_logits = torch.einsum("bd,bkd->bk", query, doc_embeddings.to(query.dtype))
        retriever_logits = retriever_logits * self.config.retriever_score_scale
        if doc_valid is not None:
            retriever_logits = retriever_logits.masked_fill(~doc_valid.bool(), float("-inf"))
        log_p_doc = torch.log_softmax(retriever_logits, dim=-1)

        def flat(tensor):
            return None if tensor is None else tensor.reshape(batch * k, seq)

        reader_kwargs = {"attention_mask": flat(reader_attention_mask)}
        if reader_token_type_ids is not None:
            reader_kwargs["token_type_ids"] = flat(reader_token_type_ids)
        hidden = self.reader(input_ids=flat(reader_input_ids), **reader_kwargs).last_hidden_state
        span_logits = self.span_head(hidden, flat(doc_mask)).view(batch, k, seq, -1)
        log_p_span = torch.log_softmax(span_logits.reshape(batch, k, -1), dim=-1).view_as(span_logits)
        # Padding documents have log p(z|x) = -inf; keep them finite so 0 * -inf never appears downstream.
        joint = log_p_doc.clamp(min=SPAN_MASK_VALUE)[..., None, None] + log_p_span

        loss = has_answer = None
        if answer_starts is not None and answer_ends is not None:
            target = answer_span_mask(answer_starts, answer_ends, seq, self.config.max_span_width)
            if doc_valid is not None:
                target &= doc_valid.bool()[..., None, None]
            loss, has_answer = marginal_loss(joint, target)
        return RealmOpenQAOutput(
            loss=loss,
            retriever_logits=retriever_logits,
            span_logits=span_logits,
            joint_log_probs=joint,
            has_answer=has_answer,
        )

    @torch.no_grad()
    def answer(
        self,
        questions: list[str] | str,
        index: DocumentIndex,
        tokenizer: Any,
        top_k: int | None = None,
        batch_size: int = 8,
    ) -> list[dict[str, Any]]:
        """Retrieve, read and return the best span for each question.

        Each result holds ``answer`` (text), ``score`` (p(z, s|x) of the chosen span), ``doc_id`` (the
        document it came from) and ``doc_ids`` / ``doc_scores`` (the retrieved documents and p(z|x)).
        """
        from .data import build_features, retrieve

        if isinstance(questions, str):
            questions = [questions]
        was_training = self.training
        self.eval()
        results = []
        try:
            for start in range(0, len(questions), batch_size):
                chunk = list(questions[start : start + batch_size])
                doc_ids = retrieve(self, tokenizer, index, chunk, top_k or self.config.top_k)
                features, meta = build_features(self, tokenizer, index, chunk, doc_ids)
                results.extend(self.decode(features, meta))
        finally:
            self.train(was_training)
        return results

    @torch.no_grad()
    def decode(self, features: dict[str, torch.Tensor], meta: dict[str, Any]) -> list[dict[str, Any]]:
        """Best span per question from features made by :func:`~hf_knnlm.open_qa.data.build_features`."""
        device = self.device
        output = self(**{name: tensor.to(device) for name, tensor in features.items()})
        joint = output.joint_log_probs.float().cpu()
        batch, k, seq, width = joint.shape
        best = joint.reshape(batch, -1).argmax(dim=-1)
        doc_probs = torch.softmax(output.retriever_logits.float().cpu(), dim=-1)
        results = []
        for b in range(batch):
            flat_index = int(best[b])
            z, rest = divmod(flat_index, seq * width)
            start, w = divmod(rest, width)
            offsets = meta["offsets"][b][z]
            text = meta["texts"][b][z]
            results.append(
                {
                    "answer": text[offsets[start][0] : offsets[start + w][1]],
                    "score": float(joint.reshape(batch, -1)[b, flat_index].exp()),
                    "doc_id": meta["doc_ids"][b][z],
                    "doc_ids": list(meta["doc_ids"][b]),
                    "doc_scores": [float(p) for p in doc_probs[b, : len(meta["doc_ids"][b])]],
                }
            )
        return results

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        super().save_pretrained(save_directory, *args, **kwargs)
        card = Path(save_directory) / "README.md"
        if not card.exists() and _CARD.is_file():
            text = Template(_CARD.read_text(encoding="utf-8")).safe_substitute(
                encoder=self.config.name_or_path or "unknown",
                top_k=self.config.top_k,
                max_span_width=self.config.max_span_width,
            )
            atomic_write_bytes(card, text.encode("utf-8"))


AutoModel.register(RealmConfig, RealmForOpenQA, exist_ok=True)

__all__ = ["RealmForOpenQA", "RealmOpenQAOutput", "RealmPreTrainedModel", "SpanHead", "RetrieverEmbedder"]
