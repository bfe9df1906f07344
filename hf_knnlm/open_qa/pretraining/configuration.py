"""Configuration of REALM pre-training's
[`RealmForMaskedLM`][hf_knnlm.open_qa.pretraining.RealmForMaskedLM]."""

from __future__ import annotations

from dataclasses import field
from typing import Literal  # noqa: F401  (the inherited fields' annotations are read in this module)

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig

from ..configuration import RealmConfig

FORMAT_VERSION = 1


@strict
class RealmMaskedLMConfig(RealmConfig):
    r"""
    Configuration of REALM's pre-training model: a dense retriever (query and document embedders, as
    in [`RealmConfig`][hf_knnlm.open_qa.RealmConfig]) and a knowledge-augmented encoder with a masked-LM
    head that reads ``[CLS] masked text [SEP] title [SEP] document [SEP]``.

    The retriever fields and lengths are those of [`RealmConfig`][hf_knnlm.open_qa.RealmConfig]:
    ``max_question_length`` bounds the masked text, ``max_reader_length`` the joined input, ``reader_config``
    is the knowledge-augmented encoder's (``None``: ``encoder_config``); span-head fields are unused.

    Args:
        null_document (`bool`, defaults to `True`):
            Add the empty document to every candidate set, with retrieval score 0; it lets the encoder fall
            back on the masked text alone when no retrieved document helps (REALM's null document).
        format_version (`int`, defaults to 1):
            Version of the saved configuration; a newer one than this library reads is refused.

    Examples:

    ```python
    >>> from transformers import AutoConfig, BertConfig
    >>> from hf_knnlm.open_qa.pretraining import RealmMaskedLMConfig
    >>> encoder = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    >>> config = RealmMaskedLMConfig(encoder_config=encoder.to_dict(), top_k=4)
    >>> config.model_type, config.null_document, config.top_k
    ('realm_masked_lm', True, 4)
    >>> config.save_pretrained("realm-mlm-config")
    >>> type(AutoConfig.from_pretrained("realm-mlm-config")).__name__  # registered with AutoConfig
    'RealmMaskedLMConfig'
    >>> RealmMaskedLMConfig(encoder_config=encoder.to_dict(), format_version=99)
    Traceback (most recent call last):
    ...
    ValueError: RealmMaskedLMConfig.format_version=99 is newer than the 1 this hf_knnlm reads; ...
    ```
    """

    model_type = "realm_masked_lm"

    null_document: bool = field(
        default=True, metadata={"help": "Add the empty document (score 0) to every candidate set."}
    )
    format_version: int = field(
        default=FORMAT_VERSION, metadata={"help": "Version of the saved configuration."}
    )

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if not isinstance(self.null_document, bool):
            raise ValueError(
                f"RealmMaskedLMConfig.null_document must be True or False, got {self.null_document!r}."
            )
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"RealmMaskedLMConfig.format_version={self.format_version} is newer than the "
                f"{FORMAT_VERSION} this hf_knnlm reads; upgrade hf_knnlm."
            )


AutoConfig.register(RealmMaskedLMConfig.model_type, RealmMaskedLMConfig, exist_ok=True)

__all__ = ["RealmMaskedLMConfig"]
