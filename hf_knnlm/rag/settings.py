"""When to retrieve, with what query, how many passages and how they are weighted.

In-Context RALM (Ram et al., 2023) and REPLUG (Shi et al., 2023) are two settings of one computation:

    p(y | x) = sum over the top-k passages d of  softmax(score(d) / temperature) · p_LM(y | d ⊕ x)

In-Context RALM is ``num_documents=1`` (the weight is 1) with a new retrieval every ``retrieval_stride``
tokens, queried by the last ``query_length`` tokens; REPLUG is ``num_documents=k`` ensembled in
probability space.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass
class RetrievalSettings:
    """Validated retrieval settings shared by perplexity evaluation and generation.

    Args:
        num_documents: passages per retrieval (1 = In-Context RALM; k > 1 = the REPLUG ensemble).
        retrieval_stride: tokens between retrievals; ``None`` retrieves once, from the prompt.
        query_length: the last this many tokens (decoded to text) are the query.
        temperature: REPLUG weights are ``softmax(score / temperature)`` over the retrieved passages.
        max_document_tokens: a passage is cut from the left to this many LM tokens.

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

    num_documents: int = 1
    retrieval_stride: int | None = 4
    query_length: int = 32
    temperature: float = 1.0
    max_document_tokens: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.num_documents, int) or self.num_documents < 1:
            raise ValueError(f"num_documents={self.num_documents!r} must be a positive integer (e.g. 4).")
        if self.retrieval_stride is not None and self.retrieval_stride < 1:
            raise ValueError(
                f"retrieval_stride={self.retrieval_stride!r} must be >= 1 (e.g. 4), or None to retrieve once."
            )
        if self.query_length < 1:
            raise ValueError(f"query_length={self.query_length!r} must be >= 1 (e.g. 32).")
        if not self.temperature > 0:
            raise ValueError(
                f"temperature={self.temperature!r} must be > 0; it divides the retrieval scores."
            )
        if self.max_document_tokens < 1:
            raise ValueError(f"max_document_tokens={self.max_document_tokens!r} must be >= 1 (e.g. 256).")

    def to_dict(self) -> dict:
        return asdict(self)


def document_log_weights(scores: np.ndarray, doc_ids: np.ndarray, temperature: float) -> torch.Tensor:
    """``log softmax(score / temperature)`` over the passages found in each row, ``-inf`` where none
    (``doc_id == -1``); a row with no passage at all is all ``-inf``."""
    logits = torch.as_tensor(np.asarray(scores, dtype=np.float64)) / temperature
    logits = logits.masked_fill(torch.as_tensor(np.asarray(doc_ids) < 0), -math.inf)
    return torch.nan_to_num(torch.log_softmax(logits, dim=-1), nan=-math.inf).float()


__all__ = ["RetrievalSettings", "document_log_weights"]
