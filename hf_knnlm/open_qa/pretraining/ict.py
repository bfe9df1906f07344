"""Optional warm start of REALM's retriever with ORQA's inverse cloze task (Lee et al., 2019).

REALM initialises its retriever with ICT before pre-training, because a random retriever gives the masked
LM nothing to learn from (and so receives no useful gradient). In ICT a sentence of a document is the
pseudo-question and the rest of that document (the sentence removed with probability 0.9, so that lexical
overlap alone is not enough) is its positive passage; the other passages of the batch are the negatives.
The query and document embedders train on the in-batch softmax of f(x, z).
"""

from __future__ import annotations

import random
from typing import Any

import torch

from ...retrieval.document_index import DocumentIndex
from ...retrieval.documents import rows_of
from ...retrieval.embedder import retriever_tokenizer
from .spans import split_sentences
from .warm_start import warm_start_steps


def ict_pairs(
    documents: Any, *, remove_probability: float = 0.9, min_sentence_words: int = 5, seed: int = 0
) -> list[dict[str, str]]:
    """One (sentence, title, rest of the document) pair per document with at least two sentences.

    Examples:

    ```python
    >>> from hf_knnlm.open_qa.pretraining.ict import ict_pairs
    >>> docs = [{"title": "France", "text": "Paris is the capital of France. It lies on the river Seine."}]
    >>> pair = ict_pairs(docs, remove_probability=1.0, min_sentence_words=3)[0]
    >>> pair["query"] in docs[0]["text"] and pair["query"] not in pair["text"]
    True
    ```
    """
    if isinstance(documents, DocumentIndex):
        titles, texts = documents.titles, documents.texts
    else:
        _, titles, texts = rows_of(documents)
    pairs = []
    for position, (title, text) in enumerate(zip(titles, texts, strict=True)):
        sentences = [(s, e) for s, e in split_sentences(text) if len(text[s:e].split()) >= min_sentence_words]
        if len(split_sentences(text)) < 2 or not sentences:
            continue
        rng = random.Random(f"{seed}:{position}")
        start, end = rng.choice(sentences)
        keep = rng.random() >= remove_probability
        rest = text if keep else (text[:start] + text[end:]).strip()
        pairs.append({"query": text[start:end], "title": title, "text": rest})
    return pairs


def ict_loss(model: Any, tokenizer: Any, pairs: list[dict[str, str]]) -> torch.Tensor:
    """In-batch cross-entropy of the queries against their passages (the others are negatives).

    Examples:

    ```python
    >>> from hf_knnlm.open_qa.pretraining.testing import tiny_realm_mlm
    >>> model, tokenizer, _ = tiny_realm_mlm()
    >>> from hf_knnlm.open_qa.pretraining.ict import ict_loss
    >>> pairs = [{"query": "paris", "title": "france", "text": "paris is the capital of france"},
    ...          {"query": "rome", "title": "italy", "text": "rome is the capital of italy"}]
    >>> ict_loss(model, tokenizer, pairs).shape  # mean over the 2 queries
    torch.Size([])
    ```
    """
    tokenizer = retriever_tokenizer(tokenizer)
    device = next(model.parameters()).device
    config = model.config
    queries = tokenizer(
        [p["query"] for p in pairs],
        truncation=True,
        max_length=config.max_question_length,
        padding=True,
        return_tensors="pt",
    ).to(device)
    passages = tokenizer(
        [p["title"] for p in pairs],
        [p["text"] for p in pairs],
        truncation="only_second",
        max_length=config.max_doc_embed_length,
        padding=True,
        return_tensors="pt",
    ).to(device)
    query = model.query_embedder(queries["input_ids"], queries["attention_mask"])
    passage = model.document_embedder(passages["input_ids"], passages["attention_mask"])
    logits = (query @ passage.T).float() * config.retriever_score_scale
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(pairs), device=device))


def ict_warm_start(
    model: Any,
    tokenizer: Any,
    documents: Any,
    *,
    steps: int = 100,
    batch_size: int = 16,
    learning_rate: float = 1e-4,
    remove_probability: float = 0.9,
    min_sentence_words: int = 5,
    seed: int = 0,
) -> list[float]:
    """Train ``model``'s query and document embedders in place with ICT on ``documents`` (a
    [`DocumentIndex`][hf_knnlm.retrieval.DocumentIndex] or rows with ``title`` / ``text``) for ``steps`` AdamW
    steps of ``batch_size`` pairs; returns the loss of every step. Sentences shorter than
    ``min_sentence_words`` are never queries. Rebuild the index afterwards.

    Examples:

    ```python
    >>> import torch
    >>> from transformers import BertConfig, BertTokenizerFast
    >>> from hf_knnlm.open_qa.pretraining import RealmForMaskedLM, RealmMaskedLMConfig, ict_warm_start
    >>> words = "[PAD] [UNK] [CLS] [SEP] [MASK] paris rome is in on the seine tiber france italy .".split()
    >>> tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(words)}, do_lower_case=True)
    >>> encoder = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1,
    ...                      num_attention_heads=2, intermediate_size=64)
    >>> _ = torch.manual_seed(0)
    >>> model = RealmForMaskedLM(RealmMaskedLMConfig(encoder_config=encoder.to_dict()))
    >>> docs = [{"title": "France", "text": "Paris is in France. Paris is on the Seine."},
    ...         {"title": "Italy", "text": "Rome is in Italy. Rome is on the Tiber."}]
    >>> losses = ict_warm_start(model, tokenizer, docs, steps=20, batch_size=2, learning_rate=1e-2,
    ...                         min_sentence_words=3)
    >>> len(losses), losses[-1] < losses[0]
    (20, True)
    ```
    """
    pairs = ict_pairs(
        documents, remove_probability=remove_probability, min_sentence_words=min_sentence_words, seed=seed
    )
    if len(pairs) < 2:
        raise ValueError(
            f"ICT needs at least 2 documents of two or more sentences (in-batch negatives); got {len(pairs)}."
        )
    embedders = [model.query_embedder] + ([model.doc_embedder] if model.doc_embedder is not None else [])
    parameters = [p for embedder in embedders for p in embedder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate)
    return warm_start_steps(
        model, optimizer, pairs, lambda batch: ict_loss(model, tokenizer, batch), steps=steps,
        batch_size=batch_size, seed=seed,
    )  # fmt: skip


__all__ = ["ict_loss", "ict_pairs", "ict_warm_start"]
