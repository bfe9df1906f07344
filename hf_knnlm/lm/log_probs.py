"""log p_LM(target) at the scored positions of a batch, without its ``[windows x positions x vocab]`` logits.

A causal LM's forward returns the logits of every position: for a 49k-word vocabulary and 1024-token
windows that is 200 MB a window in float32, and its log-softmax as much again, so a batch of 8
windows held 3-4 GB for a 135M model. Here the forward stops at the input of the output embeddings
(the LM head); the head is applied to the scored positions only, a chunk of rows at a time.

A model whose logits are not its head's output (a final soft-cap, a scale, a bias added in its
``forward``) would be scored wrongly that way, so the first batch of every model is also scored by the
model's own forward and compared; a model that differs keeps the full forward, with a warning.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable

import torch
from torch import nn

from .hooks import FFNInputCapture, StopForward

logger = logging.getLogger(__name__)

# [256 x vocab] float32 logits at a time: 50 MB for a 49k vocabulary, above the 32 MB up to which glibc may
# serve blocks from its heap (where freed ones fragment it); 512 rows held 0.06-0.08 GB more at the peak of
# an evaluate run (5k and 50k tokens, bench/peak_memory.py).
_ROWS_PER_CHUNK = 256
# LM features (a gate's entropy, top log-probs) make a few more [rows x vocab] temporaries: fewer rows.
_ROWS_PER_FEATURE_CHUNK = 128
_TOLERANCE = 1e-4
_CHECK_POSITIONS = 32
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the head path is exact


def head_path(model: nn.Module) -> str | None:
    """The module path of ``model``'s output embeddings (its LM head), or None if it has none."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((name for name, module in model.named_modules() if module is head), None)


def scored_log_probs(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    lm_features: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(log p(target) [n], lm_features(log p) [n, F] or None)`` from the head's inputs ``hidden`` [n, d]."""
    picked, features = [], []
    rows = _ROWS_PER_CHUNK if lm_features is None else _ROWS_PER_FEATURE_CHUNK
    for start in range(0, len(hidden), rows):
        # .forward: not through the module's hooks, whose capture would stop this call too
        logits = head.forward(hidden[start : start + rows]).float()
        log_probs = torch.log_softmax(logits, dim=-1)
        picked.append(log_probs.gather(-1, targets[start : start + rows, None]).squeeze(-1))
        if lm_features is not None:
            features.append(lm_features(log_probs))
    empty = hidden.new_zeros(0)
    return (torch.cat(picked) if picked else empty), (torch.cat(features) if features else None)


class HeadCapture:
    """The LM head's input of a forward pass, the forward stopped there (see the module docstring).

    Args:
        model (`nn.Module`): a causal LM; ``usable`` is False when it has no output embeddings.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        path = head_path(model)
        self.head = model.get_submodule(path) if path else None
        self.capture = FFNInputCapture(model, path, stop_forward=True) if path else None

    @property
    def usable(self) -> bool:
        return self.capture is not None and _CHECKED.get(self.model, True)

    def use_full_forward(self) -> None:
        """Let the forward run to the logits: no head, or logits that are more than its output."""
        if self.capture is not None:
            self.capture.stop_forward = False

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, **inputs) -> torch.Tensor:
        """The head's inputs ``[windows, positions, d]`` (the forward stops before the head); ``inputs``
        go to the model as well (e.g. ``position_ids`` and a KV cache to extend, with ``use_cache``)."""
        try:
            self.model(input_ids=ids, attention_mask=mask, **({"use_cache": False} | inputs))
        except StopForward:
            pass
        return self.capture.hidden_states(len(ids))

    def check(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Compare the head path with the model's own logits on the first window's start, once per model."""
        if self.model in _CHECKED or self.capture is None:
            return
        # The first _CHECK_POSITIONS tokens of the first window: the full logits of those only
        ids, mask = ids[:1, :_CHECK_POSITIONS], mask[:1, :_CHECK_POSITIONS]
        hidden = self.forward(ids, mask)[0]
        targets = ids[0]  # any ids: the whole distribution is compared
        self.capture.stop_forward = False
        try:
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        finally:
            self.capture.stop_forward = True
        reference = torch.log_softmax(logits[0].float(), dim=-1)
        _, ours = scored_log_probs(self.head, hidden, targets, lm_features=lambda log_probs: log_probs)
        exact = torch.allclose(ours, reference, atol=_TOLERANCE)
        _CHECKED[self.model] = exact
        if not exact:
            logger.warning(
                "%s's logits are not its LM head's output (a soft-cap or scale in its forward?): "
                "scoring keeps the full forward, which holds every position's logits.",
                type(self.model).__name__,
            )

    def remove(self) -> None:
        if self.capture is not None:
            self.capture.remove()
