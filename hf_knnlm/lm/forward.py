"""Running a causal LM over sliding windows of a token stream, batched, with the FFN input captured.

Building a datastore and scoring text walk the same windows, so both read their keys/queries,
targets and (for scoring) LM log-probs from here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..utils.checks import check_positive_int, is_int
from .hooks import FFNInputCapture, StopForward
from .log_probs import HeadCapture, scored_log_probs
from .windows import Window, check_window_args


@dataclass
class WindowBatch:
    """Everything one batch of windows produced, one row per scored target, in corpus order."""

    first_window: int
    num_windows: int
    hidden: torch.Tensor  # [n, d] FFN input at the position before each target
    targets: torch.Tensor  # [n] token ids
    lm_log_probs: torch.Tensor | None  # [n] log p_LM(target), when asked for
    lm_features: torch.Tensor | None = None  # [n, F] lm_features(log p_LM over the vocabulary), if given


def pad_batch(
    tokens: np.ndarray, windows: list[Window], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``input_ids`` and ``attention_mask`` of a batch of windows, right-padded to the longest.

    What ``iter_window_batches`` feeds the model; for running the same forward passes without
    capturing anything (a benchmark's baseline: the model alone, no datastore work).

    Args:
        tokens (`np.ndarray`): the token stream the windows index, ``[n]`` integers.
        windows (`list[Window]`): windows of ``tokens`` (``sliding_windows``), at least one.
        device (`torch.device` or `str`): where the tensors go.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: ``[len(windows), width]`` token ids (0 past a window's
        end) and the mask (1 on a window's tokens).

    Examples:

    ```python
    >>> import numpy as np
    >>> from hf_knnlm.lm import pad_batch
    >>> from hf_knnlm.lm.windows import Window
    >>> tokens = np.arange(10, 17)
    >>> ids, mask = pad_batch(tokens, [Window(0, 4, 1), Window(4, 7, 4)])  # 4 and 3 tokens
    >>> ids.tolist()
    [[10, 11, 12, 13], [14, 15, 16, 0]]
    >>> mask.tolist()
    [[1, 1, 1, 1], [1, 1, 1, 0]]
    ```
    """
    width = max(w.end - w.begin for w in windows)
    ids = torch.zeros(len(windows), width, dtype=torch.long)
    mask = torch.zeros(len(windows), width, dtype=torch.long)
    for row, w in enumerate(windows):
        ids[row, : w.end - w.begin] = torch.from_numpy(tokens[w.begin : w.end].astype(np.int64))
        mask[row, : w.end - w.begin] = 1
    return ids.to(device), mask.to(device)


def _target_index(windows: list[Window]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(batch row, position of the query) for every target, and the targets' corpus positions."""
    rows, positions, corpus = [], [], []
    for row, w in enumerate(windows):
        t = np.arange(w.first_target, w.end)
        rows.append(np.full(len(t), row))
        positions.append(t - 1 - w.begin)
        corpus.append(t)
    return (
        torch.from_numpy(np.concatenate(rows)),
        torch.from_numpy(np.concatenate(positions)),
        np.concatenate(corpus),
    )


def check_forward_args(model: torch.nn.Module, max_length: int, stride: int, batch_size: int) -> None:
    """Window settings that ``model`` can run, checked before any forward pass."""
    check_window_args(max_length, stride)
    check_positive_int("batch_size", batch_size, "windows per forward pass")
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    positions = getattr(text_config, "max_position_embeddings", None)
    if is_int(positions) and max_length > positions:
        raise ValueError(
            f"max_length={max_length} is more than the {positions} positions the model has "
            f"(max_position_embeddings); use max_length <= {positions} (and a smaller stride)."
        )


@torch.no_grad()
def iter_window_batches(
    model: torch.nn.Module,
    tokens: np.ndarray,
    windows: list[Window],
    *,
    batch_size: int,
    hook_module: str | None = None,
    with_log_probs: bool = False,
    start_window: int = 0,
    desc: str = "windows",
    disable_progress: bool | None = None,
    lm_features: Callable[[torch.Tensor], torch.Tensor] | None = None,
    expected_width: int | None = None,
) -> Iterator[WindowBatch]:
    """Yield one ``WindowBatch`` per ``batch_size`` windows, starting at ``start_window``.

    ``lm_features`` (with ``with_log_probs``) maps the ``[n, V]`` LM log-probs of the scored
    positions to per-token features (e.g. entropy for a retrieval gate), kept in the batch.
    ``expected_width`` refuses a ``hook_module`` whose input has another width (see
    [`FFNInputCapture`][hf_knnlm.FFNInputCapture]).
    """
    check_positive_int("batch_size", batch_size, "windows per forward pass")
    device = next(model.parameters()).device
    todo = range(start_window, len(windows), batch_size)
    capture = FFNInputCapture(
        model, hook_module, stop_forward=not with_log_probs, expected_width=expected_width
    )
    head = HeadCapture(model) if with_log_probs else None
    try:
        for first in tqdm(todo, desc=desc, unit="batch", disable=disable_progress):
            batch = windows[first : first + batch_size]
            ids, mask = pad_batch(tokens, batch, device)
            rows, positions, corpus_positions = _target_index(batch)
            rows, positions = rows.to(device), positions.to(device)
            targets = torch.from_numpy(tokens[corpus_positions].astype(np.int64)).to(device)
            if head is not None:
                head.check(ids, mask)
            lm_log_probs, features = _forward(model, ids, mask, head, rows, positions, targets, lm_features)
            hidden = capture.hidden_states(len(batch))[rows, positions]
            yield WindowBatch(first, len(batch), hidden.float(), targets, lm_log_probs, features)
    finally:
        capture.remove()
        if head is not None:
            head.remove()


def _forward(model, ids, mask, head: HeadCapture | None, rows, positions, targets, lm_features):
    """One forward pass; with a ``head``, the targets' LM log-probs (and features) of the scored positions.

    The head path never forms the ``[windows, positions, vocab]`` logits (see ``hf_knnlm.lm.log_probs``).
    """
    if head is not None and head.usable:
        return scored_log_probs(head.head, head.forward(ids, mask)[rows, positions], targets, lm_features)
    if head is not None:
        head.use_full_forward()  # no head, or logits that are more than its output
    try:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    except StopForward:  # a build: nothing past the last FFN's input is needed
        return None, None
    if head is None:
        return None, None
    return scored_log_probs(nn.Identity(), logits[rows, positions], targets, lm_features)  # already logits
