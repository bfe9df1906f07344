"""Settings of retrieval inside attention: Unlimiformer (test-time) and Memorizing Transformers."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..lm.windows import check_window_args
from ..utils.checks import check_positive_int, is_int, is_real

# The kinds of attention long_context_perplexity (and ``hf-knnlm long-evaluate --method``) compares.
METHODS = ("window", "unlimiformer", "memorizing", "full")
SINK_TOKENS = 4  # StreamingLLM (Xiao et al. 2024): four sink tokens keep windowed attention stable


def _check_windows(max_length: Any, stride: Any) -> None:
    check_positive_int("max_length", max_length, "tokens in the local window")
    check_positive_int("stride", stride, "new tokens scored per window")
    check_window_args(max_length, stride)


@dataclass
class UnlimiformerSettings:
    """Unlimiformer (Bertsch et al. 2023) for a decoder-only model, without training.

    The input is run in sliding windows; from ``layer_begin`` on, every attention head attends over
    its window plus the ``k`` keys of the whole preceding input (before the window) that a faiss
    index of the layer's attention inputs returns for it. The first ``sink_tokens`` tokens of the
    input are attended by every query instead of being searched (the "attention sinks" that models
    put much attention on, and that a position-free search may miss); with ``k`` plus ``sink_tokens``
    at least the input length, the result is still exactly full attention.

    Examples:

    ```python
    >>> from hf_knnlm.attention import UnlimiformerSettings
    >>> UnlimiformerSettings(k=8, max_length=64, stride=32)
    UnlimiformerSettings(k=8, layer_begin=0, max_length=64, stride=32, max_memory=None, sink_tokens=4)
    >>> UnlimiformerSettings(k=0)
    Traceback (most recent call last):
    ...
    ValueError: k=0 must be a positive integer (keys retrieved per head and query).
    ```
    """

    k: int = field(default=16, metadata={"help": "Keys retrieved per head and query token."})
    layer_begin: int = field(
        default=0,
        metadata={
            "help": "First layer that retrieves (0 = every layer); earlier layers see the window only."
        },
    )
    max_length: int = field(default=512, metadata={"help": "Local window length in tokens."})
    stride: int = field(default=256, metadata={"help": "New tokens scored per window."})
    max_memory: int | None = field(
        default=None,
        metadata={"help": "Most tokens kept per layer, oldest evicted first (none = the whole input)."},
    )
    sink_tokens: int = field(
        default=SINK_TOKENS,
        metadata={
            "help": "The document's first N tokens, attended by every query besides the k retrieved "
            "(attention sinks; 0 = none)."
        },
    )

    def __post_init__(self) -> None:
        check_positive_int("k", self.k, "keys retrieved per head and query")
        if not is_int(self.sink_tokens) or self.sink_tokens < 0:
            raise ValueError(
                f"sink_tokens={self.sink_tokens!r} must be an integer >= 0 (first tokens every query sees)."
            )
        if not is_int(self.layer_begin) or self.layer_begin < 0:
            raise ValueError(
                f"layer_begin={self.layer_begin!r} must be an integer >= 0 (the first retrieving layer)."
            )
        _check_windows(self.max_length, self.stride)
        if self.max_memory is not None:
            check_positive_int("max_memory", self.max_memory, "tokens kept per layer; none for no bound")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class MemorizingSettings:
    """Memorizing Transformers (Wu et al. 2022): one layer's kNN memory of earlier (key, value) pairs.

    Attention of layer ``layer`` mixes, per head, its local attention with attention over the ``k``
    nearest memory keys: ``out = local + g * (memory - local)``, ``g = sigmoid(gate_bias)``. The
    gate starts at ``sigmoid(gate_init)``; at ``gate_init=-inf`` it is exactly 0 (the base model).

    Examples:

    ```python
    >>> from hf_knnlm.attention import MemorizingSettings
    >>> MemorizingSettings(layer=1, max_memory=1024).max_memory
    1024
    >>> MemorizingSettings(layer=-2)
    Traceback (most recent call last):
    ...
    ValueError: layer=-2 must be an integer >= 0 (the index of the layer that gets the memory).
    ```
    """

    layer: int = field(default=0, metadata={"help": "Index of the layer that gets the kNN memory."})
    k: int = field(default=32, metadata={"help": "Memory entries retrieved per head and query token."})
    max_memory: int = field(
        default=65536, metadata={"help": "Most (key, value) pairs kept, oldest evicted first."}
    )
    max_length: int = field(default=512, metadata={"help": "Local window length in tokens."})
    stride: int = field(default=256, metadata={"help": "New tokens scored per window."})
    gate_init: float = field(
        default=-8.0,
        metadata={"help": "Initial gate bias; the gate is sigmoid(bias), -inf is exactly the base model."},
    )

    def __post_init__(self) -> None:
        if not is_int(self.layer) or self.layer < 0:
            raise ValueError(
                f"layer={self.layer!r} must be an integer >= 0 (the index of the layer that gets the memory)."
            )
        check_positive_int("k", self.k, "memory entries retrieved per head and query")
        check_positive_int("max_memory", self.max_memory, "(key, value) pairs kept")
        _check_windows(self.max_length, self.stride)
        if not is_real(self.gate_init) or math.isnan(self.gate_init) or self.gate_init == math.inf:
            raise ValueError(
                f"gate_init={self.gate_init!r} must be a number < inf (e.g. -8.0; -inf = the base model)."
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


__all__ = ["METHODS", "MemorizingSettings", "UnlimiformerSettings"]
