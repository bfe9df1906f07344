"""When to retrieve, with what query, how many passages and how they are weighted.

In-Context RALM (Ram et al., 2023) and REPLUG (Shi et al., 2023) are two settings of one computation:

    p(y | x) = sum over the top-k passages d of  softmax(score(d) / document_temperature) · p_LM(y | d ⊕ x)

In-Context RALM is ``num_documents=1`` (the weight is 1) with a new retrieval every ``retrieval_stride``
tokens, queried by the last ``query_length`` tokens; REPLUG is ``num_documents=k`` ensembled in
probability space.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from ..utils.checks import check_flag, check_positive_finite, check_positive_int


@dataclass
class RetrievalSettings:
    """Validated retrieval settings shared by perplexity evaluation, generation and the CLI.

    Examples:

    ```python
    >>> from hf_knnlm.rag import RetrievalSettings
    >>> settings = RetrievalSettings(num_documents=4, retrieval_stride=None)  # REPLUG: 4 passages, once
    >>> settings.num_documents, settings.retrieval_stride, settings.max_document_tokens
    (4, None, 256)
    >>> try:
    ...     RetrievalSettings(num_documents=0)
    ... except ValueError as err:
    ...     print(str(err).split(":")[0])
    num_documents=0 must be a positive integer...
    ```
    """

    num_documents: int = field(
        default=1,
        metadata={"help": "Passages per retrieval (1: In-Context RALM; k > 1: the REPLUG ensemble)."},
    )
    retrieval_stride: int | None = field(
        default=4, metadata={"help": "Tokens between retrievals; None retrieves once, from the prompt."}
    )
    query_length: int = field(default=32, metadata={"help": "The last this many tokens are the query."})
    document_temperature: float = field(
        default=1.0,
        metadata={"help": "Passage weights are softmax(score / document_temperature) (REPLUG)."},
    )
    max_document_tokens: int = field(
        default=256, metadata={"help": "A passage is cut from the left to this many LM tokens."}
    )
    reuse_cache: bool = field(
        default=True,
        metadata={
            "help": "Perplexity evaluation: compute each passage's KV cache once and extend it with the "
            "context of every row that reads it, the LM head only at scored positions (same log-probs); "
            "False recomputes passage + context of every row."
        },
    )

    def __post_init__(self) -> None:
        check_positive_int("num_documents", self.num_documents, "passages per retrieval, e.g. 4")
        if self.retrieval_stride is not None:
            check_positive_int("retrieval_stride", self.retrieval_stride, "e.g. 4, or None to retrieve once")
        check_positive_int("query_length", self.query_length, "the last tokens that query, e.g. 32")
        check_positive_finite("document_temperature", self.document_temperature, "it divides the scores")
        check_positive_int("max_document_tokens", self.max_document_tokens, "LM tokens per passage, e.g. 256")
        check_flag("reuse_cache", self.reuse_cache)

    def replace(self, **changes: Any) -> RetrievalSettings:
        """A copy with the changes that are not ``None`` (``retrieval_stride=None`` is kept as given)."""
        return dataclasses.replace(
            self, **{n: v for n, v in changes.items() if v is not None or n == "retrieval_stride"}
        )

    def to_dict(self) -> dict:
        return asdict(self)


__all__ = ["RetrievalSettings"]
