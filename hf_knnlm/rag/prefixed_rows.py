"""The passage-prefixed rows of a retrieval perplexity evaluation: which forward passes score which strides.

A window's targets are cut into strides (blocks of ``retrieval_stride`` tokens); a stride that retrieved
passage ``d`` is scored by ``d ⊕ tokens[window.begin:end]``. Within one window every stride's input with
passage ``d`` is a prefix of the next such stride's (same passage tokens, same context start, more
tokens), so all of them are scored from **one** row: each stride after the first extends the (passage +
context) of the earlier one by its own tokens instead of recomputing it (a *stride hit*). Across windows
the prefix never holds: each window's context starts later (the sliding window drops its oldest tokens),
so a window's first stride with a passage starts a new row.

Rows run in one of two ways, with the same log-probs (to float rounding):

- ``reuse_cache=True`` (when the model allows it): the passage's keys and values come from a
  [`PassageKV`][hf_knnlm.rag.passage_cache.PassageKV] cache (computed once per passage, see
  ``passage_cache``), the row's context extends them, right-padded in a batch of rows of several windows,
  and only the scored positions go through the LM head.
- ``reuse_cache=False``: the whole ``d ⊕ context`` of every row, left-padded, with the logits of its
  last positions (the path before the cache).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..knnlm.settings import KNNSettings
from ..lm.caches import cache_kwargs
from ..lm.hooks import FFNInputCapture
from ..lm.log_probs import HeadCapture, scored_log_probs
from ..lm.windows import Window, WindowSettings
from .passage_cache import PassageKV, supports
from .prefix import DocumentTokens, last_log_probs, left_pad, pad_token_id
from .settings import RetrievalSettings


@dataclass
class Row:
    """One document-prefixed forward pass: passage ``doc`` before ``tokens[window.begin:end]``."""

    window: Window
    doc: int
    end: int
    first_target: int
    uses: list[tuple[int, int]]  # (block, slot) pairs scored from this row


@dataclass
class Plan:
    """The scored tokens, their windows and strides (``blocks``: (window, first target, end)), settings."""

    tokens: np.ndarray
    windows: list[Window]
    window_settings: WindowSettings
    retrieval: RetrievalSettings
    knn: KNNSettings | None
    document_budget: int
    blocks: list[tuple[int, int, int]] = field(default_factory=list)


@dataclass
class Prefixed:
    """What the document-prefixed rows gave: per block and slot the targets' log-probs, and kNN queries."""

    log_probs: torch.Tensor  # [blocks, slots, width]
    queries: torch.Tensor | None  # [blocks, width, d] FFN inputs of the prefixed pass (with a datastore)
    forward_tokens: int = 0
    padded_tokens: int = 0
    stride_hit_rate: float = 0.0
    passage_hit_rate: float = 0.0
    reused_cache: bool = False
    context_tokens: int = 0  # the rows' contexts: what runs through the model with every passage cached


def blocks_of(windows: list[Window], stride: int | None) -> list[tuple[int, int, int]]:
    """(window, first target, end) of every retrieval block, in corpus order."""
    blocks = []
    for w_index, w in enumerate(windows):
        step = stride or (w.end - w.first_target)
        for start in range(w.first_target, w.end, step):
            blocks.append((w_index, start, min(start + step, w.end)))
    return blocks


def extends(row: Row, window: Window, doc: int) -> bool:
    """Whether a stride of ``window`` that read ``doc`` is scored by extending ``row``: its input would be
    exactly the row's cached tokens followed by its own. True iff the passage is the same (one
    ``DocumentTokens`` cuts it the same way for every row) and the context starts at the same token, which
    within an evaluation means the same window (windows start at distinct tokens)."""
    return row.doc == doc and row.window.begin == window.begin


def plan_rows(windows: list[Window], blocks, doc_ids: np.ndarray) -> list[Row]:
    """One row per (window, passage): its first stride opens it, every later one extends it."""
    rows: list[Row] = []
    open_rows: dict[int, Row] = {}  # passage -> the row a stride of the current window may extend
    for b, (w_index, start, end) in enumerate(blocks):
        if b and blocks[b - 1][0] != w_index:
            open_rows = {}  # blocks come window by window: no row of an earlier window is extended
        for slot, doc in enumerate(doc_ids[b].tolist()):
            if doc < 0:
                continue
            row = open_rows.get(doc)
            if row is None or not extends(row, windows[w_index], doc):
                row = open_rows[doc] = Row(windows[w_index], doc, end, start, [])
                rows.append(row)
            row.end = max(row.end, end)
            row.uses.append((b, slot))
    return rows


def stride_hit_rate(rows: list[Row]) -> float:
    """Strides (passage slots) served by extending an earlier stride's row, of all that read a passage."""
    uses = sum(len(r.uses) for r in rows)
    return (uses - len(rows)) / uses if uses else 0.0


def run_rows(
    model, tokenizer, retriever, plan: Plan, doc_ids, datastore, row_batch_size, progress
) -> Prefixed:
    """Every (window, passage) row through the model once, longest first, ``row_batch_size`` at a time."""
    width = max(end - start for _, start, end in plan.blocks)
    out = Prefixed(torch.full((len(plan.blocks), plan.retrieval.num_documents, width), -math.inf), None)
    doc_tokens = DocumentTokens(tokenizer, retriever, plan.document_budget)
    # Longest first, so that a batch holds rows of about one length (padding is compute thrown away: ~15%
    # of the tokens on Tiny Shakespeare in corpus order) and an out-of-memory shows in the first batch.
    rows = sorted(
        plan_rows(plan.windows, plan.blocks, doc_ids),
        key=lambda r: -(len(doc_tokens(r.doc)) + r.end - r.window.begin),
    )
    out.stride_hit_rate = stride_hit_rate(rows)
    out.context_tokens = sum(r.end - 1 - r.window.begin for r in rows)
    runner = _Runner(model, plan, doc_tokens, pad_token_id(tokenizer), next(model.parameters()).device, out)
    if datastore is not None:
        runner.capture = FFNInputCapture(model, datastore.config.hook_module)
    if plan.retrieval.reuse_cache and supports(model):
        runner.head = HeadCapture(model)
        runner.passages = PassageKV(runner.head, Counter(r.doc for r in rows), runner.pad_id)
    try:
        for first in tqdm(
            range(0, len(rows), row_batch_size), desc="prefixed rows", unit="batch", disable=progress
        ):
            runner.run(rows[first : first + row_batch_size])
    finally:
        runner.remove()
    return runner.finish()


@dataclass
class _Runner:
    """Runs batches of rows into ``out``; ``head`` and ``passages`` only when the cache is used."""

    model: torch.nn.Module
    plan: Plan
    doc_tokens: DocumentTokens
    pad_id: int
    device: torch.device
    out: Prefixed
    capture: FFNInputCapture | None = None
    head: HeadCapture | None = None
    passages: PassageKV | None = None

    @torch.no_grad()
    def run(self, chunk: list[Row]) -> None:
        if self.head is not None and self._head_is_exact(chunk[0]):
            self.cached(chunk)
            return
        if self.head is not None:
            self.head.use_full_forward()  # the head's hook must not stop the model's own forward
        self.full(chunk)

    def _head_is_exact(self, row: Row) -> bool:
        """The LM head applied to its input gives the model's logits (checked once per model)."""
        if self.head.usable:
            ids = self._tensor(self.plan.tokens[row.window.begin : row.end])[None]
            self.head.check(ids, torch.ones_like(ids))
        return self.head.usable

    def full(self, chunk: list[Row]) -> None:
        """Rows recomputed whole: ``d ⊕ context`` left-padded, the logits of the last positions."""
        plan, out = self.plan, self.out
        sequences = [self.doc_tokens(r.doc) + plan.tokens[r.window.begin : r.end].tolist() for r in chunk]
        out.forward_tokens += sum(len(s) for s in sequences)
        out.padded_tokens += len(sequences) * max(len(s) for s in sequences)
        keep = max(r.end - r.first_target + 1 for r in chunk)
        log_probs, _ = last_log_probs(
            self.model, left_pad(sequences, self.pad_id, self.device), keep, use_cache=False
        )
        hidden = self.capture.hidden_states(len(chunk))[:, -keep:] if self.capture is not None else None
        for r, row in enumerate(chunk):
            for b, slot in row.uses:
                _, start, end = plan.blocks[b]
                positions = (keep - 1 - (row.end - torch.arange(start, end))).to(log_probs.device)
                targets = self._tensor(plan.tokens[start:end])
                picked = log_probs[r, positions].gather(-1, targets[:, None]).squeeze(-1)
                out.log_probs[b, slot, : end - start] = picked.cpu()
                if hidden is not None:
                    self._store_queries(b, hidden[r, positions])

    def cached(self, chunk: list[Row]) -> None:
        """Rows whose passage KV (from ``passages``) is extended by their context, right-padded (each
        row's passage ends at its own position); the LM head only at the scored positions."""
        plan = self.plan
        docs = [r.doc for r in chunk]
        cache, passage_mask = self.passages.prefix(docs, [self.doc_tokens(d) for d in docs], self.device)
        # A row's last token would predict past its last target: no row needs it as input.
        contexts = [plan.tokens[r.window.begin : r.end - 1] for r in chunk]
        width = max(len(c) for c in contexts)
        ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
        context_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, context in enumerate(contexts):
            ids[r, : len(context)] = torch.from_numpy(context.astype("int64"))
            context_mask[r, : len(context)] = 1
        self.out.forward_tokens += sum(len(c) for c in contexts)
        self.out.padded_tokens += ids.numel()
        positions = passage_mask.sum(-1, keepdim=True) + torch.arange(width, device=self.device)
        extra = cache_kwargs(self.model, cache) | {"use_cache": True} if cache is not None else {}
        mask = torch.cat([passage_mask, context_mask.to(self.device)], dim=1)
        hidden = self.head.forward(ids.to(self.device), mask, position_ids=positions, **extra)
        self._score_positions(chunk, hidden)

    def _score_positions(self, chunk: list[Row], hidden: torch.Tensor) -> None:
        """log p(target) of every use of every row, from the head's inputs at those positions only."""
        plan, rows, positions, spans = self.plan, [], [], []
        for r, row in enumerate(chunk):
            for b, slot in row.uses:
                _, start, end = plan.blocks[b]
                rows.append(torch.full((end - start,), r))
                positions.append(torch.arange(start - 1, end - 1) - row.window.begin)
                spans.append((b, slot, start, end))
        rows, positions = torch.cat(rows).to(self.device), torch.cat(positions).to(self.device)
        targets = self._tensor(np.concatenate([plan.tokens[start:end] for _, _, start, end in spans]))
        picked, _ = scored_log_probs(self.head.head, hidden[rows, positions], targets)
        queries = (
            self.capture.hidden_states(len(chunk))[rows, positions] if self.capture is not None else None
        )
        at = 0
        for b, slot, start, end in spans:
            self.out.log_probs[b, slot, : end - start] = picked[at : at + end - start].cpu()
            if queries is not None:
                self._store_queries(b, queries[at : at + end - start])
            at += end - start

    def _tensor(self, values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(values).astype("int64")).to(self.device)

    def _store_queries(self, block: int, hidden: torch.Tensor) -> None:
        out = self.out
        if out.queries is None:
            out.queries = torch.zeros(len(self.plan.blocks), out.log_probs.shape[-1], hidden.shape[-1])
        out.queries[block, : len(hidden)] = hidden.float().cpu()

    def remove(self) -> None:
        for hook in (self.capture, self.head):
            if hook is not None:
                hook.remove()

    def finish(self) -> Prefixed:
        passages, out = self.passages, self.out
        if passages is not None and passages.hits + passages.misses:
            out.passage_hit_rate, out.reused_cache = passages.hit_rate, True
            out.forward_tokens += passages.forward_tokens
            out.padded_tokens += passages.padded_tokens
        return out


__all__ = ["Plan", "Prefixed", "Row", "blocks_of", "extends", "plan_rows", "run_rows", "stride_hit_rate"]
