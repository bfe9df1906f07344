"""A tiny random REALM pre-training model built in-process, for examples and tests.

The tokenizer and one-layer BERT config of [`hf_knnlm.retrieval.testing`][hf_knnlm.retrieval.testing], a
random [`RealmForMaskedLM`][hf_knnlm.open_qa.pretraining.RealmForMaskedLM] built from them and the two
documents of [`hf_knnlm.open_qa.testing`][hf_knnlm.open_qa.testing] embedded into a
[`DocumentIndex`][hf_knnlm.open_qa.DocumentIndex]: the shapes of a real run, numbers that mean nothing.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from transformers import BertTokenizerFast

from ...retrieval.document_index import DocumentIndex
from ...retrieval.testing import tiny_encoder_config, tiny_tokenizer
from ..testing import TINY_DOCUMENTS
from .configuration import RealmMaskedLMConfig
from .modeling import RealmForMaskedLM


class TinyRealmMaskedLM(NamedTuple):
    """What [`tiny_realm_mlm`][hf_knnlm.open_qa.pretraining.testing.tiny_realm_mlm] returns.

    Examples:

    ```python
    >>> from hf_knnlm.open_qa.pretraining.testing import tiny_realm_mlm
    >>> tiny_realm_mlm()._fields
    ('model', 'tokenizer', 'index')
    ```
    """

    model: RealmForMaskedLM
    tokenizer: BertTokenizerFast
    index: DocumentIndex


def tiny_realm_mlm(*, seed: int = 0, top_k: int = 1, **config_kwargs: Any) -> TinyRealmMaskedLM:
    """A random ``(model, tokenizer, index)``: the model seeded with ``seed`` (in training mode, as
    pre-training uses it), the documents ``paris`` and ``rome`` in the index. ``config_kwargs`` go to
    [`RealmMaskedLMConfig`][hf_knnlm.open_qa.pretraining.RealmMaskedLMConfig].

    Examples:

    ```python
    >>> from hf_knnlm.open_qa.pretraining.testing import tiny_realm_mlm
    >>> model, tokenizer, index = tiny_realm_mlm()
    >>> type(model).__name__, model.config.null_document, index.ids
    ('RealmForMaskedLM', True, ['paris', 'rome'])
    ```
    """
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    encoder = tiny_encoder_config(len(tokenizer)).to_dict()
    model = RealmForMaskedLM(RealmMaskedLMConfig(encoder_config=encoder, top_k=top_k, **config_kwargs))
    index = DocumentIndex.build(list(TINY_DOCUMENTS), model, tokenizer, show_progress=False)
    return TinyRealmMaskedLM(model, tokenizer, index)


__all__ = ["TinyRealmMaskedLM", "tiny_realm_mlm"]
