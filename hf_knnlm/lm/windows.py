"""Sliding windows over a token stream, shared by datastore building and evaluation.

Every target token (every position but the first) is covered exactly once, and every target after
the first window sees at least ``max_length - stride`` tokens of context, as in the transformers
perplexity guide.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..utils.checks import check_positive_int, is_int


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` are fed to the model; tokens ``[first_target, end)`` are scored.

    Target token ``t`` is predicted from the hidden state at position ``t - 1``.
    """

    begin: int
    end: int
    first_target: int

    @property
    def num_targets(self) -> int:
        return self.end - self.first_target


DEFAULT_MAX_LENGTH, DEFAULT_STRIDE = 1024, 512


@dataclass
class WindowSettings:
    """The sliding windows a text is run in (building a store, scoring, tuning, training a gate).

    ``None`` means: the windows the datastore was built with (scoring a text as its store was built is the
    protocol), else ``DEFAULT_MAX_LENGTH`` / ``DEFAULT_STRIDE``; [`resolve`][hf_knnlm.WindowSettings.resolve]
    fills them in.

    Examples:

    ```python
    >>> from hf_knnlm.lm.windows import WindowSettings
    >>> WindowSettings().resolve(recorded=(512, 448))  # a store built with 512 / 448
    WindowSettings(max_length=512, stride=448, batch_size=8)
    >>> WindowSettings(max_length=2048).resolve(recorded=(512, 448))  # another length: its own stride
    WindowSettings(max_length=2048, stride=512, batch_size=8)
    ```
    """

    max_length: int | None = field(
        default=None,
        metadata={"help": f"Window length in tokens; default: the datastore's, else {DEFAULT_MAX_LENGTH}."},
    )
    stride: int | None = field(
        default=None,
        metadata={"help": f"New targets per window; default: the datastore's, else {DEFAULT_STRIDE}."},
    )
    batch_size: int = field(default=8, metadata={"help": "Windows per forward pass."})

    def __post_init__(self) -> None:
        for name in ("max_length", "stride"):
            value = getattr(self, name)
            if value is not None:
                check_positive_int(name, value, "tokens")
        check_positive_int("batch_size", self.batch_size, "windows per forward pass")

    def replace(self, **changes: Any) -> WindowSettings:
        """A copy with the changes that are not ``None``."""
        return dataclasses.replace(self, **{name: v for name, v in changes.items() if v is not None})

    def resolve(self, recorded: tuple[int | None, int | None] = (None, None)) -> WindowSettings:
        """Concrete windows: the given ones, else the ``recorded`` ones (a recorded stride only with the
        recorded max_length), else the defaults; checked with ``check_window_args``."""
        max_length, stride = window_settings(self.max_length, self.stride, recorded)
        check_window_args(max_length, stride)
        return WindowSettings(max_length, stride, self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def window_settings(
    max_length: int | None, stride: int | None, recorded: tuple[int | None, int | None] = (None, None)
) -> tuple[int, int]:
    """The windows to use: the given ones, else those a datastore ``recorded`` at build time (scoring
    a text as the store was built is the protocol), else ``DEFAULT_MAX_LENGTH`` / ``DEFAULT_STRIDE``.

    A recorded stride is used only with the recorded max_length (another length needs its own).
    """
    recorded_length, recorded_stride = recorded
    if max_length is None:
        max_length = recorded_length or DEFAULT_MAX_LENGTH
    if stride is None:
        same = recorded_stride is not None and max_length == recorded_length
        stride = recorded_stride if same else DEFAULT_STRIDE
    return max_length, stride


def check_window_args(max_length: int, stride: int) -> None:
    if not is_int(max_length) or not is_int(stride):
        raise ValueError(f"max_length={max_length!r} and stride={stride!r} must be integers.")
    if max_length < 2:
        raise ValueError(f"max_length={max_length} must be >= 2 (a window needs a context and a target).")
    if not 0 < stride < max_length:
        raise ValueError(
            f"stride={stride} must be in [1, max_length - 1 = {max_length - 1}] so that the first target of "
            f"every window has context; use stride={max_length - 1} for (almost) non-overlapping windows."
        )


def sliding_windows(num_tokens: int, max_length: int, stride: int) -> Iterator[Window]:
    """Windows of ``max_length`` tokens; after the first, each one scores the next ``stride`` targets."""
    check_window_args(max_length, stride)
    if num_tokens < 2:
        return
    prev_end = min(max_length, num_tokens)
    yield Window(begin=0, end=prev_end, first_target=1)
    while prev_end < num_tokens:
        end = min(prev_end + stride, num_tokens)
        yield Window(begin=max(0, end - max_length), end=end, first_target=prev_end)
        prev_end = end


def count_windows(num_tokens: int, max_length: int, stride: int) -> int:
    if num_tokens < 2:
        return 0
    first = min(max_length, num_tokens)
    return 1 + -(-(num_tokens - first) // stride)
