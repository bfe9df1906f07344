"""A dense retriever's embedder: an encoder, a pooling, an optional projection and normalisation.

REALM's query and document embedders are two of these (``open_qa``); a sentence-embedding checkpoint
(masked mean pooling, unit vectors, no projection) is another
([`sentence_encoder`][hf_knnlm.retrieval.sentence_encoder]), used by
[`DenseRetriever`][hf_knnlm.retrieval.DenseRetriever] for the retrieval-augmented LMs.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig

POOLINGS = ("cls", "mean")


class RetrieverEmbedder(nn.Module):
    """Encoder + pooling (+ projection, + normalisation): one side of a dense retriever.

    Args:
        encoder_config (`PreTrainedConfig`): the encoder (any ``AutoModel`` config, e.g. BERT).
        pooling (`"cls"` or `"mean"`, defaults to `"cls"`): the ``[CLS]`` vector or the masked mean.
        proj_size (`int`, *optional*): width of a linear projection on the pooled vector (None: none).
        normalize (`bool`, defaults to `False`): L2-normalise the embedding.

    Examples:

    ```python
    >>> from transformers import AutoTokenizer, BertConfig
    >>> tokenizer = AutoTokenizer.from_pretrained("gpt2", pad_token="<|endoftext|>")
    >>> tiny = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
    ...                   num_attention_heads=2, intermediate_size=64)
    >>> from hf_knnlm.retrieval import RetrieverEmbedder
    >>> embedder = RetrieverEmbedder(tiny, pooling="mean", normalize=True).eval()
    >>> batch = tokenizer(["The cat sat.", "A dog ran to the park."], padding=True, return_tensors="pt")
    >>> vectors = embedder(**batch)
    >>> tuple(vectors.shape), [round(float(n), 4) for n in vectors.detach().norm(dim=-1)]  # unit vectors
    ((2, 32), [1.0, 1.0])
    ```
    """

    def __init__(
        self,
        encoder_config: PreTrainedConfig,
        pooling: Literal["cls", "mean"] = "cls",
        proj_size: int | None = None,
        normalize: bool = False,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} must be one of {POOLINGS}.")
        self.encoder = AutoModel.from_config(encoder_config)
        hidden = encoder_config.hidden_size
        self.projection = nn.Linear(hidden, proj_size) if proj_size else nn.Identity()
        self.pooling = pooling
        self.normalize = normalize

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


def sentence_encoder(name_or_path: str | os.PathLike) -> RetrieverEmbedder:
    """A sentence-embedding encoder (masked mean pooling, unit vectors, no projection) from any
    ``AutoModel`` checkpoint: e.g. all-MiniLM-L6-v2 gives the published sentence-transformers embedding.

    Examples:

    ```python
    >>> from transformers import BertModel
    >>> from hf_knnlm.retrieval import sentence_encoder
    >>> from hf_knnlm.retrieval.testing import tiny_encoder_config
    >>> tiny = BertModel(tiny_encoder_config(vocab_size=100))  # a random 1-layer BERT
    >>> tiny.save_pretrained("encoder")  # e.g. sentence-transformers/all-MiniLM-L6-v2
    >>> encoder = sentence_encoder("encoder")
    >>> encoder.pooling, encoder.normalize, encoder.name_or_path  # the sentence-transformers recipe
    ('mean', True, 'encoder')
    ```
    """
    embedder = RetrieverEmbedder(
        AutoConfig.from_pretrained(name_or_path), pooling="mean", proj_size=None, normalize=True
    )
    embedder.encoder = AutoModel.from_pretrained(name_or_path)
    embedder.name_or_path = str(name_or_path)
    return embedder.eval()


def retriever_tokenizer(tokenizer: Any) -> Any:
    """The retriever's tokenizer of ``tokenizer``: the ``retriever`` side of a tokenizer pair (REALM's
    [`RealmTokenizerPair`][hf_knnlm.open_qa.RealmTokenizerPair]), else the tokenizer itself."""
    return getattr(tokenizer, "retriever", tokenizer)


__all__ = ["RetrieverEmbedder", "retriever_tokenizer", "sentence_encoder"]
