"""RealmPretrainingSettings: what REALM pre-training masks, retrieves and refreshes (apart from the model,
so that the CLI can show it in ``--help`` without importing torch)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from ...utils.checks import check_flag, check_positive_int, is_int

FORMAT_VERSION = 1
MASKINGS = ("salient", "random")


@dataclass
class RealmPretrainingSettings:
    """REALM's inductive biases and the index refresh of
    [`pretrain_realm`][hf_knnlm.open_qa.pretraining.pretrain_realm]; each bias is a switch whose default is
    the paper's (the null document is the model's: ``RealmMaskedLMConfig.null_document``).

    Args:
        masking (`"salient"` or `"random"`, defaults to `"salient"`): mask one salient span (a named entity,
            date or number, see [`salient_spans`][hf_knnlm.open_qa.pretraining.salient_spans]) per sentence,
            or one random span of whole words (the paper's ablation).
        random_span_words (`int`, defaults to 3): longest random span, in words (1 to this, uniformly).
        fallback_to_random (`bool`, defaults to `True`): a sentence without a salient span gets a random
            span; `False` leaves it out.
        exclude_source (`bool`, defaults to `True`): never retrieve the document the masked sentence was
            taken from (trivial retrieval).
        refresh_index_every (`int`, defaults to 100): re-embed the corpus in the background every this many
            optimizer steps (0: never; the index keeps its starting vectors).
        min_sentence_words (`int`, defaults to 5): shorter sentences are not masked.
        max_sentences_per_document (`int`, *optional*): use at most this many sentences of each document
            (None: all).
        seed (`int`, defaults to 0): seed of the span choices (one per sentence, reproducible).
        format_version (`int`, defaults to 1): version of these settings as saved with a run.

    Examples:

    ```python
    >>> from hf_knnlm.open_qa.pretraining import RealmPretrainingSettings
    >>> settings = RealmPretrainingSettings()
    >>> settings.masking, settings.exclude_source, settings.refresh_index_every  # the paper's choices
    ('salient', True, 100)
    >>> settings.replace(masking="random").masking  # the ablation; None values are ignored
    'random'
    >>> RealmPretrainingSettings(masking="tokens")
    Traceback (most recent call last):
    ...
    ValueError: masking='tokens' must be one of ('salient', 'random').
    ```
    """

    masking: Literal["salient", "random"] = field(
        default="salient", metadata={"help": "Mask one salient span per sentence, or one random span."}
    )
    random_span_words: int = field(default=3, metadata={"help": "Longest random span, in words."})
    fallback_to_random: bool = field(
        default=True, metadata={"help": "Sentences without a salient span get a random span."}
    )
    exclude_source: bool = field(
        default=True, metadata={"help": "Never retrieve the document a masked sentence comes from."}
    )
    refresh_index_every: int = field(
        default=100, metadata={"help": "Re-embed the corpus in the background every N steps (0: never)."}
    )
    min_sentence_words: int = field(default=5, metadata={"help": "Shorter sentences are not masked."})
    max_sentences_per_document: int | None = field(
        default=None, metadata={"help": "Use at most this many sentences of each document (none: all)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the span choices."})
    format_version: int = field(default=FORMAT_VERSION, metadata={"help": "Version of these settings."})

    def __post_init__(self) -> None:
        if self.masking not in MASKINGS:
            raise ValueError(f"masking={self.masking!r} must be one of {MASKINGS}.")
        check_positive_int("random_span_words", self.random_span_words, "words of a random span")
        check_flag("fallback_to_random", self.fallback_to_random)
        check_flag("exclude_source", self.exclude_source)
        if not is_int(self.refresh_index_every) or self.refresh_index_every < 0:
            raise ValueError(
                f"refresh_index_every={self.refresh_index_every!r} must be an integer >= 0 (0: never)."
            )
        check_positive_int("min_sentence_words", self.min_sentence_words, "words of a masked sentence")
        if self.max_sentences_per_document is not None:
            check_positive_int("max_sentences_per_document", self.max_sentences_per_document, "or None")
        if not is_int(self.seed):
            raise ValueError(f"seed={self.seed!r} must be an integer.")
        if not is_int(self.format_version) or self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"format_version={self.format_version!r}: this hf_knnlm reads settings up to version "
                f"{FORMAT_VERSION}; upgrade hf_knnlm."
            )

    def replace(self, **changes: Any) -> RealmPretrainingSettings:
        return dataclasses.replace(self, **{name: v for name, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


__all__ = ["RealmPretrainingSettings"]
