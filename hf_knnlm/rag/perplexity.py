"""Perplexity of In-Context RALM and REPLUG over the same sliding windows as ``evaluate_perplexity``.

The text is cut into the windows of [`evaluate_perplexity`][hf_knnlm.evaluate_perplexity] (every token but the
first scored once, with the window's context). Each window's targets are split into blocks of
``retrieval_stride`` tokens; the ``query_length`` tokens before a block query the retriever, and each
target ``t`` of the block is scored as ``log sum_d w_d p_LM(t | d ⊕ tokens[window.begin:t])``.

A causal LM's prediction at position ``t`` depends only on what precedes it, so every block of a window
that retrieved passage ``d`` is scored from **one** forward pass over ``d ⊕ tokens[window.begin:end]``
(``end`` = the last of those blocks' ends): the result is the same as one pass per block, at a fraction of
the cost. Blocks that retrieved nothing keep the base model's log-probs from the plain window pass, so an
empty retriever gives the base model's perplexity exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..datastore.datastore import Datastore
from ..knnlm.evaluation import collect_queries, iter_scored_batches, mixed_target_log_probs, scored_tokens
from ..knnlm.mixture import KNNSettings, interpolate, knn_target_log_probs
from ..lm.corpus import CorpusLike
from ..lm.hooks import FFNInputCapture
from ..lm.windows import Window, sliding_windows
from ..retrieval.retriever import Retriever
from .prefix import DocumentTokens, last_log_probs, left_pad, max_positions, pad_token_id
from .settings import RetrievalSettings, document_log_weights

_SEARCH_CHUNK = 1024


@dataclass
class _Row:
    """One document-prefixed forward pass: passage ``doc`` before ``tokens[window.begin:end]``."""

    window: Window
    doc: int
    end: int
    first_target: int
    uses: list[tuple[int, int]]  # (block, slot) pairs scored from this row


def _blocks(windows: list[Window], stride: int | None) -> list[tuple[int, int, int]]:
    """(window, first target, end) of every retrieval block, in corpus order."""
    blocks = []
    for w_index, w in enumerate(windows):
        step = stride or (w.end - w.first_target)
        for start in range(w.first_target, w.end, step):
            blocks.append((w_index, start, min(start + step, w.end)))
    return blocks


def _search(retriever: Retriever, queries: list[str], k: int) -> tuple:
    import numpy as np

    parts = [
        retriever.search(queries[i : i + _SEARCH_CHUNK], k) for i in range(0, len(queries), _SEARCH_CHUNK)
    ]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _rows(windows, blocks, doc_ids) -> list[_Row]:
    rows: dict[tuple[int, int], _Row] = {}
    for b, (w_index, start, end) in enumerate(blocks):
        for slot, doc in enumerate(doc_ids[b].tolist()):
            if doc < 0:
                continue
            row = rows.get((w_index, doc))
            if row is None:
                rows[(w_index, doc)] = row = _Row(windows[w_index], doc, end, start, [])
            row.end = max(row.end, end)
            row.uses.append((b, slot))
    return list(rows.values())


def evaluate_retrieval_perplexity(
    model: torch.nn.Module,
    tokenizer,
    data: CorpusLike,
    retriever: Retriever,
    *,
    num_documents: int = 1,
    retrieval_stride: int | None = 4,
    query_length: int = 32,
    temperature: float = 1.0,
    max_document_tokens: int = 256,
    datastore: Datastore | None = None,
    k: int = 1024,
    lmbda: float = 0.25,
    knn_temperature: float = 1.0,
    max_length: int = 1024,
    stride: int = 512,
    batch_size: int = 8,
    row_batch_size: int = 4,
    text_column: str = "text",
    max_tokens: int | None = None,
    disable_progress: bool | None = None,
) -> dict:
    """Sliding-window perplexity of the base LM and of In-Context RALM (``num_documents=1``) or REPLUG
    (``num_documents=k``); with a ``datastore`` (In-Context RALM only) also of the kNN-LM alone and of the
    kNN-LM mixed into In-Context RALM (its queries come from the document-prefixed pass).

    Args:
        retriever: any object with ``search(queries, k) -> (scores, doc_ids)``, ``titles`` and ``texts``.
        num_documents, retrieval_stride, query_length, temperature, max_document_tokens: see
            [`RetrievalSettings`][hf_knnlm.rag.RetrievalSettings].
        datastore, k, lmbda, knn_temperature: the kNN-LM, as in ``evaluate_perplexity``.
        max_length, stride, batch_size, text_column, max_tokens: the windows, as in ``evaluate_perplexity``.
        row_batch_size: document-prefixed rows per forward pass.

    Returns:
        `dict` with ``base_ppl``, ``ppl``, ``knn_ppl`` and ``knn_ralm_ppl`` (None without a datastore),
        ``num_tokens``, ``retrieved_fraction`` (targets scored with at least one passage), ``forward_tokens``
        (tokens through the model in prefixed rows), ``padded_tokens`` (the same with the left padding of
        batched rows), ``times`` (seconds: ``base_s`` the plain window pass,
        ``retrieval_s``, ``prefixed_s`` the document-prefixed passes, ``knn_s`` the datastore searches) and
        ``settings``.

    Examples:

    ```python
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config
    >>> tokenizer = AutoTokenizer.from_pretrained("gpt2")
    >>> model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2))  # any causal LM
    >>> from hf_knnlm.rag import BM25Retriever, evaluate_retrieval_perplexity
    >>> text = "The cat sat on the mat. The dog ran in the park. " * 4
    >>> bm25 = BM25Retriever.build([{"text": "The cat sat on the mat."}, {"text": "The dog ran."}])
    >>> result = evaluate_retrieval_perplexity(model, tokenizer, [text], bm25, retrieval_stride=4,
    ...                                        query_length=8, max_length=32, stride=16,
    ...                                        disable_progress=True)
    >>> result["num_tokens"], round(result["retrieved_fraction"], 2)  # targets that read a passage
    (56, 0.93)
    >>> result["ppl"] != result["base_ppl"], result["knn_ppl"]  # In-Context RALM vs the LM; no datastore
    (True, None)
    ```
    """
    settings = RetrievalSettings(
        num_documents, retrieval_stride, query_length, temperature, max_document_tokens
    )
    if datastore is not None and num_documents != 1:
        raise ValueError(
            f"a datastore mixes kNN-LM into In-Context RALM, which reads one passage; got "
            f"num_documents={num_documents}. Pass num_documents=1 or drop the datastore."
        )
    # A passage is cut from the left so that passage + window fits the model.
    document_budget = min(max_document_tokens, max_positions(model) - max_length)
    if document_budget < 1:
        raise ValueError(
            f"max_length={max_length} leaves no room for a passage in the {max_positions(model)} positions "
            "the model takes; lower max_length."
        )
    knn = KNNSettings(k=k, lmbda=lmbda, temperature=knn_temperature) if datastore is not None else None
    tokens = scored_tokens(model, tokenizer, data, datastore, text_column, max_tokens)
    if knn is not None:
        knn.k = datastore.clamp_k(k)
    windows = list(sliding_windows(len(tokens), max_length, stride))
    times = {}

    started = time.perf_counter()
    windowing = dict(
        max_length=max_length, stride=stride, batch_size=batch_size, disable_progress=disable_progress
    )
    if knn is None:
        base = torch.cat([b.lm_log_probs for b in iter_scored_batches(model, tokens, None, k=1, **windowing)])
        knn_only = base
    else:  # queries kept, so that the LM time and the kNN search time are measured apart
        cached = collect_queries(
            model, tokenizer, data, datastore, text_column=text_column, max_tokens=max_tokens, **windowing
        )
        base = cached.lm_log_probs
    times["base_s"] = time.perf_counter() - started
    if knn is not None:
        started = time.perf_counter()
        knn_only = mixed_target_log_probs(cached.search(datastore, knn.k), knn.lmbda, knn.temperature)
        times["knn_s"] = time.perf_counter() - started

    started = time.perf_counter()
    blocks = _blocks(windows, settings.retrieval_stride)
    queries = [tokenizer.decode(tokens[max(0, s - settings.query_length) : s].tolist()) for _, s, _ in blocks]
    scores, doc_ids = _search(retriever, queries, settings.num_documents)
    log_weights = document_log_weights(scores, doc_ids, settings.temperature)
    times["retrieval_s"] = time.perf_counter() - started

    started = time.perf_counter()
    width = max(end - start for _, start, end in blocks)
    doc_log_probs = torch.full((len(blocks), settings.num_documents, width), -math.inf)
    knn_queries = torch.zeros(len(blocks), width, 0)
    doc_tokens = DocumentTokens(tokenizer, retriever, document_budget)
    # Longest first, so that a batch holds rows of about one length (padding is compute thrown away: ~15%
    # of the tokens on Tiny Shakespeare in corpus order) and an out-of-memory shows in the first batch.
    rows = sorted(
        _rows(windows, blocks, doc_ids), key=lambda r: -(len(doc_tokens(r.doc)) + r.end - r.window.begin)
    )
    forward_tokens = padded_tokens = 0
    device = next(model.parameters()).device
    capture = FFNInputCapture(model, datastore.config.hook_module) if datastore is not None else None
    try:
        for first in tqdm(
            range(0, len(rows), row_batch_size), desc="prefixed rows", unit="batch", disable=disable_progress
        ):
            chunk = rows[first : first + row_batch_size]
            sequences = [doc_tokens(r.doc) + tokens[r.window.begin : r.end].tolist() for r in chunk]
            forward_tokens += sum(len(s) for s in sequences)
            padded_tokens += len(sequences) * max(len(s) for s in sequences)
            keep = max(r.end - r.first_target + 1 for r in chunk)
            padded = left_pad(sequences, pad_token_id(tokenizer), device)
            log_probs, _ = last_log_probs(model, padded, keep, use_cache=False)
            hidden = capture.hidden_states(len(chunk))[:, -keep:] if capture is not None else None
            if hidden is not None and knn_queries.shape[-1] == 0:
                knn_queries = torch.zeros(len(blocks), width, hidden.shape[-1])
            for r, row in enumerate(chunk):
                for b, slot in row.uses:
                    _, start, end = blocks[b]
                    at = torch.arange(start, end)
                    positions = keep - 1 - (row.end - at)
                    targets = torch.from_numpy(tokens[start:end].astype("int64")).to(device)
                    picked = log_probs[r, positions.to(device)].gather(-1, targets[:, None]).squeeze(-1)
                    doc_log_probs[b, slot, : end - start] = picked.cpu()
                    if hidden is not None:
                        knn_queries[b, : end - start] = hidden[r, positions.to(device)].float().cpu()
    finally:
        if capture is not None:
            capture.remove()

    mixed, combined = base.clone(), knn_only.clone()
    found = (doc_ids >= 0).any(axis=1)
    for b in found.nonzero()[0].tolist():
        _, start, end = blocks[b]
        mix = torch.logsumexp(log_weights[b, :, None] + doc_log_probs[b, :, : end - start], dim=0)
        mixed[start - 1 : end - 1] = mix
    times["prefixed_s"] = time.perf_counter() - started
    if knn is not None and found.any():
        started = time.perf_counter()
        combined = _mix_knn(datastore, knn, blocks, found, knn_queries, mixed, combined, tokens)
        times["knn_s"] += time.perf_counter() - started

    scored = sum(end - start for b, (_, start, end) in enumerate(blocks) if found[b])
    count = len(base)
    return {
        "base_ppl": math.exp(-base.double().sum().item() / count),
        "ppl": math.exp(-mixed.double().sum().item() / count),
        "knn_ppl": math.exp(-knn_only.double().sum().item() / count) if knn else None,
        "knn_ralm_ppl": math.exp(-combined.double().sum().item() / count) if knn else None,
        "num_tokens": count,
        "retrieved_fraction": scored / count,
        "forward_tokens": forward_tokens,
        "padded_tokens": padded_tokens,
        "base_forward_tokens": sum(w.end - w.begin for w in windows),
        "times": {name: round(value, 3) for name, value in times.items()},
        "settings": settings.to_dict(),
    }


def _mix_knn(datastore, knn, blocks, found, knn_queries, mixed, combined, tokens) -> torch.Tensor:
    """log(λ p_kNN + (1 - λ) p_RALM) for the targets of blocks that read a passage."""
    picks = [(b, start, end) for b, (_, start, end) in enumerate(blocks) if found[b]]
    queries = torch.cat([knn_queries[b, : end - start] for b, start, end in picks])
    positions = torch.cat([torch.arange(start, end) for _, start, end in picks])
    targets = torch.from_numpy(tokens[positions.numpy()].astype("int64"))
    distances, neighbours = datastore.search(queries, knn.k, knn.recompute_dists)
    knn_log_probs = knn_target_log_probs(distances.cpu(), neighbours.cpu(), targets, knn.temperature)
    combined = combined.clone()
    combined[positions - 1] = interpolate(mixed[positions - 1], knn_log_probs, knn.lmbda)
    return combined


__all__ = ["evaluate_retrieval_perplexity"]
