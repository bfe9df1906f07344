"""Configuration of [`RealmForOpenQA`][hf_knnlm.open_qa.RealmForOpenQA]."""

from __future__ import annotations

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


@strict
class RealmConfig(PreTrainedConfig):
    r"""
    Configuration of a REALM open-domain QA model: a dense retriever (query and document embedders) and a
    reader with a span-prediction head.

    Args:
        encoder_config (`dict` or `PreTrainedConfig`, *optional*):
            Configuration of the retriever encoder (two copies: query and document embedders, or one when
            `share_retriever_encoders=True`), and of the reader when `reader_config` is `None`. Defaults to a
            `BertConfig`.
        reader_config (`dict` or `PreTrainedConfig`, *optional*):
            Configuration of the reader when it is a different checkpoint than the retriever, e.g. the
            config of an `AutoModelForQuestionAnswering` checkpoint. `None` reads with `encoder_config`.
        reader_head (`"mlp"` or `"start_end"`, defaults to `"mlp"`):
            `"mlp"`: the reader is a plain encoder (`AutoModel`) and REALM's span MLP scores spans.
            `"start_end"`: the reader is an `AutoModelForQuestionAnswering` and a span scores start logit +
            end logit, as in BERT and DPR readers (and `pipeline("question-answering")`).
        reader_stride (`int`, *optional*):
            Document tokens shared by consecutive reader windows when a document does not fit in
            `max_reader_length` (the `doc_stride` of extractive QA). Defaults to 128, or half the document
            tokens of a window when that is less.
        retriever_pooling (`"cls"` or `"mean"`, defaults to `"cls"`):
            How a retriever embedding is read from the encoder: the `[CLS]` vector (REALM) or the masked
            mean of the token vectors (what sentence-transformers checkpoints such as all-MiniLM-L6-v2 were
            trained with).
        retriever_proj_size (`int`, *optional*, defaults to 128):
            Size of the linear projection on top of the pooled vector. `None` keeps the pooled vector as is,
            which preserves the zero-shot quality of a checkpoint that was trained as a sentence embedder.
        retriever_normalize (`bool`, defaults to `False`):
            L2-normalise retriever embeddings, so that f(x, z) is a cosine similarity.
        retriever_score_scale (`float`, defaults to 1.0):
            Multiplies f(x, z) before the softmax over the top-k documents. Cosine scores live in [-1, 1]; a
            scale around 20 keeps p(z|x) from being almost uniform.
        share_retriever_encoders (`bool`, defaults to `False`):
            Use one encoder for questions and documents. REALM keeps two; a symmetric sentence embedder
            works with one, and then the document index goes stale while the query side trains (see
            `IndexRefreshCallback`).
        span_hidden_size (`int`, defaults to 256):
            Width of the span MLP: start and end vectors are projected to this size, summed, passed through
            ReLU and LayerNorm and scored by a linear layer.
        max_span_width (`int`, defaults to 10):
            Longest answer span, in tokens.
        top_k (`int`, defaults to 5):
            Documents retrieved per question for training features and for `answer()`.
        max_question_length (`int`, defaults to 64):
            Question tokens kept for the query embedder and in the reader input.
        max_reader_length (`int`, defaults to 288):
            Length of one reader window `[CLS] question [SEP] document part [SEP]`; longer documents are read
            in several overlapping windows (see `reader_stride`).
        max_doc_embed_length (`int`, defaults to 256):
            Tokens of `title [SEP] text` read by the document embedder.

    Examples:

    ```python
    >>> from transformers import AutoConfig, BertConfig
    >>> from hf_knnlm.open_qa import RealmConfig
    >>> encoder = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    >>> config = RealmConfig(encoder_config=encoder.to_dict(),
    ...                      retriever_pooling="mean", retriever_proj_size=None, retriever_normalize=True,
    ...                      retriever_score_scale=20.0, top_k=5)  # a sentence embedder as the retriever
    >>> config.model_type, config.encoder_config.hidden_size, config.reader_head
    ('realm_open_qa', 32, 'mlp')
    >>> config.save_pretrained("realm-config")
    >>> type(AutoConfig.from_pretrained("realm-config")).__name__  # registered with AutoConfig
    'RealmConfig'
    ```
    """

    model_type = "realm_open_qa"
    sub_configs_defaults = {
        "encoder_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
        "reader_config": SubConfigSpec(config_class=AutoConfig, model_type="bert", optional=True),
    }

    encoder_config: dict | PreTrainedConfig | None = None
    reader_config: dict | PreTrainedConfig | None = None
    reader_head: Literal["mlp", "start_end"] = "mlp"
    reader_stride: int | None = None
    retriever_pooling: Literal["cls", "mean"] = "cls"
    retriever_proj_size: int | None = 128
    retriever_normalize: bool = False
    retriever_score_scale: float | int = 1.0
    share_retriever_encoders: bool = False
    span_hidden_size: int = 256
    max_span_width: int = 10
    top_k: int = 5
    max_question_length: int = 64
    max_reader_length: int = 288
    max_doc_embed_length: int = 256
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Checked here rather than in a @strict validator so that bad values raise a plain ValueError.
        self._check_architecture()

    def _check_architecture(self) -> None:
        """Reject settings no model can be built with, naming the value and the fix."""
        if self.reader_head not in ("mlp", "start_end"):
            raise ValueError(
                f"RealmConfig.reader_head must be 'mlp' or 'start_end', got {self.reader_head!r}."
            )
        if self.retriever_pooling not in ("cls", "mean"):
            raise ValueError(
                f"RealmConfig.retriever_pooling must be 'cls' or 'mean', got {self.retriever_pooling!r}."
            )
        for name in (
            "span_hidden_size",
            "max_span_width",
            "top_k",
            "max_question_length",
            "max_reader_length",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"RealmConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.retriever_proj_size is not None and self.retriever_proj_size < 1:
            raise ValueError(
                f"RealmConfig.retriever_proj_size must be >= 1 or None (no projection), got "
                f"{self.retriever_proj_size}."
            )
        for name, config in (
            ("max_doc_embed_length", self.encoder_config),
            ("max_question_length", self.encoder_config),
            ("max_reader_length", self.reader_encoder_config),
        ):
            limit = _position_limit(config)
            if limit is not None and getattr(self, name) > limit:
                raise ValueError(
                    f"RealmConfig.{name}={getattr(self, name)} exceeds the {limit} positions the "
                    f"{config.model_type} encoder can take (max_position_embeddings="
                    f"{config.max_position_embeddings}); lower it to at most {limit}."
                )
        if self.max_reader_length <= self.max_question_length + 3:
            raise ValueError(
                f"RealmConfig.max_reader_length ({self.max_reader_length}) leaves no room for the document "
                f"after a question of up to {self.max_question_length} tokens; raise max_reader_length."
            )
        room = self._window_room
        if self.reader_stride is not None and not 0 <= self.reader_stride < room:
            raise ValueError(
                f"RealmConfig.reader_stride={self.reader_stride} must be >= 0 and below {room}, the document "
                f"tokens a window holds (max_reader_length - max_question_length - 4); lower it."
            )

    @property
    def _window_room(self) -> int:
        """Document tokens a reader window holds at least (a question of max_question_length, 4 specials)."""
        return self.max_reader_length - self.max_question_length - 4

    @property
    def window_stride(self) -> int:
        """The overlap of consecutive reader windows, in tokens."""
        return self.reader_stride if self.reader_stride is not None else min(128, self._window_room // 2)

    @property
    def reader_encoder_config(self) -> PreTrainedConfig:
        """The reader's configuration: `reader_config`, or `encoder_config` when the reader shares it."""
        return self.reader_config if self.reader_config is not None else self.encoder_config

    @property
    def retriever_dim(self) -> int:
        """Size of the vectors stored in the document index."""
        return self.retriever_proj_size or self.encoder_config.hidden_size


def _position_limit(config: PreTrainedConfig) -> int | None:
    """Positions an encoder can take; RoBERTa-style models (MPNet, RoBERTa) reserve ``pad_token_id + 1``."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and config.model_type in ("roberta", "mpnet", "xlm-roberta", "camembert"):
        limit -= (config.pad_token_id or 0) + 1
    return limit


AutoConfig.register(RealmConfig.model_type, RealmConfig, exist_ok=True)

__all__ = ["RealmConfig"]
