"""The one contract every document retriever follows, and the passages it returns.

``retriever.search(queries, k) -> (scores, doc_ids)``: ``queries`` is a list of strings, ``scores`` a
float32 array ``[len(queries), k]`` (higher is better) and ``doc_ids`` an int64 array of the same shape
holding positions in the retriever's collection (``retriever.titles[i]``, ``retriever.texts[i]``),
``-1`` where fewer than ``k`` documents match. [`BM25Retriever`][hf_knnlm.retrieval.BM25Retriever] and
[`DenseRetriever`][hf_knnlm.retrieval.DenseRetriever] both follow it, so the retrieval-augmented LMs of this
package take either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..utils.checks import check_positive_int, is_int


@runtime_checkable
class Retriever(Protocol):
    """What In-Context RALM, REPLUG and FLARE need from a document retriever.

    Examples:

    ```python
    >>> import numpy as np
    >>> from hf_knnlm.retrieval import BM25Retriever, Retriever
    >>> isinstance(BM25Retriever.build([{"text": "The cat sat."}]), Retriever)
    True
    >>> class Fixed:  # any collection with search(queries, k) -> (scores, doc_ids) fits
    ...     titles, texts = ["", ""], ["The cat sat.", "Dogs bark."]
    ...     def __len__(self):
    ...         return 2
    ...     def search(self, queries, k):
    ...         return np.ones((len(queries), k), np.float32), np.zeros((len(queries), k), np.int64)
    >>> isinstance(Fixed(), Retriever)
    True
    ```
    """

    titles: Sequence[str]
    texts: Sequence[str]

    def __len__(self) -> int: ...

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]: ...


def check_search_args(queries: Sequence[str], k: int, num_documents: int) -> list[str]:
    """Validate ``k`` and turn ``queries`` into a list of strings (one string is one query)."""
    if isinstance(queries, str):
        queries = [queries]
    if not is_int(k) or k < 1 or k > num_documents:
        raise ValueError(
            f"k={k!r} but the collection holds {num_documents} documents; use 1 <= k <= {num_documents}."
        )
    if not all(isinstance(q, str) for q in queries):
        raise ValueError(
            "queries must be strings (one per row); the retriever embeds or tokenizes them itself."
        )
    return list(queries)


def check_num_documents(name: str, value: Any, retriever: Retriever) -> None:
    """``value`` passages per search (``name`` as the caller spells it: ``num_documents``, ``k``) is a
    positive integer the retriever's collection can give."""
    check_positive_int(name, value, "passages per search")
    if value > len(retriever):
        raise ValueError(
            f"{name}={value} but the retriever holds {len(retriever)} documents; use 1 <= {name} <= "
            f"{len(retriever)}."
        )


def document_text(title: str, text: str) -> str:
    """How a retrieved passage is shown to the LM: its title on a line of its own, then the text."""
    return f"{title}\n{text}\n\n" if title else f"{text}\n\n"


def check_collection(ids: Sequence[str], texts: Sequence[str], titles: Sequence[str]) -> None:
    if not texts:
        raise ValueError("the document collection is empty; pass at least one document.")
    if not len(ids) == len(texts) == len(titles):
        raise ValueError(f"{len(ids)} ids, {len(titles)} titles and {len(texts)} texts; pass one each.")
    if len(set(ids)) != len(ids):
        raise ValueError("document ids must be unique; drop the duplicates or leave 'id' out to number them.")
