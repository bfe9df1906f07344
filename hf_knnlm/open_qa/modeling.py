"""REALM open-domain QA: dense retriever, span reader and the marginal-likelihood loss.

Fine-tuning follows Guu et al. (2020), section 3.4 / appendix:

* retriever: f(x, z) = Embed_input(x) . Embed_doc(z); p(z|x) is a softmax over the top-k documents only;
* reader: the encoder reads ``[CLS] question [SEP] document [SEP]`` (a long document in several overlapping
  windows); every span of at most ``max_span_width`` document tokens is scored, either by REALM's MLP over its
  start and end vectors (plain encoder) or as start logit + end logit (an ``AutoModelForQuestionAnswering``
  reader), and normalised over all spans of all windows of the document into p(s|z, x);
* joint: log p(z, s|x) = log p(z|x) + log p(s|z, x), i.e. the (normalised) retriever score is added to the
  (normalised) span scores;
* loss: -log sum_{z in top-k} sum_{s in z, s matches an answer} p(z|x) p(s|z, x).

Training retrieval is done outside the model (see ``hf_knnlm.open_qa.data``): the collator finds the top-k
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
from transformers import AutoConfig, AutoModel, AutoModelForQuestionAnswering, PreTrainedModel
from transformers.utils import ModelOutput

from ..retrieval.embedder import RetrieverEmbedder
from ..utils.files import atomic_write_bytes, not_matching, write_folder
from .configuration import RealmConfig
from .heads import SPAN_MASK_VALUE, SpanHead, answer_span_mask, start_end_span_scores
from .reading import decode_best_spans, doc_normalised_log_probs, run_reader

if TYPE_CHECKING:
    from ..retrieval.document_index import DocumentIndex

_CARD = Path(__file__).resolve().parent.parent / "model_cards" / "open_qa.md"


_OWN_FILES = ("*.safetensors", "*.bin", "*.index.json", "config.json", "generation_config.json", "README.md")


@dataclass
class RealmOpenQAOutput(ModelOutput):
    """Output of [`RealmForOpenQA.forward`][hf_knnlm.open_qa.RealmForOpenQA.forward].

    Args:
        loss: negative log marginal likelihood, averaged over the questions with ``has_answer``.
        retriever_logits: ``[batch, k]`` scaled f(x, z) of the retrieved documents.
        span_logits: ``[batch, k, seq, max_span_width]`` raw span scores; entry ``[b, z, i, w]`` scores
            the span from token ``i`` to token ``i + w``; non-candidates hold ``SPAN_MASK_VALUE``.
        joint_log_probs: ``[batch, k, seq, max_span_width]`` log p(z|x) + log p(s|z, x).
        has_answer: ``[batch]`` whether any retrieved document has a span matching an answer.

    Examples:

    ```python
    >>> from hf_knnlm.open_qa.testing import tiny_realm
    >>> model, tokenizer, index = tiny_realm()  # a random 1-layer REALM, documents paris and rome
    >>> from hf_knnlm.open_qa import build_features, retrieve
    >>> questions = ["what is the capital of france"]
    >>> features, meta = build_features(model, tokenizer, index, questions, retrieve(model, tokenizer, index,
    ...                                 questions, top_k=2), answers=[["paris"]])
    >>> output = model(**features)  # a RealmOpenQAOutput
    >>> output.loss.shape, tuple(output.retriever_logits.shape), output.has_answer.tolist()
    (torch.Size([]), (1, 2), [True])
    ```
    """

    loss: torch.FloatTensor | None = None
    retriever_logits: torch.FloatTensor | None = None
    span_logits: torch.FloatTensor | None = None
    joint_log_probs: torch.FloatTensor | None = None
    has_answer: torch.BoolTensor | None = None


def _embedder(config: RealmConfig) -> RetrieverEmbedder:
    return RetrieverEmbedder(
        config.encoder_config,
        pooling=config.retriever_pooling,
        proj_size=config.retriever_proj_size,
        normalize=config.retriever_normalize,
    )


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
    """Base of the REALM open-QA models: ties them to [`RealmConfig`][hf_knnlm.open_qa.RealmConfig]
    (model type ``realm_open_qa``) for ``from_pretrained`` / ``save_pretrained`` and the Auto classes.

    Examples:

    ```python
    >>> from hf_knnlm.open_qa import RealmConfig, RealmForOpenQA, RealmPreTrainedModel
    >>> issubclass(RealmForOpenQA, RealmPreTrainedModel), RealmPreTrainedModel.config_class is RealmConfig
    (True, True)
    ```
    """

    config_class = RealmConfig
    base_model_prefix = "realm"
    main_input_name = "question_input_ids"
    _supports_sdpa = True


class RealmForOpenQA(RealmPreTrainedModel):
    """REALM retriever + reader for open-domain extractive QA.

    Build one from a retriever checkpoint and a reader checkpoint with
    [`from_retriever_and_reader`][hf_knnlm.open_qa.RealmForOpenQA.from_retriever_and_reader] (the reader may
    be any ``AutoModelForQuestionAnswering`` checkpoint, e.g. one made by
    [`train_reader`][hf_knnlm.open_qa.train_reader]), or from one encoder with
    [`from_encoder`][hf_knnlm.open_qa.RealmForOpenQA.from_encoder]; train it with ``transformers.Trainer`` and
    [`RealmDataCollator`][hf_knnlm.open_qa.RealmDataCollator]; answer questions with
    [`answer`][hf_knnlm.open_qa.RealmForOpenQA.answer].

    Examples:

    ```python
    >>> import torch
    >>> from hf_knnlm.open_qa import DocumentIndex, RealmConfig, RealmForOpenQA
    >>> from hf_knnlm.open_qa.testing import TINY_DOCUMENTS
    >>> from hf_knnlm.retrieval.testing import tiny_encoder_config, tiny_tokenizer
    >>> tokenizer = tiny_tokenizer()  # a word-level BertTokenizerFast
    >>> encoder = tiny_encoder_config(len(tokenizer))  # a 1-layer BertConfig, e.g. all-MiniLM-L6-v2's config
    >>> _ = torch.manual_seed(0)
    >>> model = RealmForOpenQA(RealmConfig(encoder_config=encoder.to_dict(), top_k=2)).eval()
    >>> docs = list(TINY_DOCUMENTS)  # [{"id": "paris", "title": "france", "text": "paris is ..."}, ...]
    >>> index = DocumentIndex.build(docs, model, tokenizer, show_progress=False)
    >>> result = model.answer(["what is the capital of france"], index, tokenizer)[0]
    >>> sorted(result)  # a span of a retrieved document, its offsets there and p(z|x) of the documents
    ['answer', 'doc_id', 'doc_ids', 'doc_scores', 'end', 'score', 'start']
    >>> text = {d["id"]: d["text"] for d in docs}[result["doc_id"]]
    >>> text[result["start"] : result["end"]] == result["answer"]
    True
    >>> model.save_pretrained("realm"), tokenizer.save_pretrained("realm")
    (None, ...)
    >>> from transformers import AutoModel
    >>> type(AutoModel.from_pretrained("realm")).__name__  # registered with the Auto classes
    'RealmForOpenQA'
    ```
    """

    # Reader windows run at most this many at a time, sorted by length (see ``reading.run_reader``).
    reader_chunk_rows = 16

    def __init__(self, config: RealmConfig):
        super().__init__(config)
        self.query_embedder = _embedder(config)
        self.doc_embedder = None if config.share_retriever_encoders else _embedder(config)
        reader_config = config.reader_encoder_config
        if config.reader_head == "start_end":
            self.reader = AutoModelForQuestionAnswering.from_config(reader_config)
            self.span_head = None
        else:
            self.reader = AutoModel.from_config(reader_config)
            self.span_head = SpanHead(
                reader_config.hidden_size, config.span_hidden_size, config.max_span_width
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
        """A model whose query embedder, document embedder and reader all start from one encoder checkpoint,
        with REALM's span MLP on the reader.

        ``config_kwargs`` are [`RealmConfig`][hf_knnlm.open_qa.RealmConfig] fields. Projection and span-head
        weights start random.
        """
        return cls.from_retriever_and_reader(
            encoder_name_or_path, encoder_name_or_path, reader_head="mlp", **config_kwargs
        )

    @classmethod
    def from_retriever_and_reader(
        cls,
        retriever_name_or_path: str | os.PathLike,
        reader_name_or_path: str | os.PathLike,
        *,
        reader_head: str = "auto",
        **config_kwargs: Any,
    ) -> RealmForOpenQA:
        """Query and document embedders from one checkpoint, the reader from another.

        ``reader_head="auto"`` keeps the start/end head of a question-answering checkpoint (its config names a
        ``*ForQuestionAnswering`` architecture; span score = start logit + end logit) and otherwise puts
        REALM's span MLP on the plain encoder; ``"start_end"`` or ``"mlp"`` force one. ``config_kwargs`` are
        [`RealmConfig`][hf_knnlm.open_qa.RealmConfig] fields.
        """
        retriever_config = AutoConfig.from_pretrained(retriever_name_or_path)
        reader_config = AutoConfig.from_pretrained(reader_name_or_path)
        if reader_head == "auto":
            architectures = reader_config.architectures or []
            is_qa = any(name.endswith("ForQuestionAnswering") for name in architectures)
            reader_head = "start_end" if is_qa else "mlp"
        shared = str(retriever_name_or_path) == str(reader_name_or_path) and reader_head == "mlp"
        config = RealmConfig(
            encoder_config=retriever_config,
            reader_config=None if shared else reader_config,
            reader_head=reader_head,
            **config_kwargs,
        )
        model = cls(config)
        retriever_state = AutoModel.from_pretrained(retriever_name_or_path).state_dict()
        for embedder in (model.query_embedder, model.doc_embedder):
            if embedder is not None:
                embedder.encoder.load_state_dict(retriever_state)
        reader_class = AutoModelForQuestionAnswering if reader_head == "start_end" else AutoModel
        model.reader.load_state_dict(reader_class.from_pretrained(reader_name_or_path).state_dict())
        model.config.name_or_path = str(retriever_name_or_path)
        model.config.reader_name_or_path = str(reader_name_or_path)
        return model

    @property
    def document_embedder(self) -> RetrieverEmbedder:
        """The module that embeds documents for the index (the query embedder when they are shared)."""
        return self.doc_embedder if self.doc_embedder is not None else self.query_embedder

    def embed_questions(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        return self.query_embedder(input_ids, attention_mask, token_type_ids)

    def embed_documents(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        return self.document_embedder(input_ids, attention_mask, token_type_ids)

    def _span_scores(self, inputs: dict[str, torch.Tensor], doc_mask: torch.Tensor) -> torch.Tensor:
        """Reader windows ``[n, seq]`` -> span scores ``[n, seq, max_span_width]``."""
        if self.span_head is None:
            out = self.reader(**inputs)
            return start_end_span_scores(
                out.start_logits, out.end_logits, doc_mask, self.config.max_span_width
            )
        return self.span_head(self.reader(**inputs).last_hidden_state, doc_mask)

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
        window_doc: torch.Tensor | None = None,
        answer_starts: torch.Tensor | None = None,
        answer_ends: torch.Tensor | None = None,
    ) -> RealmOpenQAOutput:
        """Score the top-k retrieved documents and their spans; compute the loss when answers are given.

        Shapes: ``question_*`` ``[b, q]``; ``doc_embeddings`` ``[b, k, d]`` (the index vectors of the
        retrieved documents, no gradient); ``reader_*`` and ``doc_mask`` ``[b, n, l]``: n reader windows per
        question (``doc_mask`` marks the document tokens of ``[CLS] question [SEP] document part [SEP]``);
        ``window_doc`` ``[b, n]``: the document (0..k-1) each window reads, ``-1`` for padding windows
        (default: window i reads document i, n = k); ``doc_valid`` ``[b, k]`` (false for padding documents);
        ``answer_starts`` / ``answer_ends`` ``[b, n, m]`` inclusive token positions of the spans that match an
        answer, ``-1`` for padding.
        """
        batch, n, seq = reader_input_ids.shape
        k = doc_embeddings.shape[1]
        query = self.embed_questions(question_input_ids, question_attention_mask, question_token_type_ids)
        retriever_logits = torch.einsum("bd,bkd->bk", query, doc_embeddings.to(query.dtype))
        retriever_logits = retriever_logits * self.config.retriever_score_scale
        if doc_valid is not None:
            retriever_logits = retriever_logits.masked_fill(~doc_valid.bool(), float("-inf"))
        log_p_doc = torch.log_softmax(retriever_logits.float(), dim=-1)
        if window_doc is None:
            window_doc = torch.arange(n, device=reader_input_ids.device).expand(batch, n)
        window_doc = window_doc.masked_fill(window_doc >= k, -1)
        if doc_valid is not None:
            window_doc = window_doc.masked_fill(~doc_valid.bool().gather(1, window_doc.clamp(min=0)), -1)

        inputs = {"input_ids": reader_input_ids, "attention_mask": reader_attention_mask}
        if reader_attention_mask is None:
            inputs["attention_mask"] = torch.ones_like(reader_input_ids)
        if reader_token_type_ids is not None:
            inputs["token_type_ids"] = reader_token_type_ids
        inputs = {name: tensor.reshape(batch * n, seq) for name, tensor in inputs.items()}
        span_logits = run_reader(
            self._span_scores,
            inputs,
            doc_mask.reshape(batch * n, seq),
            (window_doc >= 0).flatten(),
            self.config.max_span_width,
            self.reader_chunk_rows,
        ).view(batch, n, seq, -1)
        log_p_span = doc_normalised_log_probs(span_logits, window_doc, k)
        # Padding documents have log p(z|x) = -inf; keep them finite so 0 * -inf never appears downstream.
        log_p_window = log_p_doc.clamp(min=SPAN_MASK_VALUE).gather(1, window_doc.clamp(min=0))
        joint = log_p_window.masked_fill(window_doc < 0, SPAN_MASK_VALUE)[..., None, None] + log_p_span

        loss = has_answer = None
        if answer_starts is not None and answer_ends is not None:
            target = answer_span_mask(answer_starts, answer_ends, seq, self.config.max_span_width)
            target &= (window_doc >= 0)[..., None, None]
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
        """Retrieve, read (every window of every retrieved document) and return the best span per question.

        ``tokenizer`` is one tokenizer or a [`RealmTokenizerPair`][hf_knnlm.open_qa.RealmTokenizerPair]. Each
        result holds ``answer`` (text), ``score`` (p(z, s|x) of the chosen span), ``doc_id`` (the document it
        came from), ``start`` / ``end`` (its character offsets in that document's text) and ``doc_ids`` /
        ``doc_scores`` (the retrieved documents and p(z|x)).
        """
        from .data import build_features, resolve_top_k, retrieve

        top_k = resolve_top_k(top_k, self)
        index.check_compatible(self, tokenizer)
        if isinstance(questions, str):
            questions = [questions]
        was_training = self.training
        self.eval()
        results = []
        try:
            for start in range(0, len(questions), batch_size):
                chunk = list(questions[start : start + batch_size])
                doc_ids = retrieve(self, tokenizer, index, chunk, top_k)
                features, meta = build_features(self, tokenizer, index, chunk, doc_ids)
                results.extend(self.decode(features, meta))
        finally:
            self.train(was_training)
        return results

    @torch.no_grad()
    def decode(self, features: dict[str, torch.Tensor], meta: dict[str, Any]) -> list[dict[str, Any]]:
        """Best span per question from features made by
        [`build_features`][hf_knnlm.open_qa.build_features]."""
        device = self.device
        output = self(**{name: tensor.to(device) for name, tensor in features.items()})
        doc_probs = torch.softmax(output.retriever_logits.float().cpu(), dim=-1)
        window_doc = features.get("window_doc")
        if window_doc is None:
            window_doc = torch.arange(output.joint_log_probs.shape[1]).expand(doc_probs.shape[0], -1)
        return decode_best_spans(output.joint_log_probs.float().cpu(), window_doc.cpu(), doc_probs, meta)

    def save_reader(self, save_directory: str | os.PathLike, tokenizer: Any = None) -> None:
        """Save the reader alone as a standard ``AutoModelForQuestionAnswering`` checkpoint (what
        ``pipeline("question-answering")`` loads), e.g. after REALM fine-tuning.

        Needs ``reader_head="start_end"``."""
        if self.span_head is not None:
            raise ValueError(
                "this reader scores spans with REALM's MLP, which no question-answering pipeline knows; "
                "build the model with reader_head='start_end' (a question-answering checkpoint as reader) "
                "to export it."
            )
        self.reader.save_pretrained(save_directory)
        if tokenizer is not None:
            from .tokenization import reader_tokenizer

            reader_tokenizer(tokenizer).save_pretrained(save_directory)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """``PreTrainedModel.save_pretrained`` written beside the folder and swapped in whole under its lock:
        a save that fails midway (a full disk) leaves the checkpoint that was there as it was."""
        if kwargs.get("push_to_hub"):  # the repository is named after the folder, not its temporary sibling
            kwargs.setdefault("repo_id", Path(save_directory).name)
        # what else the folder holds (its tokenizers, a user's files) stays; old weights do not
        with write_folder(save_directory, keep=not_matching(_OWN_FILES)) as tmp:
            super().save_pretrained(tmp, *args, **kwargs)
            self._write_card(tmp)

    def _write_card(self, save_directory: Path) -> None:
        card = Path(save_directory) / "README.md"
        if not card.exists() and _CARD.is_file():
            text = Template(_CARD.read_text(encoding="utf-8")).safe_substitute(
                encoder=self.config.name_or_path or "unknown",
                reader=getattr(self.config, "reader_name_or_path", None)
                or self.config.name_or_path
                or "unknown",
                span_score="start logit + end logit (a question-answering head)"
                if self.span_head is None
                else "REALM's MLP over its start and end vectors",
                top_k=self.config.top_k,
                max_span_width=self.config.max_span_width,
            )
            atomic_write_bytes(card, text.encode("utf-8"))


AutoModel.register(RealmConfig, RealmForOpenQA, exist_ok=True)

__all__ = [
    "SPAN_MASK_VALUE",
    "RealmForOpenQA",
    "RealmOpenQAOutput",
    "RealmPreTrainedModel",
    "RetrieverEmbedder",
    "SpanHead",
]
